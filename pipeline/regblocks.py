"""Store entries in the registry as blocks (issue 17, the registry half): a push uploads only the
packs the registry lacks, a pull fetches only the blocks the local block store lacks.

Layout (remote.py's docstring quotes it for the README):

    <prefix>/blocks                     every pack (packs.py's pack files, byte for byte; a pack's
                                        blob digest is its name), uploaded once
    <prefix>/<row>:<key>                one OCI image manifest per entry
      artifactType  application/vnd.ldt.entry.v2
      config        application/vnd.ldt.entry.manifest.v1+json  the entry's manifest.json, byte for byte
      layers        application/vnd.ldt.entry.index.v2+zstd     one per file, sorted by name, titled with
                    it: the file's block index (below), annotated with the file's size and sha256
                    application/vnd.ldt.pack.v1                 every pack the indexes name, sorted by
                    digest (mounted from <prefix>/blocks: distribution wants every blob a manifest
                    names in the manifest's repository; a mount costs no bytes, the registry keeps
                    one copy of a blob however many repositories link it)

An index blob ("LDTRIDX1\\n" + one zstd frame) holds a JSON head line, the file's root index
(blocks.Index at level 1: the blocks that hold the index's entries, as packs.put_index makes it)
and where the registry holds every block the file needs: first the root's chunk blocks, then the
data blocks, each list in first-use order (the puller derives the digests; the index blob
stores only locations: pack number, frame offset, frame length, slot, as delta-coded columns,
which zstd makes about a byte per block). So a puller fetches frames by HTTP Range without
reading pack trailers, and a revision's index blobs cost what its changed index chunks and
locations cost, not 36 bytes per 4 KiB of every file again.

Push (regblocks.push): every file cut into the local block store (packs.BlockStore.put) with
"have" = the blocks the registry is known to hold (RemoteMap, below), so the packs it writes hold
exactly the blocks the registry lacks; those packs are uploaded to <prefix>/blocks (HEAD first:
packs are deterministic, a second runner's identical pack is not sent twice), then every pack
the entry names is mounted into <prefix>/<row> (HEAD first), then the index blobs and config,
and the manifest PUT last: it is the commit point. A push killed before it leaves packs no
manifest names (gc's to collect), never a manifest naming a missing pack; the next push finds
the uploaded packs by HEAD and completes it.

RemoteMap (cache/blocks/remote.sqlite, per registry URL): digest -> where the registry holds it,
learnt from this store's pushes and from the index blobs of its pulls, so runner B that pulled
revision 1 pushes revision 2 as its new blocks only. It is a hint, checked at every push: a
pack it names that the registry no longer holds is forgotten and the push starts again.

Pull (regblocks.pull): the index blob of each file (digest checked), its root's chunks then its
data blocks that the local store lacks, grouped per pack frame: fetched with Range requests
(neighbouring frames merged into one request), or the whole pack in one GET when more than
WHOLE_PACK of it is needed or the server ignores Range (a 200 to a Range request). Every block's
digest is checked before use (packs.block_of), every file's sha256 after materializing it; a
damaged pack is EntryCorrupt (cache.Store: one warning line and a local build).

A manifest of the old layout (application/vnd.ldt.entry.v1: one zstd file per layer) is still
pulled by remote.py's old path; pushes write this layout only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import sqlite3
import struct
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from pipeline import oci
from pipeline.blocks import HOLE, BlockCorrupt, Index
from pipeline.entries import MANIFEST, EntryCorrupt, RemoteUnavailable
from pipeline.errors import UserError
from pipeline.files import fsync_path
from pipeline.packs import (
    BATCH,
    BlockStore,
    Location,
    Made,
    _index_pack,
    block_of,
    decompress_frame,
    read_trailer,
    trailer_of,
)
from pipeline.seeds import Seed

ARTIFACT_TYPE = "application/vnd.ldt.entry.v2"
CONFIG_TYPE = "application/vnd.ldt.entry.manifest.v1+json"
INDEX_TYPE = "application/vnd.ldt.entry.index.v2+zstd"
PACK_TYPE = "application/vnd.ldt.pack.v1"
A_STAGE, A_KEY = "vnd.ldt.stage", "vnd.ldt.key"
BLOCKS_REPO = "blocks"
INDEX_MAGIC = b"LDTRIDX1\n"
MAX_INDEX = 256 << 20  # an index blob larger than this is not one of ours
WHOLE_PACK = 0.5  # fetch a whole pack when more than this share of its bytes is needed
RANGE_GAP = 256 << 10  # frames closer than this are fetched in one Range request
RANGE_MAX = 8 << 20  # the most one Range request asks for


# -- where the registry holds blocks ----------------------------------------------------------------

MAP_SCHEMA = """
CREATE TABLE IF NOT EXISTS map_packs (id INTEGER PRIMARY KEY, remote TEXT NOT NULL, name TEXT NOT NULL,
    size INTEGER NOT NULL, UNIQUE (remote, name));
CREATE TABLE IF NOT EXISTS map_blocks (digest BLOB NOT NULL, pack INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, slot INTEGER NOT NULL, PRIMARY KEY (digest, pack)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS map_complete (pack INTEGER PRIMARY KEY);
"""
MAP_CACHE_KIB = 32768  # SQLite's page cache for the map: a pull records ~180k blocks per GiB


@dataclass(frozen=True)
class RemoteMap:
    """What this store knows the registry `remote` holds: digest -> Location in a registry pack.
    A hint (a lost row costs a re-upload, a stale one a retry), so it is written without fsync."""

    blocks: BlockStore
    remote: str  # str(oci.Remote)
    _open: list[sqlite3.Connection] = field(default_factory=list, compare=False, repr=False)

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        if self._open:  # inside session(): its connection, and the pages it has read
            yield self._open[-1]
            return
        self.blocks.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.blocks.root / "remote.sqlite", timeout=60)
        try:
            con.execute("PRAGMA synchronous=OFF")
            con.execute(f"PRAGMA cache_size=-{MAP_CACHE_KIB}")
            con.executescript(MAP_SCHEMA)
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[RemoteMap]:
        """One connection for a whole push or pull: a connection per batch of look-ups started with
        a cold page cache each time (profiled: 9 of the 32 s pushing hello's ext4)."""
        with self.db() as con:
            self._open.append(con)
            try:
                yield self
            finally:
                self._open.pop()

    def locate_many(self, digests: list[bytes]) -> dict[bytes, Location]:
        out: dict[bytes, Location] = {}
        with self.db() as con:
            for i in range(0, len(digests), BATCH):
                part = digests[i:i + BATCH]
                rows = con.execute("SELECT b.digest, p.name, b.offset, b.length, b.slot FROM map_blocks b "
                                   "JOIN map_packs p ON p.id = b.pack WHERE p.remote = ? AND "
                                   f"b.digest IN ({','.join('?' * len(part))})", [self.remote, *part])
                out.update((row[0], Location(*row[1:])) for row in rows)
        return out

    def known(self, digests: list[bytes]) -> Collection[bytes]:
        out: set[bytes] = set()
        with self.db() as con:
            for i in range(0, len(digests), BATCH):
                part = digests[i:i + BATCH]
                out.update(row[0] for row in con.execute(
                    "SELECT b.digest FROM map_blocks b JOIN map_packs p ON p.id = b.pack WHERE p.remote = ? AND "
                    f"b.digest IN ({','.join('?' * len(part))})", [self.remote, *part]))
        return out

    def _ids(self, con: sqlite3.Connection, names: Iterable[str]) -> dict[str, int]:
        names = sorted(set(names))
        con.executemany("INSERT OR IGNORE INTO map_packs (remote, name, size) VALUES (?, ?, 0)",
                        ((self.remote, n) for n in names))
        out: dict[str, int] = {}
        for i in range(0, len(names), BATCH):
            part = names[i:i + BATCH]
            out.update(con.execute(f"SELECT name, id FROM map_packs WHERE remote = ? AND name IN "
                                   f"({','.join('?' * len(part))})", [self.remote, *part]))
        return out

    def add(self, located: Iterable[tuple[bytes, Location]], *, complete: Iterable[str] = ()) -> None:
        """Where blocks are. complete: packs all of whose blocks are in `located` (from a pack's
        trailer, or a pack this store wrote); the map then skips their blocks when told again (a
        pull tells it every block of an entry: 180,000 rows for an ext4 whose packs the tgz's
        pull had already taught it, about a second each time)."""
        with self.db() as con, con:
            whole = self._complete(con)
            # in key order: B-tree inserts several times faster
            rows = sorted(((d, loc) for d, loc in located if loc.pack not in whole), key=lambda x: x[0])
            complete = set(complete)
            ids = self._ids(con, {loc.pack for _, loc in rows} | complete)
            con.executemany("INSERT OR IGNORE INTO map_blocks VALUES (?, ?, ?, ?, ?)",
                            ((d, ids[loc.pack], loc.offset, loc.length, loc.slot) for d, loc in rows))
            con.executemany("INSERT OR IGNORE INTO map_complete VALUES (?)", ((ids[n],) for n in complete))

    def _complete(self, con: sqlite3.Connection) -> set[str]:
        return {n for (n,) in con.execute("SELECT p.name FROM map_complete c JOIN map_packs p ON p.id = c.pack "
                                          "WHERE p.remote = ?", (self.remote,))}

    def add_sizes(self, sizes: Mapping[str, int]) -> None:
        with self.db() as con, con:
            self._ids(con, sizes)
            con.executemany("UPDATE map_packs SET size = ? WHERE remote = ? AND name = ?",
                            ((size, self.remote, name) for name, size in sizes.items()))

    def size(self, pack: str) -> int | None:
        with self.db() as con:
            row = con.execute("SELECT size FROM map_packs WHERE remote = ? AND name = ?",
                              (self.remote, pack)).fetchone()
        return row[0] if row and row[0] else None

    def forget_pack(self, pack: str) -> None:
        with self.db() as con, con:
            row = con.execute("SELECT id FROM map_packs WHERE remote = ? AND name = ?", (self.remote, pack)).fetchone()
            if row:
                con.execute("DELETE FROM map_blocks WHERE pack = ?", row)  # a scan: rare (a lost or doomed pack)
                con.execute("DELETE FROM map_complete WHERE pack = ?", row)
                con.execute("DELETE FROM map_packs WHERE id = ?", row)


# -- the index blob -------------------------------------------------------------------------------

COLUMNS = (("H", "packs"), ("q", "offsets"), ("I", "lengths"), ("B", "slots"))


def encode_locations(locs: list[Location], packs: dict[str, int]) -> bytes:
    """Locations as columns (pack number, offset delta, frame length, slot): zstd's best case."""
    n = len(locs)
    deltas, prev = [], 0
    for loc in locs:
        deltas.append(loc.offset - prev)
        prev = loc.offset
    return b"".join((struct.pack(f"<{n}H", *(packs[loc.pack] for loc in locs)), struct.pack(f"<{n}q", *deltas),
                     struct.pack(f"<{n}I", *(loc.length for loc in locs)),
                     struct.pack(f"<{n}B", *(loc.slot for loc in locs))))


def decode_locations(raw: bytes, n: int, packs: list[str]) -> list[Location]:
    size = struct.calcsize(f"<{n}H{n}q{n}I{n}B")
    if len(raw) != size:
        raise ValueError("location columns")
    at = 0
    cols = []
    for fmt, _ in COLUMNS:
        width = struct.calcsize(f"<{n}{fmt}")
        cols.append(struct.unpack(f"<{n}{fmt}", raw[at:at + width]))
        at += width
    new = tuple.__new__  # a Location per block by the hundred thousand: without its Python-level __new__
    return [new(Location, loc) for loc in zip(map(packs.__getitem__, cols[0]), itertools.accumulate(cols[1]),
                                              cols[2], cols[3], strict=True)]


def distinct(digests: Iterator[bytes] | list[bytes]) -> list[bytes]:
    """The digests in first-use order, once each, holes left out."""
    return [d for d in dict.fromkeys(digests) if d != HOLE]


@dataclass(frozen=True)
class IndexBlob:
    root: Index  # level 1 (or 0 for a small file)
    chunks: list[Location]  # where each of distinct(root's digests) is
    blocks: list[Location]  # where each of distinct(the full index's digests) is

    def packs(self) -> list[str]:
        return sorted({loc.pack for loc in (*self.chunks, *self.blocks)})

    def to_bytes(self) -> bytes:
        packs = self.packs()
        number = {p: i for i, p in enumerate(packs)}
        root = self.root.to_bytes()
        head = {"packs": packs, "root": len(root), "chunks": len(self.chunks), "blocks": len(self.blocks)}
        raw = (json.dumps(head, sort_keys=True).encode() + b"\n" + root
               + encode_locations(self.chunks, number) + encode_locations(self.blocks, number))
        return INDEX_MAGIC + zstandard.ZstdCompressor(level=9).compress(raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexBlob:
        try:
            if not data.startswith(INDEX_MAGIC):
                raise ValueError("no index magic")
            raw = _bounded_decompress(data[len(INDEX_MAGIC):], 4 * MAX_INDEX)
            line, _, rest = raw.partition(b"\n")
            head = json.loads(line)
            packs = list(head["packs"])
            if len(packs) > 0xFFFF or not all(isinstance(p, str) and len(p) == 64 for p in packs):
                raise ValueError("packs")
            root = Index.from_bytes(rest[:head["root"]])
            n_chunks, n_blocks = int(head["chunks"]), int(head["blocks"])
            cut = head["root"] + struct.calcsize(f"<{n_chunks}H{n_chunks}q{n_chunks}I{n_chunks}B")
            chunks = decode_locations(rest[head["root"]:cut], n_chunks, packs)
            blocks = decode_locations(rest[cut:], n_blocks, packs)
        except (ValueError, KeyError, TypeError, IndexError, struct.error, zstandard.ZstdError, UserError) as e:
            raise EntryCorrupt(f"a remote block index is malformed ({type(e).__name__})") from None
        return cls(root, chunks, blocks)


def _bounded_decompress(data: bytes, limit: int) -> bytes:
    """A zstd frame's content, read in pieces: a frame header claiming terabytes costs nothing."""
    parts, total = [], 0
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as z:
        while chunk := z.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise ValueError("larger than an index may be")
            parts.append(chunk)
    return b"".join(parts)


# -- the OCI manifest ----------------------------------------------------------------------------


def image_manifest(stage: str, key: str, config: oci.Blob, indexes: Mapping[str, tuple[oci.Blob, Mapping[str, Any]]],
                   packs: Mapping[str, int]) -> bytes:
    """The manifest bytes of an entry: a pure function of it (two pushers write the same bytes)."""
    raw = oci.image_manifest(ARTIFACT_TYPE, CONFIG_TYPE, config, [
        *(oci.file_descriptor(INDEX_TYPE, blob, name, rec) for name, (blob, rec) in sorted(indexes.items())),
        *(oci.descriptor(PACK_TYPE, oci.Blob("sha256:" + p, size)) for p, size in sorted(packs.items())),
    ], {A_STAGE: stage, A_KEY: key})
    if len(raw) > oci.MAX_MANIFEST:
        raise UserError(f"{stage}:{key[:12]} would need a manifest of {len(raw)} bytes (it names {len(packs)} "
                        f"packs), more than registries take ({oci.MAX_MANIFEST})")
    return raw


@dataclass(frozen=True)
class Parsed:
    config: oci.Blob
    indexes: dict[str, oci.Blob]  # file name -> index blob
    packs: dict[str, int]  # pack name -> bytes


def is_blocks_manifest(doc: Mapping[str, Any]) -> bool:
    return doc.get("artifactType") == ARTIFACT_TYPE


def parse_manifest(doc: Mapping[str, Any], stage: str, key: str) -> Parsed:
    try:
        if doc.get("annotations", {}).get(A_STAGE) != stage or doc["annotations"].get(A_KEY) != key:
            raise EntryCorrupt(f"the remote manifest {stage}:{key} is annotated for another entry")
        if doc["config"]["mediaType"] != CONFIG_TYPE:
            raise EntryCorrupt(f"the remote manifest {stage}:{key} is not an LDT entry")
        config = oci.parse_blob(doc["config"])
        indexes: dict[str, oci.Blob] = {}
        packs: dict[str, int] = {}
        for d in doc["layers"]:
            blob = oci.parse_blob(d)
            if d["mediaType"] == PACK_TYPE:
                packs[blob.digest.removeprefix("sha256:")] = blob.size
            elif d["mediaType"] == INDEX_TYPE:
                name = oci.check_name(d["annotations"][oci.TITLE])
                if name in indexes:
                    raise EntryCorrupt(f"the remote entry {stage}:{key} holds {name!r} twice")
                indexes[name] = blob
            else:
                raise EntryCorrupt(f"the remote entry {stage}:{key} has a layer of type {d['mediaType']!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EntryCorrupt(f"the remote manifest {stage}:{key} is malformed ({type(e).__name__})") from None
    return Parsed(config, indexes, packs)


# -- push -----------------------------------------------------------------------------------------


class _Stale(Exception):
    """The map named a pack the registry no longer holds (forgotten now): push again."""


def push(c: oci.Client, remote: oci.Remote, stage: str, key: str, entry: Path, bs: BlockStore,
         doomed: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Upload an entry in this layout (the caller checked the tag is absent); the manifest PUT last.
    `doomed`: packs a registry gc is about to delete (reggc.doomed_packs), each with the new packs a
    compaction copied its live blocks into: the map learns those (learn_moved) and forgets the
    doomed ones, so their blocks are found in the new packs or sent again, never named there."""
    doomed = doomed or {}
    config_raw = (entry / MANIFEST).read_bytes()
    records = oci.recorded_files(json.loads(config_raw), f"local entry {entry}")
    present = {p.name for p in entry.iterdir() if p.name != MANIFEST}
    if present != set(records):
        raise EntryCorrupt(f"local entry {entry} holds {sorted(present)}, its manifest.json lists {sorted(records)}")
    with RemoteMap(bs, str(remote)).session() as rmap:
        learn_moved(c, remote, rmap, doomed)
        for pack in doomed:
            rmap.forget_pack(pack)
        for attempt in range(3):
            try:
                return _push_once(c, remote, stage, key, entry, config_raw, records, bs, rmap)
            except _Stale:
                if attempt == 2:
                    raise RemoteUnavailable(f"remote store {remote.host} keeps losing packs while "
                                            f"{stage}:{key[:12]} is pushed") from None
    return None


def _push_once(c: oci.Client, remote: oci.Remote, stage: str, key: str, entry: Path, config_raw: bytes,
               records: Mapping[str, Mapping[str, Any]], bs: BlockStore, rmap: RemoteMap) -> None:
    repo, blocks_repo = remote.repository(stage), remote.repository(BLOCKS_REPO)
    made: list[Made] = []
    written: set[bytes] = set()  # blocks in this push's new packs: a second file sharing them does not write them again

    def have(ds: list[bytes]) -> Collection[bytes]:
        return set(rmap.known(ds)) | written.intersection(ds)

    def note(before: int) -> None:
        for pack in made[before:]:
            written.update(d for d, _ in pack.blocks)

    roots: dict[str, tuple[Index, Index]] = {}
    for name in sorted(records):
        try:
            before = len(made)
            full = bs.put(entry / name, have=have, made=made)
            note(before)
        except BlockCorrupt as e:
            raise EntryCorrupt(f"local file {entry / name} could not be cut into blocks ({e.message})") from None
        if (full.size, full.sha256) != (records[name]["size"], records[name]["sha256"]):
            raise EntryCorrupt(f"local file {entry / name} no longer matches its manifest.json record; not pushed")
        before = len(made)
        roots[name] = (bs.put_index(full, have=have, made=made), full)
        note(before)
    for pack in made:  # what the registry lacked, in packs of their own
        if not oci.head(c, f"/{blocks_repo}/blobs/sha256:{pack.name}"):
            oci.upload_file(c, blocks_repo, oci.Blob("sha256:" + pack.name, pack.size), bs.pack_path(pack.name))
        rmap.add(pack.blocks, complete=[pack.name])
        rmap.add_sizes({pack.name: pack.size})
    made.clear()  # what they hold is in the map now: memory for the locations below
    written.clear()
    indexes: dict[str, tuple[bytes, Mapping[str, Any]]] = {}
    used: set[str] = set()
    for name, (root, full) in roots.items():
        chunk_ds, block_ds = distinct(d for d, _ in root), distinct(d for d, _ in full)
        where = rmap.locate_many(chunk_ds + block_ds)
        if len(where) != len(set(chunk_ds + block_ds)):
            raise _Stale  # a block neither known nor written: the map changed under this push
        blob = IndexBlob(root, [where[d] for d in chunk_ds], [where[d] for d in block_ds])
        used.update(blob.packs())
        indexes[name] = (blob.to_bytes(), records[name])
    sizes: dict[str, int] = {}
    for pack in sorted(used):
        sizes[pack] = _ensure_pack(c, repo, blocks_repo, pack, bs, rmap)
    config = oci.Blob("sha256:" + hashlib.sha256(config_raw).hexdigest(), len(config_raw))
    layers: dict[str, tuple[oci.Blob, Mapping[str, Any]]] = {}
    for name, (data, rec) in indexes.items():
        layers[name] = (oci.Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data)), rec)
    for blob, data in [(config, config_raw), *((layers[n][0], indexes[n][0]) for n in sorted(layers))]:
        if not oci.head(c, f"/{repo}/blobs/{blob.digest}"):
            oci.upload_bytes(c, repo, blob, data)
    raw = image_manifest(stage, key, config, layers, sizes)
    try:
        r = c.request("PUT", f"/{repo}/manifests/{key}", ok=(200, 201), data=raw,
                      headers={"Content-Type": oci.OCI_MANIFEST})
    except RemoteUnavailable as e:
        # Distribution writes a blob's link file in place: a pusher of the same blob at this moment
        # can make it read as empty, and the PUT fails with DIGEST_INVALID,MANIFEST_BLOB_UNKNOWN
        # (test_two_concurrent_pushes_of_one_key_both_succeed, about 1 run in 4 here). Once more,
        # every blob checked again, after the other pusher's write.
        if "MANIFEST_BLOB_UNKNOWN" not in e.message:
            raise
        time.sleep(0.5)
        raise _Stale from None
    r.close()
    want = "sha256:" + hashlib.sha256(raw).hexdigest()
    got = r.headers.get("Docker-Content-Digest")
    if got and got != want:
        raise RemoteUnavailable(f"remote store {remote.host} stored {stage}:{key} as {got}, not {want}")


def _ensure_pack(c: oci.Client, repo: str, blocks_repo: str, pack: str, bs: BlockStore, rmap: RemoteMap) -> int:
    """The pack in the entry's repository (HEAD, else a mount from <prefix>/blocks, else uploaded
    there from the local copy and mounted); its size. _Stale when no one has it any more."""
    digest = "sha256:" + pack
    local = bs.pack_path(pack)
    size = rmap.size(pack) or (local.stat().st_size if local.is_file() else None)
    if size is None:
        rmap.forget_pack(pack)  # a pack whose size nobody knows: a map older than this code
        raise _Stale
    if oci.head(c, f"/{repo}/blobs/{digest}") or oci.mount(c, repo, digest, blocks_repo):
        return size
    if not local.is_file():
        rmap.forget_pack(pack)
        raise _Stale
    oci.upload_file(c, blocks_repo, oci.Blob(digest, size), local)
    if not oci.mount(c, repo, digest, blocks_repo):
        raise RemoteUnavailable(f"remote store {c.remote.host} does not mount blobs across repositories")
    return size


def learn_moved(c: oci.Client, remote: oci.Remote, rmap: RemoteMap, doomed: Mapping[str, Mapping[str, int]]) -> int:
    """Before a push: where the live blocks of compacted packs this store's map knows went (the gc
    state names each doomed pack's new packs; their trailers, two Range requests each, say where
    every block is), so the push finds them there instead of sending them again. How many packs
    were learned; a replacement that cannot be read is skipped (its blocks are sent again)."""
    learned = 0
    blocks_repo = remote.repository(BLOCKS_REPO)
    for old, into in sorted(doomed.items()):
        if not into or rmap.size(old) is None:
            continue
        for pack, size in sorted(into.items()):
            if rmap.size(pack) is not None:
                continue
            try:
                trailer = remote_trailer(c, blocks_repo, pack, size)
            except BlockCorrupt:
                continue
            rmap.add(trailer, complete=[pack])
            rmap.add_sizes({pack: size})
            learned += 1
    return learned


# -- reading a registry pack ----------------------------------------------------------------------


def _range(c: oci.Client, repo: str, pack: str, start: int, end: int) -> bytes | None:
    """Bytes [start, end) of a pack blob by a Range request; None when the server ignores Range
    (a 200: the whole blob would come), BlockCorrupt when it sends more or less."""
    r = c.request("GET", f"/{repo}/blobs/sha256:{pack}", ok=(200, 206), stream=True,
                  headers={"Range": f"bytes={start}-{end - 1}"})
    with contextlib.closing(r):
        if r.status_code != 206:
            return None
        data = _read(r, end - start, c.remote.host, f"pack {pack[:12]}")
    if len(data) != end - start:
        raise BlockCorrupt(f"pack {pack[:12]} in the registry is damaged (a range of it is short)")
    return data


def get_range(c: oci.Client, repo: str, pack: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a pack blob; BlockCorrupt when the server ignores Range or sends short."""
    data = _range(c, repo, pack, start, end)
    if data is None:
        raise BlockCorrupt(f"the registry ignores Range requests on pack {pack[:12]}")
    return data


def remote_trailer(c: oci.Client, repo: str, pack: str, size: int) -> list[tuple[bytes, Location]]:
    """A registry pack's own index (packs.trailer_of over Range), checked against the footer."""
    return trailer_of(pack, size, lambda start, end: get_range(c, repo, pack, start, end))


# -- pull -----------------------------------------------------------------------------------------


@dataclass
class Fetched:
    """What a pull transferred (the tests and bench assert on it)."""

    requests: int = 0
    bytes: int = 0
    whole_packs: int = 0


def pull(c: oci.Client, repo: str, stage: str, key: str, doc: Mapping[str, Any], config_raw: bytes,
         records: Mapping[str, Mapping[str, Any]], work: Path, bs: BlockStore, rmap: RemoteMap,
         fetched: Fetched | None = None, seeds: Collection[Seed] = ()) -> None:
    """The entry's files into work (manifest.json is the caller's), fetching only missing blocks;
    blocks that seeds (local files, seeds.py) hold are copied from them."""
    parsed = parse_manifest(doc, stage, key)
    if set(parsed.indexes) != set(records):
        raise EntryCorrupt(f"the remote entry {stage}:{key} indexes {sorted(parsed.indexes)}, "
                           f"its manifest.json lists {sorted(records)}")
    fetched = fetched if fetched is not None else Fetched()
    rmap.add_sizes(parsed.packs)
    for name in sorted(records):
        data = oci.get_small(c, repo, parsed.indexes[name], f"block index of {stage}:{key} {name}", MAX_INDEX)
        fetched.bytes += len(data)
        blob = IndexBlob.from_bytes(data)
        if (blob.root.size, blob.root.sha256) != (records[name]["size"], records[name]["sha256"]):
            raise EntryCorrupt(f"the remote block index of {stage}:{key} {name} is not the file manifest.json records")
        if not set(blob.packs()) <= set(parsed.packs):
            raise EntryCorrupt(f"the remote block index of {stage}:{key} {name} names a pack its manifest does not")
        try:
            chunk_ds = distinct(d for d, _ in blob.root)
            if len(chunk_ds) != len(blob.chunks):
                raise EntryCorrupt(f"the remote block index of {stage}:{key} {name} does not add up")
            _fetch_missing(c, repo, bs, rmap, dict(zip(chunk_ds, blob.chunks, strict=True)), parsed.packs, fetched)
            full = bs.get_index(blob.root)
            block_ds = distinct(d for d, _ in full)
            if len(block_ds) != len(blob.blocks):
                raise EntryCorrupt(f"the remote block index of {stage}:{key} {name} does not add up")
            where = dict(zip(block_ds, blob.blocks, strict=True))
            _fetch_missing(c, repo, bs, rmap, where, parsed.packs, fetched)
            rmap.add(list(where.items()) + list(zip(chunk_ds, blob.chunks, strict=True)))
            bs.materialize(blob.root, work / name, seeds, whole=True)  # an index the registry gave
        except BlockCorrupt as e:
            raise EntryCorrupt(f"{stage}:{key[:12]} {name} from the registry: {e.message}") from None


def _fetch_missing(c: oci.Client, repo: str, bs: BlockStore, rmap: RemoteMap, where: dict[bytes, Location],
                   pack_sizes: Mapping[str, int], fetched: Fetched) -> None:
    """The blocks of `where` the local store lacks, into it: per pack, the frames by Range, or the
    whole pack when most of it is needed. A damaged pack: BlockCorrupt (and the map forgets it)."""
    with bs.db() as con:  # a registry pack held here whole (by its name) holds all its blocks: not asked
        here = bs.pack_names(con)
        unsure = [d for d, loc in where.items() if loc.pack not in here]
        have = bs.known(unsure, con)
    wanted = {d: where[d] for d in unsure if d not in have}
    by_pack: dict[str, dict[tuple[int, int], list[tuple[bytes, Location]]]] = {}
    for d, loc in wanted.items():
        by_pack.setdefault(loc.pack, {}).setdefault((loc.offset, loc.length), []).append((d, loc))
    for pack, frames in sorted(by_pack.items()):
        try:
            need = sum(length for _, length in frames)
            if need > WHOLE_PACK * pack_sizes[pack] or not _fetch_frames(c, repo, bs, pack, frames, fetched):
                rmap.add(_fetch_pack(c, repo, bs, pack, pack_sizes[pack], fetched), complete=[pack])
        except BlockCorrupt:
            rmap.forget_pack(pack)
            raise


def _ranges(frames: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Frames (offset, length), sorted, merged into (start, end exclusive) requests."""
    out: list[list[int]] = []
    for off, length in sorted(frames):
        if out and off - out[-1][1] <= RANGE_GAP and off + length - out[-1][0] <= RANGE_MAX:
            out[-1][1] = max(out[-1][1], off + length)
        else:
            out.append([off, off + length])
    return [(a, b) for a, b in out]


def _fetch_frames(c: oci.Client, repo: str, bs: BlockStore, pack: str,
                  frames: dict[tuple[int, int], list[tuple[bytes, Location]]], fetched: Fetched) -> bool:
    """The frames by Range requests into a new local pack; False when the server ignores Range."""
    with bs.db() as con, bs.writer(con) as writer:
        for start, end in _ranges(list(frames)):
            data = _range(c, repo, pack, start, end)
            fetched.requests += 1
            if data is None:
                return False  # the whole blob is coming: take it whole instead
            fetched.bytes += len(data)
            for (off, length), blocks in frames.items():
                if start <= off and off + length <= end:
                    frame = decompress_frame(data[off - start:off - start + length], blocks[0][1])
                    for d, loc in blocks:
                        writer.add(d, block_of(frame, d, loc))
    return True


def _read(r: Any, n: int, host: str, what: str) -> bytes:
    try:
        return r.raw.read(n + 1, decode_content=True)
    except OSError as e:
        raise RemoteUnavailable(f"remote store {host} broke off sending {what} ({type(e).__name__})") from None


def _fetch_pack(c: oci.Client, repo: str, bs: BlockStore, pack: str, size: int,
                fetched: Fetched) -> list[tuple[bytes, Location]]:
    """A whole pack into the local store under its own name, checked against it (sha256); its blocks."""
    bs.tmp.mkdir(parents=True, exist_ok=True)
    tmp = bs.tmp / f"pull-{pack[:16]}-{os.getpid()}-{os.urandom(4).hex()}"
    h = hashlib.sha256()
    got = 0
    try:
        r = c.request("GET", f"/{repo}/blobs/sha256:{pack}", ok=(200,), stream=True)
        with contextlib.closing(r), open(tmp, "wb") as out:
            fetched.requests += 1
            while True:
                chunk = _read(r, oci.IO_CHUNK - 1, c.remote.host, f"pack {pack[:12]}")
                if not chunk:
                    break
                got += len(chunk)
                if got > size:
                    raise BlockCorrupt(f"pack {pack[:12]} in the registry is damaged (longer than {size} bytes)")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        fetched.bytes += got
        fetched.whole_packs += 1
        if h.hexdigest() != pack:
            raise BlockCorrupt(f"pack {pack[:12]} in the registry is damaged (its bytes do not match its name)")
        final = bs.pack_path(pack)
        bs.packs.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)  # its bytes are the ones its name says: complete
        fsync_path(bs.packs)
        try:
            entries = read_trailer(final)
        except BlockCorrupt:
            final.unlink()
            raise
        with bs.db() as con:
            _index_pack(con, pack, got, entries)
        return entries
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
