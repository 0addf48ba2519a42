"""Pack files of zstd-compressed blocks, and the local block store that holds them.

A pack (packs/<sha256 of the pack>.pack, so its name is its OCI blob digest) is append-only
while written, immutable once named:

    "LDTPACK1"                          8 bytes
    frame, frame, …                     each one zstd frame of up to FRAME_BLOCKS blocks of BLOCK bytes
    trailer                             one zstd frame: per block TRAILER_ENTRY (digest, frame offset,
                                        frame length, slot in the frame), in the order written
    footer                              FOOTER: magic, trailer offset, trailer length, sha256 of the trailer

So a pack verifies alone (verify_pack: footer → trailer → every frame → every block's digest),
and a reader that knows one block's (pack, frame offset, frame length) fetches just that frame:
one HTTP Range request on a registry blob. Frames group FRAME_BLOCKS consecutive new blocks
(64 KiB before compression): one frame per 4 KiB block compresses worse and costs a request
per block; blocks written together (one file's data) are mostly needed together. The numbers
are in bench/bench_blocks.py.

The local store (BlockStore, a folder):

    packs/<name>.pack    finished packs (fsynced, renamed into place, then indexed)
    tmp/                 a pack being written; never looked up
    index.sqlite         digest -> (pack, frame offset, frame length, slot); packs -> size, blocks

A pack is renamed into packs/ before its rows are committed, so a crash leaves at most a pack
nothing points at (reindex() adopts it), never a row naming bytes that are not there. Every
block read is checked against its digest before use; a damaged pack is one BlockCorrupt line
(the caller makes the artifact again).

For the store: `root = bs.put_index(bs.put(path))` keeps a file as blocks and
returns a small Index to keep (root.to_bytes(), a few hundred KiB for a 1 GiB disk image);
`bs.materialize(Index.from_bytes(data), dest)` makes the file again or raises BlockCorrupt (a
UserError: one line, then build); `bs.missing(index)` and `bs.locate(digest)` say what a pull
lacks and which byte range of which pack (an OCI blob named by its sha256) holds it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import os
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard

from pipeline import regzip
from pipeline.blocks import (
    BLOCK,
    HOLE,
    READ,
    BlockCorrupt,
    Gzip,
    Index,
    IndexBuilder,
    Layout,
    digest,
    index_chunks,
    is_zero,
    padded,
)
from pipeline.entries import file_record
from pipeline.files import atomic_path, fsync_path
from pipeline.run import log
from pipeline.seeds import Seed, Share, Sink, Source, offsets, shares_extents

PACK_MAGIC = b"LDTPACK1"
FOOTER = struct.Struct(">8sQI32s")  # magic, trailer offset, trailer length, sha256 of the trailer bytes
TRAILER_ENTRY = struct.Struct(">32sQIH")  # block digest, frame offset, frame length, slot in the frame
PREFIXED = struct.Struct(">Q24xQIH")  # the same, the digest read as its first 8 bytes (PackReader.learn)
FRAME_BLOCKS = 16  # blocks per zstd frame: 64 KiB before compression
PACK_MAX = 32 << 20  # a pack is closed once it holds this many compressed bytes
MAX_TRAILER = 64 << 20  # a pack trailer larger than this is not one of ours
LEVEL = 3  # zstd level of the frames
COMPACT_THRESHOLD = 0.5  # a pack whose live share is under this is compacted, locally and in the registry ...
COMPACT_MIN_DEAD = 256 << 10  # ... when that frees at least this many bytes (why both: regcompact.py)
FRAME_CACHE = 32  # decompressed frames a reader keeps (2 MiB): blocks read out of their pack's order
BATCH = 256  # blocks looked up in the index with one query (SQLite allows 999 parameters at least)
WORKERS = min(4, os.cpu_count() or 1)  # threads that write a FIXED file's shares (write_shares)
CACHE_KIB = 32768  # SQLite's page cache for the index (hello's whole chain: ~20 MiB of index)
FILES_KEPT = 64  # block indexes of whole files kept for seeds (record_file), the newest


class Location(NamedTuple):  # a tuple: made per block by the hundred thousand (a frozen dataclass cost 2 s a pull)
    pack: str  # the pack's name (sha256 hex of its bytes)
    offset: int  # of the block's frame in the pack
    length: int  # of the frame (compressed)
    slot: int  # the block's place in the frame


@dataclass(frozen=True)
class Made:
    """A pack a PackWriter finished: its name, bytes and (digest, location) of its blocks."""

    name: str
    size: int
    blocks: tuple[tuple[bytes, Location], ...]


Have = Callable[[list[bytes]], Collection[bytes]]  # which of these blocks not to write
Found = tuple[dict[str, dict[int, int]], dict[int, int], list[str]]  # PackReader.learn()'s
# A block PackReader.learn() placed is one int: (((pack's number << 32 | frame offset) << 24 | frame
# length) << 4) | slot. A place that does not fit (a pack of 4 GiB) decodes to a block that fails its
# check, and the index is asked: slower, never wrong.
SLOT_BITS, LENGTH_BITS, OFFSET_BITS = 4, 24, 32
assert FRAME_BLOCKS <= 1 << SLOT_BITS and PACK_MAX < 1 << OFFSET_BITS


@dataclass(frozen=True)
class Stats:
    packs: int
    blocks: int
    stored: int  # bytes of pack files


def read_trailer(path: Path) -> list[tuple[bytes, Location]]:
    """A local pack's own index, checked against the footer's digest."""
    return _locations(path.name.removesuffix(".pack"), _local_trailer(path))


def _local_trailer(path: Path) -> bytes:
    name = path.name.removesuffix(".pack")
    try:
        with open(path, "rb") as f:

            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            return _trailer(name, f.seek(0, os.SEEK_END), read)
    except OSError as e:
        raise BlockCorrupt(f"pack {name[:12]} is unreadable ({e.strerror})") from None


def trailer_of(name: str, size: int, read: Callable[[int, int], bytes]) -> list[tuple[bytes, Location]]:
    """A pack's own index, checked against the footer's digest, whatever holds its `size` bytes:
    read(start, end) gives bytes [start, end) of it (a local file, or Range requests to a registry)."""
    return _locations(name, _trailer(name, size, read))


def _locations(name: str, trailer: bytes) -> list[tuple[bytes, Location]]:
    return [(d, Location(name, off, n, slot)) for d, off, n, slot in TRAILER_ENTRY.iter_unpack(trailer)]


def _trailer(name: str, size: int, read: Callable[[int, int], bytes]) -> bytes:
    """The trailer's entries (TRAILER_ENTRY each), checked."""
    if size < len(PACK_MAGIC) + FOOTER.size:
        raise BlockCorrupt(f"pack {name[:12]} is damaged (too short: {size} bytes)")
    magic, offset, length, want = FOOTER.unpack(read(size - FOOTER.size, size))
    if magic != PACK_MAGIC or offset + length > size - FOOTER.size or length > MAX_TRAILER:
        raise BlockCorrupt(f"pack {name[:12]} is damaged (no valid footer)")
    raw = read(offset, offset + length)
    if hashlib.sha256(raw).digest() != want:
        raise BlockCorrupt(f"pack {name[:12]} is damaged (its trailer does not match the footer's digest)")
    try:
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=16 * MAX_TRAILER)
    except zstandard.ZstdError:
        raise BlockCorrupt(f"pack {name[:12]} is damaged (its trailer does not decompress)") from None


_THREAD = threading.local()  # a zstd context per thread, not one made per frame


def decompress_frame(data: bytes, loc: Location) -> bytes:
    dctx = getattr(_THREAD, "dctx", None)
    if dctx is None:
        dctx = _THREAD.dctx = zstandard.ZstdDecompressor()
    try:
        raw = dctx.decompress(data, max_output_size=FRAME_BLOCKS * BLOCK)
    except zstandard.ZstdError:
        raise BlockCorrupt(f"pack {loc.pack[:12]} is damaged (the frame at offset {loc.offset} "
                           "does not decompress)") from None
    if len(raw) % BLOCK or not raw:
        raise BlockCorrupt(f"pack {loc.pack[:12]} is damaged (the frame at offset {loc.offset} "
                           f"holds {len(raw)} bytes)")
    return raw


def block_of(frame: bytes, d: bytes, loc: Location) -> bytes:
    """The block in a frame, checked against its digest."""
    block = frame[loc.slot * BLOCK:(loc.slot + 1) * BLOCK]
    if len(block) != BLOCK or hashlib.sha256(block).digest() != d:
        raise BlockCorrupt(f"pack {loc.pack[:12]} is damaged (block {d.hex()[:12]} at offset {loc.offset} "
                           "does not match its digest)")
    return block


def verify_pack(path: Path) -> int:
    """Every block of a pack against its digest, the pack's name against its bytes; the count."""
    entries = read_trailer(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ):
            h.update(chunk)
        if h.hexdigest() != path.name.removesuffix(".pack"):
            raise BlockCorrupt(f"pack {path.name[:12]} is damaged (its bytes do not match its name)")
        frames: dict[int, bytes] = {}
        for d, loc in entries:
            if loc.offset not in frames:
                frames.clear()
                f.seek(loc.offset)
                frames[loc.offset] = decompress_frame(f.read(loc.length), loc)
            block_of(frames[loc.offset], d, loc)
    return len(entries)


SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (digest BLOB PRIMARY KEY, pack TEXT NOT NULL, offset INTEGER NOT NULL,
                                   length INTEGER NOT NULL, slot INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs (name TEXT PRIMARY KEY, size INTEGER NOT NULL, blocks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (sha256 TEXT PRIMARY KEY, root BLOB NOT NULL, at REAL NOT NULL);
"""


@dataclass(frozen=True)
class BlockStore:
    """A folder of packs and the index of the blocks in them."""

    root: Path
    frame_blocks: int = FRAME_BLOCKS  # blocks per zstd frame of the packs it writes
    pack_max: int = PACK_MAX

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def pack_path(self, name: str) -> Path:
        return self.packs / f"{name}.pack"

    @contextlib.contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        self.packs.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.root / "index.sqlite", timeout=60)
        try:
            con.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # look-ups of random digests: keep the B-tree in memory
            con.executescript(SCHEMA)
            yield con
        finally:
            con.close()

    # -- writing ----------------------------------------------------------------------------------

    def put_file(self, path: Path, layout: Layout = Layout.FIXED, *, have: Have | None = None,
                 made: list[Made] | None = None) -> Index:
        """Store a file's blocks (the new ones); its index."""
        with open(path, "rb") as f:
            entries, size, sha = self.put_stream(f, layout, have=have, made=made)
        return Index(size, sha, layout, entries)

    def put_tgz(self, path: Path, *, have: Have | None = None, made: list[Made] | None = None) -> Index:
        """A gzipped tar as its tar's blocks (cut per member) plus the command that compresses it
        back to the same bytes; as its compressed bytes when no known command does (regzip)."""
        cmd = regzip.probe(path)
        if cmd is not None:
            with regzip.Recompressing(path, cmd) as stream:
                entries, tar_size, tar_sha = self.put_stream(stream, Layout.TAR, have=have, made=made)
            if stream.reproduced:
                return Index(stream.file_size, stream.file_hash.hexdigest(), Layout.TAR, entries,
                             Gzip(cmd, tar_size, tar_sha))
        return self.put_file(path, Layout.FIXED, have=have, made=made)

    def put(self, path: Path, *, have: Have | None = None, made: list[Made] | None = None) -> Index:
        """Any artifact: a gzip file through put_tgz, anything else cut FIXED.

        have: which of a batch of blocks not to write (default: those this store holds); the
        registry's push passes the blocks the registry holds, so the packs it writes hold exactly
        what the registry lacks. made: the packs written are appended to it."""
        with open(path, "rb") as f:
            gzipped = f.read(2) == regzip.GZIP_MAGIC
        if gzipped:
            return self.put_tgz(path, have=have, made=made)
        return self.put_file(path, Layout.FIXED, have=have, made=made)

    def writer(self, con: sqlite3.Connection) -> PackWriter:
        return PackWriter(self, con, frame_blocks=self.frame_blocks, pack_max=self.pack_max)

    def put_stream(self, f: BinaryIO, layout: Layout, *, have: Have | None = None,
                   made: list[Made] | None = None) -> tuple[bytes, int, str]:
        """Store a stream's blocks; (index entries, size, sha256 hex). Memory: the entries (36 bytes
        a piece), a pack's worth of digests, a batch of pieces and one frame."""
        builder = IndexBuilder()
        h = hashlib.sha256()
        size = 0
        batch: list[tuple[bytes, bytes]] = []  # (digest, piece): looked up in the index together

        def store_batch() -> None:
            ds = [d for d, _ in batch]
            known = self.known(ds, con) if have is None else have(ds)
            for d, piece in batch:
                if d not in known:
                    writer.add(d, piece)
            batch.clear()

        with self.db() as con, self.writer(con) as writer:
            for piece in layout.pieces(f):
                h.update(piece)
                size += len(piece)
                if is_zero(piece):
                    builder.add_hole(len(piece))
                    continue
                d = digest(piece)
                builder.add(d, len(piece))
                batch.append((d, piece))
                if len(batch) >= BATCH:
                    store_batch()
            store_batch()
        if made is not None:
            made.extend(writer.finished)
        return builder.finish(), size, h.hexdigest()

    def put_index(self, index: Index, *, have: Have | None = None, made: list[Made] | None = None) -> Index:
        """An index kept as blocks too: its entries cut by blocks.index_chunks, each chunk a block;
        what is left (level 1, 36 bytes per ~64 entries) is small. An edit of an artifact stores
        the chunks around the change and a new small root, not a whole new index."""
        if index.level:
            return index
        refs = IndexBuilder()
        with self.db() as con, self.writer(con) as writer:
            batch = [(digest(c), c) for c in index_chunks(index.entries)]
            for i in range(0, len(batch), BATCH):
                part = batch[i:i + BATCH]
                ds = [d for d, _ in part]
                known = self.known(ds, con) if have is None else have(ds)
                for d, chunk in part:
                    if d not in known:
                        writer.add(d, chunk)
                    refs.add(d, len(chunk))
        if made is not None:
            made.extend(writer.finished)
        root = replace(index, entries=refs.finish(), level=1)
        self.record_file(root)  # a seed (its chunks may be only in the registry: then it is skipped)
        return root

    def get_index(self, root: Index) -> Index:
        """The full index of a root put_index made, every chunk checked against its digest."""
        if root.level == 0:
            return root
        parts = []
        with self.db() as con, PackReader(self, con) as reader:
            entries = list(root)
            reader.prefetch([d for d, _ in entries])
            for d, n in entries:
                parts.append(reader.get(d)[:n])
        full = replace(root, entries=b"".join(parts), level=0)
        if sum(n for _, n in full) != full.stream_size:
            raise BlockCorrupt(f"the block index of a {full.size}-byte artifact does not add up to its size")
        return full

    # -- reading ----------------------------------------------------------------------------------

    def locate(self, d: bytes, con: sqlite3.Connection | None = None) -> Location | None:
        if con is None:
            with self.db() as c:
                return self.locate(d, c)
        row = con.execute("SELECT pack, offset, length, slot FROM blocks WHERE digest = ?", (d,)).fetchone()
        return Location(*row) if row else None

    def locate_many(self, digests: list[bytes], con: sqlite3.Connection) -> dict[bytes, Location]:
        """Where each of these blocks is (those the store has), in one query per BATCH."""
        out: dict[bytes, Location] = {}
        for i in range(0, len(digests), BATCH):
            part = digests[i:i + BATCH]
            rows = con.execute(f"SELECT digest, pack, offset, length, slot FROM blocks WHERE digest IN "
                               f"({','.join('?' * len(part))})", part)
            out.update((row[0], Location(*row[1:])) for row in rows)
        return out

    def known(self, digests: list[bytes], con: sqlite3.Connection) -> set[bytes]:
        """Which of these blocks the store has (membership only: no Location built per row)."""
        out: set[bytes] = set()
        for i in range(0, len(digests), BATCH):
            part = digests[i:i + BATCH]
            out.update(row[0] for row in con.execute(
                f"SELECT digest FROM blocks WHERE digest IN ({','.join('?' * len(part))})", part))
        return out

    def pack_names(self, con: sqlite3.Connection) -> set[str]:
        return {n for (n,) in con.execute("SELECT name FROM packs")}

    def missing(self, index: Index) -> set[bytes]:
        """The blocks of an index this store lacks (what a pull would fetch)."""
        with self.db() as con:
            needed = list(self.get_index(index).digests())
            return set(needed) - self.known(needed, con)

    def materialize(self, index: Index, dest: Path, seeds: Collection[Seed] = (), *, whole: bool = False) -> Path:
        """Write the artifact to dest atomically (sparse where it has holes), every block checked
        against its digest before it is written; BlockCorrupt if one cannot be had. A tgz is made
        again by its recorded command and checked against its sha256 as well.

        A FIXED file is written in shares side by side (write_shares), which hashing it whole in
        order would not allow. Its blocks checked, it is what its index says; that the index is
        the file its sha256 names was settled when this store's put() cut it (one pass hashed
        both). An index from elsewhere (a registry's) proves nothing of the kind: whole=True
        hashes the written file against the index's sha256 too. (The callers compare the root's
        size and sha256 with the manifest's; `doit store_verify` hashes plain files whole.)

        seeds: local files that may hold many of its blocks (seeds.py); those are read from them,
        each checked all the same."""
        root, index = index, self.get_index(index)
        with atomic_path(dest) as tmp:
            if index.gzip:
                regzip.compress_into(index.gzip, lambda out: self.write_stream(index, out), tmp)
            else:
                self.write_shares(index, tmp, seeds, name=dest.name)
            if (index.gzip or whole) and file_record(tmp)["sha256"] != index.sha256:
                raise BlockCorrupt(f"{dest.name} made from blocks does not match its recorded sha256")
            fsync_path(tmp)
        fsync_path(dest.parent)
        self.record_file(root)
        return dest

    def write_stream(self, index: Index, out: BinaryIO) -> None:
        """The entries' bytes into out, in order (holes as zeros: a compressor's pipe), every
        block checked; a Sink writes the pieces on a thread of its own."""
        with Sink(out) as sink, self.db() as con, PackReader(self, con) as reader:
            for i in range(0, len(index), BATCH):
                reader.emit(index.slice(i, i + BATCH), sink)

    def write_shares(self, index: Index, path: Path, seeds: Collection[Seed] = (), *, name: str = "") -> None:
        """A FIXED file at path: truncated to its size (the holes), then WORKERS threads each
        write a share of its entries at their offsets, with a PackReader and an index connection
        of its own (what the readers learn of the packs they share: PackReader.learn). zstd,
        sha256 and pwrite let go of the GIL: on two cores, hello's ext4 from the packs 2.1-2.5 ->
        1.7-2.0 s, its BIOS disk read mostly from the ext4 1.9-4.4 -> 1.2-1.8 s. Blocks the seeds
        hold are read from them (Share.seeded); one line says how many (of the file `name`)."""
        with contextlib.ExitStack() as opened:
            have, names = self._seeded(index, seeds, opened)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            opened.callback(os.close, fd)
            clones = bool(have) and shares_extents(next(iter(have.values()))[0], path.parent)
            os.ftruncate(fd, index.size)
            k = max(1, min(WORKERS, len(index) // BATCH))
            bounds = [len(index) * i // k for i in range(k + 1)]
            starts, at = [], 0  # where each share starts (an entry list would cost 40 MB for an ext4)
            for i, (_, n) in enumerate(index):
                if len(starts) < k and i == bounds[len(starts)]:
                    starts.append(at)
                at += n
            starts += [at] * (k - len(starts))  # (an empty file: its one share starts and ends at 0)
            shares = [Share(fd, start, clones=clones) for start in starts]
            found: Found = ({}, {}, [])  # what the shares' readers learn of the packs, shared
            stop = threading.Event()
            with concurrent.futures.ThreadPoolExecutor(k, thread_name_prefix="ldt-share") as pool:
                jobs = [pool.submit(self._write_share, index, bounds[i], bounds[i + 1], shares[i], have, found, stop)
                        for i in range(k)]
                try:
                    for job in jobs:
                        job.result()
                finally:
                    stop.set()
            copied = sum((s.copied for s in shares), collections.Counter())
            bad = sum((s.mismatched for s in shares), collections.Counter())
            if copied:
                log(f"{name}: {BLOCK * copied.total() / 2**20:.0f} MiB of its blocks read from "
                    f"{', '.join(names[seed] for seed in sorted(copied))}")
            if bad:
                log(f"{name}: {bad.total()} of the blocks read from {', '.join(names[seed] for seed in sorted(bad))} "
                    "did not match their digests (changed since recorded); taken from the packs instead")

    def _write_share(self, index: Index, lo: int, hi: int, share: Share, have: dict[bytes, Source], found: Found,
                     stop: threading.Event) -> None:
        """One share, entries lo..hi: runs of blocks a seed holds from the seed, the rest from the packs."""
        with self.db() as con, PackReader(self, con, found) as reader:
            todo: list[tuple[bytes, int]] = []  # for the reader, in order, before the next run of a seed
            run: tuple[int, int, list[bytes]] | None = None  # a seed's fd, offset and blocks
            for d, length in (e for i in range(lo, hi, BATCH) for e in index.slice(i, min(i + BATCH, hi))):
                src = have.get(d) if have else None
                if src is None or length != BLOCK:
                    if run:
                        share.seeded(*run, reader.get)
                        run = None
                    todo.append((d, length))
                    if len(todo) >= BATCH:
                        if stop.is_set():
                            return
                        reader.emit(todo, share)
                        todo = []
                    continue
                if todo:
                    reader.emit(todo, share)
                    todo = []
                if run and run[0] == src[0] and run[1] + len(run[2]) * BLOCK == src[1]:
                    run[2].append(d)
                else:
                    if run:
                        share.seeded(*run, reader.get)
                    run = (src[0], src[1], [d])
            if run:
                share.seeded(*run, reader.get)
            if todo:
                reader.emit(todo, share)
            share.flush()

    def _seeded(self, index: Index, seeds: Collection[Seed],
                opened: contextlib.ExitStack) -> tuple[dict[bytes, Source], dict[int, str]]:
        """Where the seeds hold blocks of a FIXED file (their recorded block indexes), the seeds
        opened; and the names of the seeds by their file descriptors."""
        have: dict[bytes, Source] = {}
        names: dict[int, str] = {}
        if index.layout is not Layout.FIXED:
            return have, names
        for seed in seeds:
            root = self.file_root(seed.sha256)
            if root is None or root.layout is not Layout.FIXED or root.gzip:
                continue
            try:
                full = self.get_index(root)
                f = opened.enter_context(open(seed.path, "rb"))  # noqa: SIM115
            except (BlockCorrupt, OSError):
                continue
            if os.fstat(f.fileno()).st_size == full.size:
                offsets(full, f.fileno(), have)
                names[f.fileno()] = seed.path.name
        return have, names

    def record_file(self, root: Index) -> None:
        """Remember a whole file's block index (a root put_index made) by its sha256: a seed."""
        if root.level != 1:
            return
        with self.db() as con, con:
            con.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (root.sha256, root.to_bytes(), time.time()))
            con.execute("DELETE FROM files WHERE sha256 NOT IN (SELECT sha256 FROM files ORDER BY at DESC LIMIT ?)",
                        (FILES_KEPT,))

    def file_root(self, sha256: str) -> Index | None:
        with self.db() as con:
            row = con.execute("SELECT root FROM files WHERE sha256 = ?", (sha256,)).fetchone()
        try:
            return Index.from_bytes(row[0]) if row else None
        except BlockCorrupt:
            return None

    # -- compacting (packed.py's sweep) -----------------------------------------------------------

    def compact(self, names: Collection[str], live: Collection[bytes]) -> tuple[int, int]:
        """Copy the `live` blocks of the packs `names` into new packs, point the index at the
        copies, delete those packs: (bytes freed, bytes written). Every block is checked as it is
        read. A crash before the index moves leaves the new packs unused, one after it the old
        ones: either way the next sweep deletes what no block row names."""
        names = sorted(set(names))
        if not names:
            return 0, 0
        marks = ", ".join("?" * len(names))
        with self.db() as con:
            old = con.execute(f"SELECT coalesce(sum(size), 0) FROM packs WHERE name IN ({marks})", names).fetchone()[0]
            moving = sorted((Location(p, off, n, slot), d) for d, p, off, n, slot in con.execute(
                f"SELECT digest, pack, offset, length, slot FROM blocks WHERE pack IN ({marks})", names) if d in live)
            with PackReader(self, con) as reader, self.writer(con) as writer:
                for loc, d in moving:  # in pack order: each frame decompressed once
                    writer.add(d, reader.block(d, loc))
            copies = [(d, loc) for made in writer.finished for d, loc in made.blocks]
            with con:  # the block rows move to the copies at once (finish_pack left them as they were)
                con.executemany("UPDATE blocks SET pack = ?, offset = ?, length = ?, slot = ? WHERE digest = ?",
                                ((loc.pack, loc.offset, loc.length, loc.slot, d) for d, loc in copies))
                con.executemany("DELETE FROM blocks WHERE pack = ?", ((n,) for n in names))
                con.executemany("DELETE FROM packs WHERE name = ?", ((n,) for n in names))
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                self.pack_path(n).unlink()
        return old, sum(made.size for made in writer.finished)

    # -- inspection -------------------------------------------------------------------------------

    def stats(self) -> Stats:
        with self.db() as con:
            packs, stored, blocks = con.execute("SELECT count(*), coalesce(sum(size), 0), "
                                                "coalesce(sum(blocks), 0) FROM packs").fetchone()
        return Stats(packs, blocks, stored)

    def verify(self) -> list[str]:
        """Every pack checked whole; one line per damaged one."""
        bad = []
        for p in sorted(self.packs.glob("*.pack")):
            try:
                verify_pack(p)
            except BlockCorrupt as e:
                bad.append(e.message)
        return bad

    def reindex(self) -> int:
        """Index the packs in packs/ that the index lacks (a crash after the rename); how many."""
        adopted = 0
        with self.db() as con:
            known = {n for (n,) in con.execute("SELECT name FROM packs")}
            for p in sorted(self.packs.glob("*.pack")):
                name = p.name.removesuffix(".pack")
                if name not in known:
                    _index_pack(con, name, p.stat().st_size, read_trailer(p))
                    adopted += 1
        return adopted


def _index_pack(con: sqlite3.Connection, name: str, size: int, entries: list[tuple[bytes, Location]]) -> None:
    with con:  # one transaction: every row of the pack or none
        con.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?, ?)",  # in key order: faster
                        ((d, name, loc.offset, loc.length, loc.slot) for d, loc in sorted(entries, key=lambda e: e[0])))
        con.execute("INSERT OR REPLACE INTO packs VALUES (?, ?, ?)", (name, size, len(entries)))


class PackWriter:
    """New blocks into packs: a frame per FRAME_BLOCKS blocks, a new pack past PACK_MAX bytes.
    Leaving the block with an exception removes the unfinished pack (finished ones stay: they are
    complete and indexed, merely unreferenced)."""

    def __init__(self, store: BlockStore, con: sqlite3.Connection, *, level: int = LEVEL,
                 frame_blocks: int = FRAME_BLOCKS, pack_max: int = PACK_MAX) -> None:
        self.store, self.con = store, con
        self.frame_blocks, self.pack_max = frame_blocks, pack_max
        self.cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self.file: BinaryIO | None = None
        self.tmp: Path | None = None
        self.frame: list[bytes] = []
        self.frame_digests: list[bytes] = []
        self.pending: set[bytes] = set()  # blocks in the unfinished pack
        self.trailer = bytearray()
        self.hash = hashlib.sha256()
        self.offset = 0
        self.new_blocks = 0
        self.finished: list[Made] = []  # the packs this writer closed

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            self.finish_pack()
        elif self.file is not None:
            self.file.close()
            assert self.tmp is not None
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()

    def add(self, d: bytes, piece: bytes) -> bool:
        """Keep a block the store lacks (the caller asked the index) unless this writer has it;
        True if it is new."""
        if d in self.pending:
            return False
        self.pending.add(d)
        self.frame.append(padded(piece))
        self.frame_digests.append(d)
        self.new_blocks += 1
        if len(self.frame) >= self.frame_blocks:
            self._flush_frame()
            if self.offset >= self.pack_max:
                self.finish_pack()
        return True

    def _write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(data)
        self.hash.update(data)
        self.offset += len(data)

    def _flush_frame(self) -> None:
        if not self.frame:
            return
        if self.file is None:
            self.store.tmp.mkdir(parents=True, exist_ok=True)
            self.tmp = self.store.tmp / f"pack-{os.getpid()}-{id(self)}-{os.urandom(4).hex()}"
            self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish_pack or __exit__)
            self._write(PACK_MAGIC)
        data = self.cctx.compress(b"".join(self.frame))
        at = self.offset
        self._write(data)
        for slot, d in enumerate(self.frame_digests):
            self.trailer += TRAILER_ENTRY.pack(d, at, len(data), slot)
        self.frame, self.frame_digests = [], []

    def finish_pack(self) -> None:
        """Close the pack: trailer, footer, fsync, rename into packs/, then index its blocks."""
        self._flush_frame()
        if self.file is None:
            return
        assert self.tmp is not None
        trailer = zstandard.ZstdCompressor(level=LEVEL).compress(bytes(self.trailer))
        at = self.offset
        self._write(trailer)
        self._write(FOOTER.pack(PACK_MAGIC, at, len(trailer), hashlib.sha256(trailer).digest()))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = self.hash.hexdigest()
        final = self.store.pack_path(name)
        os.replace(self.tmp, final)
        fsync_path(self.store.packs)
        entries = [(d, Location(name, off, n, slot)) for d, off, n, slot in TRAILER_ENTRY.iter_unpack(self.trailer)]
        _index_pack(self.con, name, final.stat().st_size, entries)
        self.finished.append(Made(name, final.stat().st_size, tuple(entries)))
        self.file, self.tmp = None, None
        self.pending.clear()
        self.trailer = bytearray()
        self.hash = hashlib.sha256()
        self.offset = 0


class PackReader:
    """Blocks by digest, through a few cached decompressed frames, each block checked."""

    def __init__(self, store: BlockStore, con: sqlite3.Connection, found: Found | None = None) -> None:
        self.store, self.con = store, con
        self.files: dict[str, BinaryIO] = {}
        self.frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.where: dict[bytes, Location] = {}  # the locations of the blocks of the current batch
        # per pack read from, its frames' offsets and lengths; the blocks of those packs (learn()):
        # shared by the readers of one file's shares (found), which are threads of one process
        self.lengths, self.learned, self.names = found if found is not None else ({}, {}, [])
        self.frame, self.slot = b"", -1  # emit(): the frame of the last block it gave, and its slot
        self.at = ("", 0, 0)  # ... and that frame's pack, offset and length

    def prefetch(self, digests: list[bytes]) -> None:
        self.where = self.store.locate_many(digests, self.con)

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, *_: object) -> None:
        for f in self.files.values():
            f.close()

    def emit(self, part: list[tuple[bytes, int]], sink: Sink) -> None:
        """The bytes of index entries into the sink, in order, every block checked; holes as holes.

        Blocks written together sit together in a pack, so the block after the one before is
        tried first (the next slot, or the first of the pack's next frame): the sha256 that checks
        it also finds it, and the index is asked only when it is not that one (hello's tgz from a
        store it was put in alone: 3,075 look-ups for 175,000 blocks, 14,140 before the next frame
        was tried). Blocks that follow each other in a frame go to the sink as one slice of it:
        per block, little more than its sha256."""
        sha256 = hashlib.sha256

        def send(view: memoryview, run_from: int, run_to: int) -> None:
            if run_to > run_from:
                sink.block(view[run_from:run_to])

        frame, slot, at = self.frame, self.slot, self.at
        view = memoryview(frame)
        run_from = run_to = -1  # the checked bytes of `view` not yet sent
        for d, length in part:
            start = (slot + 1) * BLOCK
            if d == HOLE:
                send(view, run_from, run_to)
                run_from = run_to = -1
                sink.hole(length)
                continue
            if start + BLOCK <= len(frame) and sha256(view[start:start + BLOCK]).digest() == d:
                slot += 1
            else:
                if start >= len(frame) and (after := self.next_frame(at)) and sha256(after[0][:BLOCK]).digest() == d:
                    (frame, at), slot = after, 0
                else:
                    _, loc = self.located(d)
                    frame, slot, at = self.frames[(loc.pack, loc.offset)], loc.slot, (loc.pack, loc.offset, loc.length)
                send(view, run_from, run_to)
                view, run_from, run_to = memoryview(frame), -1, -1
                start = slot * BLOCK
            if start != run_to:  # not where the run ends (a block before it was short, or out of order)
                send(view, run_from, run_to)
                run_from = start
            run_to = start + length
        send(view, run_from, run_to)
        self.frame, self.slot, self.at = frame, slot, at

    def next_frame(self, at: tuple[str, int, int]) -> tuple[bytes, tuple[str, int, int]] | None:
        """The frame after `at` (pack, offset, length) in its pack, decompressed, if there is one."""
        pack, offset, length = at
        if not pack:  # no frame read yet
            return None
        n = self.learn(pack).get(offset + length)
        return None if n is None else (self.frame_at(pack, offset + length, n), (pack, offset + length, n))

    def learn(self, pack: str) -> dict[int, int]:
        """A pack's frames (offset -> length), once, from its checked trailer, which also says where
        each of its blocks is: a block read out of order (a file the artifact holds twice, an ext4's
        file data in a tgz's packs) is then found without asking the index (a restore of hello's
        tgz: about 25,800 look-ups before, 10 now; its ext4: about 5,200, now 8). A block is kept
        as two ints (PREFIXED: its digest's first 8 bytes; where it is, packed), not a digest and
        a tuple: a pull of hello's ext4 peaked at 175 MiB of RSS that way, 155 MiB this way."""
        lengths = self.lengths.get(pack)
        if lengths is None:
            try:
                trailer = _local_trailer(self.store.pack_path(pack))
            except BlockCorrupt:
                trailer = b""  # the index finds the blocks (and says what is wrong, if it is)
            self.names.append(pack)
            i = self.names.index(pack) << OFFSET_BITS  # (the first of two readers that learned it at once)
            lengths = {}
            blocks = {}
            for prefix, off, n, slot in PREFIXED.iter_unpack(trailer):
                lengths[off] = n
                blocks[prefix] = (((i | off) << LENGTH_BITS | n) << SLOT_BITS) | slot
            self.learned.update(blocks)  # (whole, then published: another share's reader may look)
            self.lengths[pack] = lengths
        return lengths

    def located(self, d: bytes) -> tuple[bytes, Location]:
        """A block by its digest, checked, and where it is: where a pack read from says (if the
        block there is not it, a digest that shares its first 8 bytes: the index is asked), else
        where the index says."""
        at = self.learned.get(int.from_bytes(d[:8], "big"))
        if at is not None:
            where, slot = at >> SLOT_BITS, at & ((1 << SLOT_BITS) - 1)
            pack_offset, length = where >> LENGTH_BITS, where & ((1 << LENGTH_BITS) - 1)
            loc = Location(self.names[pack_offset >> OFFSET_BITS], pack_offset & ((1 << OFFSET_BITS) - 1), length, slot)
            with contextlib.suppress(BlockCorrupt):
                return self.block(d, loc), loc
        loc = self.where.get(d) or self.store.locate(d, self.con)
        if loc is None:
            raise BlockCorrupt(f"block {d.hex()[:12]} is in no pack of {self.store.root}")
        block = self.block(d, loc)
        self.learn(loc.pack)
        return block, loc

    def get(self, d: bytes) -> bytes:
        return self.located(d)[0]

    def block(self, d: bytes, loc: Location) -> bytes:
        """The block at a location the caller knows, checked."""
        return block_of(self.frame_at(loc.pack, loc.offset, loc.length), d, loc)

    def frame_at(self, pack: str, offset: int, length: int) -> bytes:
        """A frame, decompressed (the last FRAME_CACHE kept)."""
        key = (pack, offset)
        frame = self.frames.get(key)
        if frame is None:
            f = self.files.get(pack)
            if f is None:
                try:
                    f = self.files[pack] = open(self.store.pack_path(pack), "rb")  # noqa: SIM115
                except OSError as e:
                    raise BlockCorrupt(f"pack {pack[:12]} is unreadable ({e.strerror})") from None
            f.seek(offset)
            frame = decompress_frame(f.read(length), Location(pack, offset, length, 0))
            self.frames[key] = frame
            if len(self.frames) > FRAME_CACHE:
                self.frames.popitem(last=False)
        else:
            self.frames.move_to_end(key)
        return frame
