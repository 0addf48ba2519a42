"""The one tar walker: members of a tar (or tar.gz) in archive order, read as one forward stream.

Every reader of an archive goes through it: the tgz stage's filter and the re-rooting filter
(tgz.py, reroot.py) read `docker export`'s or mmdebstrap's stream, the boot and ext4 stages
(rootfs.py, ext4.py) and the app stage's scan read a rootfs.tgz. tarfile parses the headers
(PAX, GNU long names and sparse files, base-256 numbers); the bytes come through one buffer
that only moves forward, so nothing is unpacked and memory stays bounded. A member's data can
be copied as it passes: expanded to a file (copy_to, read), or as the archive's own blocks
(copy_raw: headers and data byte for byte; copy_data: only the data blocks).

An archive must end with its end-of-archive block: one that stops short (a cut download, a
producer that died) is a UserError, never a shorter tree.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import UserError

MiB = 1 << 20
BLOCK = tarfile.BLOCKSIZE
ENCODING, ERRORS = "utf-8", "surrogateescape"  # names that are not UTF-8 come out as the same bytes
Write = Callable[[bytes], object]


class _Chunks:
    """A file-like read() over an iterator of byte chunks (a pipe, the engine's export stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.it = iter(chunks)

    def read(self, n: int = -1) -> bytes:
        return next(self.it, b"")


class _ForwardReader:
    """A decompressing file object that tarfile can use in its seekable mode, forward only.

    tarfile's own stream mode ('r|gz') copies its buffer on every small read; this keeps one
    bytearray and hands out memoryviews, which makes staging 10⁴ files much cheaper. It keeps
    the bytes from `hold` on (the current member's first header), so its blocks can be copied
    as they are once tarfile has parsed them.
    """

    CHUNK = MiB
    KEEP = 4096  # bytes kept behind the read position for tarfile's one-byte look-back

    def __init__(self, raw: BinaryIO | _Chunks, gzip: bool) -> None:
        self.raw = raw
        self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.pos = 0  # index into buf
        self.hold = 0  # stream offset before which bytes may be dropped
        self.total = 0  # bytes taken from raw

    @property
    def off(self) -> int:
        return self.base + self.pos

    def _raw(self) -> bytes:
        data = self.raw.read(self.CHUNK)
        self.total += len(data)
        return data

    def _more(self) -> bool:
        if self.dec is None:
            data = self._raw()
            self.buf += data
            return bool(data)
        data = self.dec.unconsumed_tail or self._raw()
        if not data:
            return False
        self.buf += self.dec.decompress(data, 4 * self.CHUNK)
        if self.dec.eof and self.dec.unused_data:  # concatenated gzip members
            rest = self.dec.unused_data
            self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.buf += self.dec.decompress(rest, 4 * self.CHUNK)
        return True

    def _fill(self, n: int) -> int:
        """Make up to n bytes available at pos; return how many are."""
        while len(self.buf) - self.pos < n:
            if self.pos > 4 * self.CHUNK:
                drop = min(self.pos - self.KEEP, self.hold - self.base)
                if drop > 0:
                    del self.buf[:drop]
                    self.pos -= drop
                    self.base += drop
            if not self._more():
                break
        return min(n, len(self.buf) - self.pos)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while self._more():
                pass
            n = len(self.buf) - self.pos
        n = self._fill(n)
        with memoryview(self.buf) as view:
            data = bytes(view[self.pos : self.pos + n])
        self.pos += n
        return data

    def copy(self, n: int, write: Write | None = None, fd: int | None = None) -> None:
        """Pass the next n bytes to write() (as bytes) or to fd (without a copy)."""
        while n:
            avail = self._fill(min(n, self.CHUNK))
            if not avail:
                raise UserError("unexpected end of archive data")
            if fd is not None:
                avail = os.write(fd, memoryview(self.buf)[self.pos : self.pos + avail])
            elif write is not None:
                with memoryview(self.buf) as view:
                    write(bytes(view[self.pos : self.pos + avail]))
            self.pos += avail
            n -= avail

    def drain(self) -> None:
        """Read what is left of the raw source (a producer must be read to its end)."""
        while self._raw():
            pass

    def tell(self) -> int:
        return self.off

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.off
        elif whence != os.SEEK_SET:
            raise OSError("forward-only stream")
        delta = offset - self.off
        if delta < 0:
            if -delta > self.pos:
                raise OSError("forward-only stream cannot seek back that far")
            self.pos += delta
            return self.off
        while delta:
            k = self._fill(min(delta, self.CHUNK))
            if not k:
                break
            self.pos += k
            delta -= k
        return self.off


class TarStream:
    """Members of a tar or tar.gz in archive order, with their data readable as they pass."""

    def __init__(self, raw: BinaryIO | _Chunks, name: str, *, gzip: bool) -> None:
        self.name = name
        self.reader = _ForwardReader(raw, gzip=gzip)
        self.span = (0, 0)  # the current member's blocks: its first header .. the next member's
        try:
            self.tar = tarfile.open(name=name, fileobj=self.reader, mode="r:", encoding=ENCODING, errors=ERRORS)
        except (tarfile.TarError, zlib.error, EOFError) as e:
            if self.reader.base + len(self.reader.buf) < BLOCK:
                raise self._truncated(e) from e
            raise UserError(f"{name}: not a tar or tar.gz archive ({e})") from e

    @classmethod
    def of_chunks(cls, chunks: Iterable[bytes], name: str = "the tar stream") -> TarStream:
        """An uncompressed tar arriving as byte chunks (a pipe, the engine's export)."""
        return cls(_Chunks(chunks), name, gzip=False)

    @property
    def total(self) -> int:
        """Bytes taken from the source so far (compressed bytes for a tar.gz)."""
        return self.reader.total

    @property
    def global_headers(self) -> dict[str, str]:
        """The PAX records of the archive's global headers so far (tarfile adds them to every member)."""
        return self.tar.pax_headers

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        start = 0
        while True:
            self.reader.hold = start
            try:
                member = self.tar.next()
            except (tarfile.TarError, zlib.error, EOFError) as e:
                raise self._truncated(e) from e
            if member is None:
                self._check_end()
                return
            self.tar.members.clear()  # stream: don't keep every header in memory
            self.span = (start, self.tar.offset)
            yield member
            start = self.tar.offset

    def _truncated(self, cause: object = None) -> UserError:
        why = f" ({cause})" if cause else ""
        return UserError(f"{self.name}: ended early (truncated archive){why}",
                         hint="make or download the archive again")

    def _check_end(self) -> None:
        """tarfile takes a cut or corrupt header for the end: only a zero block is one. Then
        read the rest of the source."""
        self.reader.seek(self.tar.offset)
        if self.reader.read(BLOCK) != bytes(BLOCK):
            raise self._truncated()
        self.reader.drain()

    def copy_to(self, member: tarfile.TarInfo, fd: int) -> None:
        """Write a regular member's bytes to fd (call while it is the current member)."""
        if member.sparse is not None:
            src = self.tar.extractfile(member)
            assert src is not None
            while chunk := src.read(MiB):
                os.write(fd, chunk)
            return
        self.reader.seek(member.offset_data)
        self.reader.copy(member.size, fd=fd)

    def read(self, member: tarfile.TarInfo) -> bytes:
        self.reader.seek(member.offset_data)
        data = self.reader.read(member.size)
        if len(data) < member.size:
            raise self._truncated()
        return data

    def copy_raw(self, member: tarfile.TarInfo, write: Write) -> None:
        """The current member's blocks as they are in the archive: the extended headers before it
        (PAX, global, GNU long names), its header, its data and padding."""
        start, end = self.span
        self.reader.seek(start)
        self._copy(end - start, write)

    def copy_data(self, member: tarfile.TarInfo, write: Write) -> None:
        """The current member's data blocks, padding included, as they are in the archive."""
        self.reader.seek(member.offset_data)
        self._copy(self.span[1] - member.offset_data, write)

    def _copy(self, n: int, write: Write) -> None:
        try:
            self.reader.copy(n, write)
        except UserError as e:
            raise self._truncated() from e


@contextlib.contextmanager
def open_tar(path: Path) -> Iterator[TarStream]:
    """A tar or tar.gz file (gzip told by its magic), as a TarStream."""
    try:
        raw = open(path, "rb", buffering=0)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such archive") from e
    with raw:
        gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        yield TarStream(raw, os.fspath(path), gzip=gzip)


# ── names inside an archive ──────────────────────────────────────────────────────────────────


def member_path(member: tarfile.TarInfo) -> str:
    """Archive name normalised to a relative path without ./ and trailing /; '' is the root."""
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(f"unsafe path in archive: {member.name!r}")
    return "/".join(parts)


def norm_name(name: str) -> str:
    """An archive name without leading ./ and / (lenient: for matching, never for writing)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def resolve_link(path: str, symlinks: dict[str, str], limit: int = 40) -> str:
    """Resolve path inside the archive through its symlinks (any component), as a relative path."""
    parts = path.split("/")
    done: list[str] = []
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([*done, part])
        target = symlinks.get(candidate)
        if target is None:
            done.append(part)
            continue
        limit -= 1
        if limit < 0:
            raise UserError(f"symlink loop in archive at /{candidate}")
        if target.startswith("/"):
            done = []
        parts = target.split("/") + parts
    return "/".join(done)
