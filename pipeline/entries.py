"""What the store (cache.py) and the registry client (remote.py) agree on about an entry, so
neither imports the other: the manifest file's name, the key of a manifest, the per-file
records that make a pulled entry checkable end to end, the two ways a registry fails, and the
shape of a shared store (`Shared`) that the project hands the store (project.py).

An entry is a folder `<row>/<key>/` holding its files and manifest.json: the inputs (whose
hash is the key) and, under "files", each file's size and sha256 (the OCI registry's own
digest, so a pulled entry is checked end to end).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import xxhash

from pipeline.errors import UserError
from pipeline.files import data_extents

if TYPE_CHECKING:
    from collections.abc import Collection

    from pipeline.packs import BlockStore
    from pipeline.seeds import Seed

MANIFEST = "manifest.json"
CHUNK = 1 << 20
ZEROS = memoryview(bytes(CHUNK))  # what a hole reads as


def key_of(manifest: dict[str, Any]) -> str:
    """xxh3-128 over the sorted JSON of every input of an entry."""
    return xxhash.xxh3_128_hexdigest(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


def hash_file(path: str | os.PathLike[str]) -> str:
    """xxh3-128 of a file's bytes (a content key; doit's checker uses it too)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of a file, read once (what an entry's manifest.json records per file).

    Its holes are hashed as the zeros they read as, without reading them (a disk image is half
    holes), and its data is read into one buffer: a fresh MiB per read cost as much as the hash."""
    h, pos = hashlib.sha256(), 0
    buf = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for start, length in [*data_extents(fd, size), (size, 0)]:
            while pos < start:
                n = min(CHUNK, start - pos)
                h.update(ZEROS[:n])
                pos += n
            f.seek(pos)
            while pos < start + length:
                n = f.readinto(buf[:min(CHUNK, start + length - pos)])
                if not n:  # shorter than it was a moment ago
                    return {"size": pos, "sha256": h.hexdigest()}
                h.update(buf[:n])
                pos += n
    return {"size": pos, "sha256": h.hexdigest()}


def file_records(entry_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of every file of an entry but its manifest.json."""
    d = Path(entry_dir)
    return {p.name: file_record(p) for p in sorted(d.iterdir()) if p.name != MANIFEST and p.is_file()}


def inputs_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored manifest.json that is hashed into the key (all but "files")."""
    return {k: v for k, v in manifest.items() if k != "files"}


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True, indent=1) + "\n"


class RemoteError(UserError):
    """Base of what the remote store raises; the caller warns once and builds locally."""


class RemoteUnavailable(RemoteError):
    """Registry down, timed out, 5xx, credentials refused, or an answer the spec does not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="building locally instead; check LDT_REMOTE and the registry")


class EntryCorrupt(RemoteError):
    """A pulled entry (or a local one about to be pushed) does not match its recorded digests."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="the entry was not used; it is built locally instead")


class Shared(Protocol):
    """A store shared by a fleet (remote.RegistryStore): what Store asks of it. Each call raises
    RemoteUnavailable when the registry cannot be used, EntryCorrupt when an entry is damaged."""

    @property
    def push(self) -> bool:
        """False: pull only (a pull-request runner: LDT_REMOTE_PUSH=0)."""
        ...

    def pull_entry(self, row: str, key: str, work: Path, *, blocks: BlockStore, seeds: Collection[Seed] = ()) -> bool:
        """The entry's files and manifest.json into work, every byte checked, fetching only the
        blocks `blocks` (the store's block store) lacks, copying those local seed files hold; False
        on a miss."""
        ...

    def push_entry(self, row: str, key: str, entry: Path, *, tmp_dir: Path, blocks: BlockStore) -> bool:
        """Share a finished entry, its blocks kept in `blocks`; False when the registry had it already."""
        ...

    def keys(self, row: str) -> list[str]:
        """The keys the registry holds for a row."""
        ...
