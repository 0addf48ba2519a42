"""Store entries in an OCI registry: the store shared by a fleet (RegistryStore, which the
project hands the store), push and pull of verified entries. The wire is oci.py's.

Layout (quote this one in the README). One store entry `cache/store/<row>/<key>/` is one OCI
image manifest, in the repository `<prefix>/<row>` of the registry, tagged with the entry key;
its bytes are blocks (blocks.py) in packs (packs.py) that every entry shares:

    <host>/<prefix>/blocks              every pack, uploaded once (a pack's blob digest is its name):
                                        zstd frames of 16 blocks of 4 KiB, a trailer, a footer
    <host>/<prefix>/<row>:<key>
      mediaType     application/vnd.oci.image.manifest.v1+json
      artifactType  application/vnd.ldt.entry.v2
      config        application/vnd.ldt.entry.manifest.v1+json  the entry's manifest.json, byte for byte;
                    its "files" maps each output file to {"size", "sha256"} of the file itself
      layers        application/vnd.ldt.entry.index.v2+zstd     one per output file, sorted by name,
                    annotated with org.opencontainers.image.title = the file name, vnd.ldt.file.size,
                    vnd.ldt.file.sha256: the file's block index and, for every block, the pack, frame
                    offset, frame length and slot that hold it (a pull fetches frames by HTTP Range)
                    application/vnd.ldt.pack.v1                 every pack those indexes name, sorted,
                    mounted from <prefix>/blocks (the registry keeps each blob once)
      annotations   vnd.ldt.stage, vnd.ldt.key
    <host>/<prefix>/gc:state            store_gc --remote's record (reggc.py): when it first saw each
                                        entry, which packs it doomed and when

The details (index blob format, the map of what the registry holds, Range requests) are in
regblocks.py; retention in reggc.py. Entries of the first layout (artifactType
application/vnd.ldt.entry.v1: each file one zstd blob) are still pulled; pushes write blocks.

Every manifest a client writes is a pure function of the entry, so two pushers of the same key
write the same bytes and both succeed.

Trust chain on pull: tag -> manifest (stage and key annotations must match) -> config blob
(sha256 checked) -> manifest.json "files" -> each index blob (sha256 checked; its size and
sha256 must be the file's record) -> every block (sha256 checked before use, a whole pack
against its name) -> the file (sha256 checked against manifest.json). Any mismatch raises
EntryCorrupt and removes what was written.

Push order: packs first (those the registry lacks), then index blobs and manifest.json, the
manifest last: the manifest PUT is the commit point, so an interrupted push never leaves a tag
naming missing blobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import oci
from pipeline.entries import MANIFEST, EntryCorrupt

if TYPE_CHECKING:  # the block layer's modules are imported where an entry moves: a no-op doit needs none
    from pipeline.packs import BlockStore
    from pipeline.regblocks import Fetched
    from pipeline.seeds import Seed

ARTIFACT_TYPE = "application/vnd.ldt.entry.v1"
CONFIG_TYPE = "application/vnd.ldt.entry.manifest.v1+json"
FILE_TYPE = "application/vnd.ldt.entry.file.v1+zstd"
A_STAGE, A_KEY = "vnd.ldt.stage", "vnd.ldt.key"


@dataclass(frozen=True)
class RegistryStore:
    """The store a fleet shares (entries.Shared): what Store pulls from and pushes to. Made at the
    edge from LDT_REMOTE (from_env); `env` is where credentials are read (None: os.environ)."""

    remote: oci.Remote
    env: Mapping[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RegistryStore | None:
        """LDT_REMOTE=oci://HOST[:PORT]/PREFIX; pushing is on unless LDT_REMOTE_PUSH=0. None without one."""
        remote = oci.Remote.from_env(env)
        return None if remote is None else cls(remote)

    @property
    def push(self) -> bool:
        return self.remote.push

    def pull_entry(self, row: str, key: str, work: Path, *, blocks: BlockStore, seeds: Collection[Seed] = ()) -> bool:
        return pull_entry(self.remote, row, key, work, env=self.env, blocks=blocks, seeds=seeds)

    def push_entry(self, row: str, key: str, entry: Path, *, tmp_dir: Path, blocks: BlockStore) -> bool:
        return push_entry(self.remote, row, key, entry, tmp_dir=tmp_dir, env=self.env, blocks=blocks)

    def keys(self, row: str) -> list[str]:
        return remote_keys(self.remote, row, env=self.env)

    def __str__(self) -> str:
        return str(self.remote)


# -- the OCI manifest: a pure function of the entry -------------------------------------------------


def image_manifest(stage: str, key: str, config: oci.Blob,
                   layers: Mapping[str, tuple[oci.Blob, Mapping[str, Any]]]) -> bytes:
    """The manifest bytes for an entry; `layers` maps file name -> (compressed blob, {"size", "sha256"})."""
    return oci.image_manifest(
        ARTIFACT_TYPE, CONFIG_TYPE, config,
        [oci.file_descriptor(FILE_TYPE, blob, name, rec) for name, (blob, rec) in sorted(layers.items())],
        {A_STAGE: stage, A_KEY: key})


def parse_manifest(raw: bytes, stage: str, key: str) -> tuple[oci.Blob, dict[str, oci.Blob]]:
    """(config blob, {file name: layer blob}) of one of our manifests; EntryCorrupt for anything else."""
    try:
        doc = json.loads(raw)
        if doc.get("annotations", {}).get(A_STAGE) != stage or doc["annotations"].get(A_KEY) != key:
            raise EntryCorrupt(f"the remote manifest {stage}:{key} is annotated for another entry")
        if doc["config"]["mediaType"] != CONFIG_TYPE:
            raise EntryCorrupt(f"the remote manifest {stage}:{key} is not an LDT entry "
                               f"(config {doc['config']['mediaType']!r})")
        config = oci.parse_blob(doc["config"])
        layers: dict[str, oci.Blob] = {}
        for d in doc["layers"]:
            if d["mediaType"] != FILE_TYPE:
                raise EntryCorrupt(f"the remote entry {stage}:{key} has a layer of type {d['mediaType']!r}")
            name = oci.check_name(d["annotations"][oci.TITLE])
            if name in layers:
                raise EntryCorrupt(f"the remote entry {stage}:{key} holds {name!r} twice")
            layers[name] = oci.parse_blob(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EntryCorrupt(f"the remote manifest {stage}:{key} is malformed ({type(e).__name__})") from None
    return config, layers


# -- push ---------------------------------------------------------------------------------------------


def push_entry(remote: oci.Remote, stage: str, key: str, entry_dir: str | os.PathLike[str], *,
               tmp_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
               blocks: BlockStore | None = None) -> bool:
    """Publish a finished local entry as <prefix>/<stage>:<key> in the block layout (regblocks.py),
    its blocks kept in `blocks` (the store's; None: a throwaway one in tmp_dir, so the registry's
    packs are found by HEAD only). False when the tag was already there (either layout)."""
    from pipeline import regblocks, reggc

    if not oci.TAG.fullmatch(key):
        raise ValueError(f"entry key {key!r} is not a valid OCI tag")
    repo = remote.repository(stage)
    with oci.client(remote, env) as c, _block_store(blocks, tmp_dir) as bs:
        if oci.head(c, f"/{repo}/manifests/{key}", accept=oci.OCI_MANIFEST):
            return False
        regblocks.push(c, remote, stage, key, Path(entry_dir), bs, reggc.doomed_packs(c, remote))
    return True


@contextlib.contextmanager
def _block_store(blocks: BlockStore | None, tmp_dir: str | os.PathLike[str] | None) -> Iterator[BlockStore]:
    from pipeline.packs import BlockStore

    if blocks is not None:
        yield blocks
        return
    with tempfile.TemporaryDirectory(prefix="ldt-blocks-", dir=tmp_dir) as tmp:
        yield BlockStore(Path(tmp))


# -- pull ---------------------------------------------------------------------------------------------


def _get_manifest(c: oci.Client, repo: str, stage: str, key: str) -> tuple[bytes, dict[str, Any]] | None:
    """The manifest of a tag, raw and parsed; None when the tag is absent."""
    raw = oci.get_manifest(c, repo, key, f"manifest {stage}:{key}")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except ValueError:
        raise EntryCorrupt(f"the remote manifest {stage}:{key} is not JSON") from None
    return raw, doc


def _config_of(raw: bytes, doc: dict[str, Any], stage: str, key: str) -> oci.Blob:
    from pipeline import regblocks

    if regblocks.is_blocks_manifest(doc):
        return regblocks.parse_manifest(doc, stage, key).config
    return parse_manifest(raw, stage, key)[0]


def _get_config(c: oci.Client, repo: str, stage: str, key: str, config: oci.Blob) -> tuple[bytes, dict]:
    if config.size > oci.MAX_MANIFEST:
        raise EntryCorrupt(f"the remote manifest.json of {stage}:{key} is larger than {oci.MAX_MANIFEST} bytes")
    with contextlib.closing(c.request("GET", f"/{repo}/blobs/{config.digest}", ok=(200,), stream=True)) as r:
        raw = oci.read_limited(r, f"manifest.json of {stage}:{key}")
    if len(raw) != config.size or "sha256:" + hashlib.sha256(raw).hexdigest() != config.digest:
        raise EntryCorrupt(f"the remote manifest.json of {stage}:{key} does not match its digest")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise EntryCorrupt(f"the remote manifest.json of {stage}:{key} is not JSON") from None
    return raw, manifest


def entry_manifest(remote: oci.Remote, stage: str, key: str, *, env: Mapping[str, str] | None = None) -> dict | None:
    """The manifest.json of a remote entry (digest checked), or None when the tag is absent.

    For Store.build, which wants the manifest before the body runs: look it up here, then pull_entry.
    """
    repo = remote.repository(stage)
    with oci.client(remote, env) as c:
        found = _get_manifest(c, repo, stage, key)
        if found is None:
            return None
        return _get_config(c, repo, stage, key, _config_of(*found, stage, key))[1]


def pull_entry(remote: oci.Remote, stage: str, key: str, work_dir: str | os.PathLike[str], *,
               env: Mapping[str, str] | None = None, blocks: BlockStore | None = None,
               fetched: Fetched | None = None, seeds: Collection[Seed] = ()) -> bool:
    """Fetch <prefix>/<stage>:<key> into work_dir (files + manifest.json). False when the tag is absent.

    The block layout (regblocks.py) fetches only the blocks `blocks` (the store's block store;
    None: a throwaway one) lacks, every block checked against its digest and every file against
    manifest.json's sha256; an entry of the old layout (one zstd file per layer) is checked while
    it streams. On any failure all that was written is removed before the exception
    (EntryCorrupt, RemoteUnavailable) goes up.
    """
    from pipeline import regblocks

    work = Path(work_dir)
    repo = remote.repository(stage)
    written: list[Path] = []
    try:
        with oci.client(remote, env) as c:
            found = _get_manifest(c, repo, stage, key)
            if found is None:
                return False
            raw, doc = found
            config_raw, manifest = _get_config(c, repo, stage, key, _config_of(raw, doc, stage, key))
            records = oci.recorded_files(manifest, f"remote entry {stage}:{key}")
            written += [work / name for name in records]
            if regblocks.is_blocks_manifest(doc):
                with _block_store(blocks, work.parent) as bs, regblocks.RemoteMap(bs, str(remote)).session() as rmap:
                    regblocks.pull(c, repo, stage, key, doc, config_raw, records, work, bs, rmap, fetched, seeds)
            else:
                _pull_files(c, repo, stage, key, parse_manifest(raw, stage, key)[1], records, work, written)
            written.append(work / MANIFEST)
            (work / MANIFEST).write_bytes(config_raw)
    except BaseException:
        for p in written:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    return True


def _pull_files(c: oci.Client, repo: str, stage: str, key: str, layers: Mapping[str, oci.Blob],
                records: Mapping[str, Mapping[str, Any]], work: Path, written: list[Path]) -> None:
    """The old layout (application/vnd.ldt.entry.v1): each file one zstd blob, checked while it streams."""
    if set(records) != set(layers):
        raise EntryCorrupt(f"the remote entry {stage}:{key} has layers {sorted(layers)}, "
                           f"its manifest.json lists {sorted(records)}")
    for name in sorted(layers):
        part = work / f".{name}.part"
        written.append(part)
        oci.download_file(c, repo, layers[name], records[name], part, f"{stage}:{key} {name}")
        part.rename(work / name)


# -- listing ------------------------------------------------------------------------------------------


def remote_keys(remote: oci.Remote, stage: str, *, env: Mapping[str, str] | None = None) -> list[str]:
    """The keys (tags) the remote holds for a stage; [] when the repository does not exist yet."""
    with oci.client(remote, env) as c:
        return oci.tags(c, remote.repository(stage))


