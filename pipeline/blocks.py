"""Cutting an artifact into content-addressed 4 KiB blocks, and the index that puts them back.

An artifact (a file of the store) is a sequence of pieces; each piece is at most BLOCK bytes and
is stored as one block: the piece zero-padded to BLOCK bytes, named by the sha256 of those
BLOCK bytes. The index lists, in file order, (digest, length) per piece: `length` bytes of the
block are the file's. So the last, partial piece of a file's data in a tar and the
zero-padded last block of the same file in an ext4 image are one stored block. A piece of
zeros is a hole (digest HOLE): it costs an index entry and nothing else, and neighbouring
holes merge into one entry.

How an artifact is cut is its Layout. Measured on hello (bench/bench_blocks.py; MiB of A not
held by B, zeros excluded, before compression):

                                    fixed 4 KiB   FastCDC avg 4K   FastCDC avg 16K
    bios.img / uefi.img not in ext4     43.3            1.3              1.8
      ... since the FAT and UKI put file data on 4 KiB blocks (disk.py)   0.3 / 0.2
    the tar (per member) not in ext4    10.5           76.6            153.1
    rev2's ext4 not in rev1's           12.4           25.1             51.6
    unique bytes of all five           760.6          747.9            865.1

- FIXED: every BLOCK bytes from offset 0. ext4 images are made of 4 KiB blocks and the disk
  images put their partitions at 1 MiB offsets, so a file's data in the ext4 and in both disks
  are the same blocks. FastCDC won only on the FAT partitions (then 512-byte clusters whose data
  area started 1 KiB past a 4 KiB boundary, and the UKI's sections at 512-byte file
  alignment); it loses 2x across revisions and 7x on the tar. disk.py now aligns the FAT's
  clusters and the UKI's kernel and initrd to 4 KiB, which gave fixed blocks those 43 MiB too:
  hello's whole chain is 1.05x its tgz in blocks (1.42x before).
- TAR: per tar member: a regular file's data is cut in BLOCK pieces from its first byte, so it
  gives the blocks the ext4 holds for that file; headers, padding and the data of other
  members between two files' data are one run, cut in BLOCK pieces. With the tgz remade by its
  compressor (regzip.py) the 235 MiB tgz costs 5.0 MiB on top of its ext4, instead of 236 MiB.

An index is itself kept as blocks (index_chunks, packs.BlockStore.put_index): a whole index is
36 bytes per piece (5 MiB for hello's ext4, 22 MiB per revision of its chain), which alone would
be twice the growth a one-line edit is allowed; as content-defined chunks of entries plus a
small root, a revision stores the chunks around its change (hello: 2.4 MiB of blocks and
0.4 MiB of roots for the whole chain, 0.012x its tgz).

This module only cuts and describes; packs.py stores the blocks.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from pipeline.errors import UserError

BLOCK = 4096
ZEROS = bytes(BLOCK)
HOLE = bytes(32)  # the digest of an index entry that is a run of zeros (no stored block)
READ = 1 << 20  # how much is read from a file at a time
TAR_BLOCK = 512
MAX_RUN = 0xFFFFFFFF - BLOCK  # the longest hole one index entry holds (its length is a u32)
ENTRY = struct.Struct(">32sI")  # an index entry: digest, length
INDEX_MAGIC = b"LDTIDX1\n"


class BlockCorrupt(UserError):
    """A pack, block or index does not hold what its digest says, a block is missing, or a stream
    does not compress back to its recorded bytes: the artifact cannot be made from the store and
    must be built again."""


def digest(piece: bytes) -> bytes:
    """The name of the block that holds a piece: sha256 of the piece zero-padded to BLOCK bytes."""
    h = hashlib.sha256(piece)
    if len(piece) < BLOCK:
        h.update(ZEROS[len(piece):])
    return h.digest()


def padded(piece: bytes) -> bytes:
    return piece if len(piece) == BLOCK else piece + ZEROS[len(piece):]


def is_zero(piece: bytes) -> bool:
    return piece == ZEROS[:len(piece)]


# -- cutting ------------------------------------------------------------------------------------


def fixed_pieces(f: BinaryIO | _Exact) -> Iterator[bytes]:
    """Every BLOCK bytes of a stream (the last piece may be shorter)."""
    rest = b""
    while chunk := f.read(READ):
        if rest:
            chunk, rest = rest + chunk, b""
        end = len(chunk) - len(chunk) % BLOCK
        for i in range(0, end, BLOCK):
            yield chunk[i:i + BLOCK]
        rest = chunk[end:]
    if rest:
        yield rest


class _Exact:
    """Exact-size reads from a stream, through a buffer of about READ bytes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.buf = b""
        self.pos = 0

    def read(self, n: int) -> bytes:
        """n bytes, fewer only at the end of the stream."""
        if len(self.buf) - self.pos < n:
            parts = [self.buf[self.pos:]]
            have = len(parts[0])
            while have < n:
                chunk = self.f.read(max(READ, n - have))
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            self.buf, self.pos = b"".join(parts), 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _tar_number(field: bytes) -> int | None:
    """A header's numeric field; None if it is not one (not a tar header)."""
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


FILE_TYPES = (b"0", b"\0", b"7")  # tar member types whose data is a file's content
NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: no data, whatever the size says


def tar_pieces(f: BinaryIO) -> Iterator[bytes]:
    """A tar stream cut per member: each regular file's data in BLOCK pieces from its first byte,
    everything between two files' data (headers, padding, PAX records) as runs of BLOCK pieces.
    After the end-of-archive marker, or a header that is none, the rest is cut like FIXED: the
    pieces always add up to the stream, tar or not."""
    r = _Exact(f)
    run = bytearray()

    def flush() -> Iterator[bytes]:
        for i in range(0, len(run), BLOCK):
            yield bytes(run[i:i + BLOCK])
        run.clear()

    while True:
        header = r.read(TAR_BLOCK)
        run += header
        if len(header) < TAR_BLOCK or header == ZEROS[:TAR_BLOCK]:
            break
        size = _tar_number(header[124:136])
        if size is None:  # not a tar (any more): the rest is cut like FIXED, bytes unchanged
            break
        if header[156:157] in NO_DATA_TYPES:
            continue  # like tarfile: no data follows a link, device, dir or fifo header
        padding = -size % TAR_BLOCK
        if header[156:157] in FILE_TYPES and size > 0:
            yield from flush()
            left = size
            while left > 0:
                piece = r.read(min(BLOCK, left))
                if not piece:
                    break  # a truncated archive: what there is, then the end
                left -= len(piece)
                yield piece
            run += r.read(padding)
        else:
            run += r.read(size + padding)  # PAX/GNU long-name records, GNU sparse maps, unknown types
    yield from flush()
    yield from fixed_pieces(r)  # after the end-of-archive marker: the record's padding, zeros


class Layout(enum.StrEnum):
    """How an artifact is cut into pieces."""

    FIXED = "fixed"  # ext4 images, disk images, anything block-aligned or opaque
    TAR = "tar"  # an uncompressed tar: per member

    def pieces(self, f: BinaryIO) -> Iterator[bytes]:
        return tar_pieces(f) if self is Layout.TAR else fixed_pieces(f)


# -- the index ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gzip:
    """How the stored (uncompressed) stream is compressed back into the artifact's exact bytes."""

    cmd: tuple[str, ...]  # e.g. ("pigz", "-1", "-n", "-p", "2"): reads the stream on stdin
    stream_size: int  # the uncompressed stream the entries describe
    stream_sha256: str


@dataclass(frozen=True)
class Index:
    """An artifact as blocks: `entries` is ENTRY.size bytes per piece, in file order."""

    size: int  # the artifact's bytes
    sha256: str  # the artifact's sha256 (hex): a tgz, or a file whose index came from a registry, is hashed against it
    layout: Layout
    entries: bytes
    gzip: Gzip | None = None  # set: the entries describe the uncompressed stream
    level: int = 0  # 1: the entries name blocks that hold the entries (packs.BlockStore.put_index)

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return ENTRY.iter_unpack(self.entries)

    def __len__(self) -> int:
        return len(self.entries) // ENTRY.size

    def slice(self, start: int, stop: int) -> list[tuple[bytes, int]]:
        """Entries start..stop (by entry number)."""
        return list(ENTRY.iter_unpack(self.entries[start * ENTRY.size:stop * ENTRY.size]))

    @property
    def stream_size(self) -> int:
        """The bytes the entries describe (the uncompressed stream of a gzip artifact)."""
        return self.gzip.stream_size if self.gzip else self.size

    def digests(self) -> set[bytes]:
        """The blocks this artifact needs (holes excluded)."""
        return {d for d, _ in self if d != HOLE}

    def to_bytes(self) -> bytes:
        head = {"size": self.size, "sha256": self.sha256, "layout": str(self.layout), "entries": len(self),
                "level": self.level}
        if self.gzip:
            head["gzip"] = {"cmd": list(self.gzip.cmd), "stream_size": self.gzip.stream_size,
                            "stream_sha256": self.gzip.stream_sha256}
        raw = json.dumps(head, sort_keys=True).encode() + b"\n" + self.entries
        return INDEX_MAGIC + zstandard.ZstdCompressor(level=9).compress(raw)

    @classmethod
    def from_bytes(cls, data: bytes) -> Index:
        try:
            if not data.startswith(INDEX_MAGIC):
                raise ValueError("no index magic")
            raw = zstandard.ZstdDecompressor().decompress(data[len(INDEX_MAGIC):])
            line, _, entries = raw.partition(b"\n")
            head = json.loads(line)
            if len(entries) != head["entries"] * ENTRY.size:
                raise ValueError("entry count")
            g = head.get("gzip")
            gz = Gzip(tuple(g["cmd"]), g["stream_size"], g["stream_sha256"]) if g else None
            index = cls(head["size"], head["sha256"], Layout(head["layout"]), entries, gz, head.get("level", 0))
        except (ValueError, KeyError, TypeError, zstandard.ZstdError) as e:
            raise UserError(f"not a block index ({type(e).__name__}: {e})") from None
        if index.level == 0 and sum(n for _, n in index) != index.stream_size:
            raise UserError("not a block index (its entries do not add up to its size)")
        return index


CHUNK_ENTRIES = BLOCK // ENTRY.size  # the most entries one block of an index holds (113)
CHUNK_CUT = 4  # an index chunk ends after an entry whose digest starts with a byte below this (1 in 64)


def index_chunks(entries: bytes) -> Iterator[bytes]:
    """An index's entries in runs of at most one block, cut where the content says (after an entry
    whose digest starts below CHUNK_CUT): an edit changes the runs around it only, and the ext4's
    entries inside a disk image's entries give the same runs (the cut does not depend on offsets)."""
    start, n = 0, 0
    for i in range(0, len(entries), ENTRY.size):
        n += 1
        end = i + ENTRY.size
        if n == CHUNK_ENTRIES or (entries[i] < CHUNK_CUT and entries[i:i + 32] != HOLE):
            yield entries[start:end]
            start, n = end, 0
    if start < len(entries):
        yield entries[start:]


class IndexBuilder:
    """Entries appended in file order; neighbouring holes merge."""

    def __init__(self) -> None:
        self.entries = bytearray()
        self.hole = 0  # zeros not written as an entry yet

    def add(self, d: bytes, length: int) -> None:
        self._end_hole()
        self.entries += ENTRY.pack(d, length)

    def add_hole(self, length: int) -> None:
        self.hole += length
        if self.hole >= MAX_RUN:
            self.entries += ENTRY.pack(HOLE, MAX_RUN)
            self.hole -= MAX_RUN

    def _end_hole(self) -> None:
        if self.hole:
            self.entries += ENTRY.pack(HOLE, self.hole)
            self.hole = 0

    def finish(self) -> bytes:
        self._end_hole()
        return bytes(self.entries)
