"""Where materialized bytes go, and seeds: local files that already hold most of an artifact's
blocks.

A FIXED file (an ext4, a disk) is written in shares, each by a thread of its own (Share: its
pieces at their offsets with os.pwrite; the file was truncated to its size first, so a hole is
a hole). A tgz's tar stream goes to its compressor in order, through a Sink: a thread of its own
writes it to the compressor's pipe.

A disk image's root partition is its rootfs.ext4, block for block (hello's BIOS disk: 181,986
of its 182,057 data blocks are the ext4's, in 2,079 runs). When the ext4 is a plain file here,
those runs are read from it instead of decompressed from the packs; each block is checked
against its digest all the same, and one that does not match (a seed changed since its sha256
was recorded) is taken from the packs. Where the filesystem shares extents (btrfs, XFS) a run
is cloned (FICLONERANGE: no bytes copied) and checked as read back. (os.copy_file_range, used
before, copies through the page cache on ext4 at about 600 MiB/s, and the copy had to be read
back.) Only a file cut FIXED (not a tgz's tar stream) is a seed, and only one whose block index
this store recorded (BlockStore.record_file).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.blocks import BLOCK, HOLE, READ

WRITE_BUFFER = 1 << 20  # materialized bytes are written in pieces of about this
SINK_QUEUE = 8  # pieces queued for the writing thread (memory: about this many MiB)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range): linux/fs.h
NO_CLONE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY, errno.EBADF, errno.EPERM}


def clone_range(src: int, at: int, n: int, dst: int, pos: int) -> bool:
    """n bytes of src from `at` shared into dst at pos (the filesystem's extents, no bytes
    copied); False where it cannot share them (ext4, another filesystem, an unaligned range)."""
    try:
        fcntl.ioctl(dst, FICLONERANGE, struct.pack("qQQQ", src, at, n, pos))
    except OSError as e:
        if e.errno in NO_CLONE:
            return False
        raise
    return True


def shares_extents(src: int, folder: Path) -> bool:
    """Whether the filesystem of `folder` clones blocks of src: tried on src's first block into an
    unnamed file there (not the file being written: truncating that to nothing again would make
    ext4 flush it when it is closed)."""
    try:
        probe = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        return clone_range(src, 0, BLOCK, probe, 0)
    finally:
        os.close(probe)


@dataclass(frozen=True)
class Seed:
    """A local file and the sha256 its entry's manifest.json records for it."""

    path: Path
    sha256: str


Source = tuple[int, int]  # (an open seed's fd, the offset of a block in it)


def offsets(entries: Iterable[tuple[bytes, int]], fd: int, into: dict[bytes, Source]) -> None:
    """Where each full block of a file with these index entries starts (the first of equal ones)."""
    at = 0
    for d, n in entries:
        if d != HOLE and n == BLOCK and d not in into:
            into[d] = (fd, at)
        at += n


class Pieces:
    """Bytes gathered into pieces of about WRITE_BUFFER before they are written (flush())."""

    def __init__(self) -> None:
        self.buf: list[bytes | memoryview] = []
        self.buffered = 0

    def block(self, data: bytes | memoryview) -> None:
        self.buf.append(data)
        self.buffered += len(data)
        if self.buffered >= WRITE_BUFFER:
            self.flush()

    def take(self) -> bytes:
        """The gathered bytes as one piece; none gathered after."""
        piece = b"".join(self.buf)
        self.buf.clear()
        self.buffered = 0
        return piece

    def flush(self) -> None:
        raise NotImplementedError


class Share(Pieces):
    """One share of a FIXED file, written from its offset on: checked pieces (PackReader.emit
    sends them) and holes, which the file, truncated to its size, already is; and runs of a seed
    (seeded()). Its thread's own: shares are written side by side."""

    def __init__(self, fd: int, pos: int, *, clones: bool = False) -> None:
        super().__init__()
        self.fd, self.pos, self.clones = fd, pos, clones
        self.copied: collections.Counter[int] = collections.Counter()  # seed fd -> its blocks used
        self.mismatched: collections.Counter[int] = collections.Counter()  # seed fd -> its blocks not as recorded

    def hole(self, n: int) -> None:
        self.flush()
        self.pos += n

    def flush(self) -> None:
        if self.buf:
            n = self.buffered
            _pwrite(self.fd, self.take(), self.pos)
            self.pos += n

    def seeded(self, src: int, at: int, digests: list[bytes], block: Callable[[bytes], bytes]) -> None:
        """The blocks `digests` from a seed's offset `at` on, each checked against its digest (read
        back where cloned); a block that does not match is block(digest), from the packs."""
        self.flush()
        n = len(digests) * BLOCK
        cloned = self.clones and clone_range(src, at, n, self.fd, self.pos)
        sha256 = hashlib.sha256
        for done in range(0, n, READ):
            data = os.pread(self.fd if cloned else src, min(n - done, READ), (self.pos if cloned else at) + done)
            view = memoryview(data)
            first = done // BLOCK
            bad = [i for i in range(first, first + min(n - done, READ) // BLOCK)
                   if sha256(view[(i - first) * BLOCK:(i - first + 1) * BLOCK]).digest() != digests[i]]
            if not cloned and data:
                _pwrite(self.fd, data, self.pos + done)
            for i in bad:  # (a short read's missing blocks too: their digests never match b"")
                _pwrite(self.fd, block(digests[i]), self.pos + i * BLOCK)
            self.copied[src] += min(n - done, READ) // BLOCK - len(bad)
            self.mismatched[src] += len(bad)
        self.pos += n


def _pwrite(fd: int, data: bytes, pos: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)


class Sink(Pieces):
    """A stream's bytes in order (a tgz's tar, into its compressor): the caller's thread gathers
    them into pieces, a thread of the sink's own writes them, so the caller reads and checks the
    next blocks while a full pipe waits. (No sha256 of the stream: every block is checked, and the
    tgz made of it is checked against its own.) An error of that thread (a broken pipe) is raised
    by the next call or on leaving the block, never lost."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self.out = out
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=SINK_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="ldt-sink", daemon=True)

    def __enter__(self) -> Sink:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self.flush()  # may raise the thread's error: the thread is still told to end
        finally:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error

    # -- the caller's side ----------------------------------------------------------------------

    def hole(self, n: int) -> None:
        while n:
            k = min(n, READ)
            self.block(bytes(k))
            n -= k

    def flush(self) -> None:
        if self.buf:
            if self.error is not None:
                raise self.error
            self.queue.put(self.take())

    # -- the sink's thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drained: the caller sees the error at its next call
            try:
                self.out.write(item)
            except BaseException as e:  # noqa: BLE001 (raised again on the caller's thread)
                self.error = e
