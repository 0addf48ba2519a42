"""Where materialized bytes go: the Sink that hashes and writes them on a thread of its own, and
seeds, local files that already hold most of an artifact's blocks.

A disk image's root partition is its rootfs.ext4, block for block (hello's BIOS disk: 181,986
of its 182,057 data blocks are the ext4's, in 2,079 runs). When the ext4 is a plain file here,
the disk is made by copying those runs from it instead of decompressing and checking the same
blocks again; the rest comes from the packs. Where the filesystem shares extents (btrfs, XFS)
a run is cloned (FICLONERANGE: no bytes copied) and read back for the hash; elsewhere it is
read, hashed and written in one pass. (os.copy_file_range, which clones where it can, copies
through the page cache on ext4 at about 600 MiB/s and then needs the read back: hello's BIOS
disk took 4.1 s seeded against 2.5 s from the packs alone, and 1.5 s this way.) A copied run
is not checked block by block: the whole file's sha256 is, so a seed changed since its sha256
was recorded is a mismatch, and BlockStore.materialize then makes the file from the packs
alone. Only a file cut FIXED (not a tgz's tar stream) is a seed, and only one whose block index
this store recorded (BlockStore.record_file).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import queue
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.blocks import BLOCK, HOLE, READ, BlockCorrupt

WRITE_BUFFER = 1 << 20  # materialized bytes are hashed and written in pieces of about this
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


def shares_extents(src: int, dst: int) -> bool:
    """Whether dst's filesystem clones blocks of src: tried on src's first block into dst, which
    must be empty and is empty again after."""
    try:
        return clone_range(src, 0, BLOCK, dst, 0)
    finally:
        os.ftruncate(dst, 0)


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


class Sink:
    """Materialized bytes in order: blocks, holes (runs of zeros) and runs copied from a seed.

    The caller's thread buffers them into pieces of about WRITE_BUFFER; a thread of the sink's own
    hashes and writes the pieces (sha256 and write() let go of the GIL, so on two cores they
    overlap the reading of the next blocks: hello's ext4 6.6 -> 4.0 s). A run of a seed is read
    by the caller's thread and sent as pieces too, or, where the filesystem shares extents
    (clones=True: shares_extents), cloned by the sink's thread and read back. An error of that
    thread (a full disk) is raised by the next call or on leaving the block, never lost."""

    def __init__(self, out: BinaryIO, *, sparse: bool, clones: bool = False) -> None:
        self.out, self.sparse, self.clones = out, sparse, clones
        self.hash = hashlib.sha256()
        self.queue: queue.Queue[bytes | int | tuple[int, int, int] | None] = queue.Queue(maxsize=SINK_QUEUE)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="ldt-sink", daemon=True)
        self.buf: list[bytes] = []
        self.buffered = 0
        self.run: list[int] | None = None  # [fd, offset, length]: a copy being extended

    def __enter__(self) -> Sink:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                self._flush()  # may raise the thread's error: the thread is still told to end
        finally:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None and exc_type is None:
            raise self.error

    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    # -- the caller's side ----------------------------------------------------------------------

    def block(self, data: bytes) -> None:
        if self.run is not None:  # (the buffer is empty while a run is open: this sends the run)
            self._flush()
        self.buf.append(data)
        self.buffered += len(data)
        if self.buffered >= WRITE_BUFFER:
            self._flush()

    def hole(self, n: int) -> None:
        self._flush()
        self._put(n)

    def copy(self, src: Source, n: int) -> None:
        """n bytes of a seed from src."""
        fd, at = src
        run = self.run
        if run is not None and run[0] == fd and run[1] + run[2] == at:
            run[2] += n
            return
        self._flush()
        self.run = [fd, at, n]

    def _flush(self) -> None:
        if self.buf:
            self._put(b"".join(self.buf))
            self.buf.clear()
            self.buffered = 0
        if self.run is not None:
            fd, at, n = self.run
            self.run = None
            if self.clones:
                self._put((fd, at, n))
                return
            for done in range(0, n, READ):
                data = os.pread(fd, min(n - done, READ), at + done)
                if len(data) < min(n - done, READ):
                    raise BlockCorrupt("a seed file is shorter than its recorded block index")
                self._put(data)

    def _put(self, item: bytes | int | tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    # -- the sink's thread ----------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drained: the caller sees the error at its next call
            try:
                if isinstance(item, bytes):
                    self.hash.update(item)
                    self.out.write(item)
                elif isinstance(item, int):
                    self._zeros(item)
                else:
                    self._copy(*item)
            except BaseException as e:  # noqa: BLE001 (raised again on the caller's thread)
                self.error = e
        if self.error is None and self.sparse:
            try:
                self.out.truncate(self.out.tell())
            except OSError as e:
                self.error = e

    def _zeros(self, n: int) -> None:
        zeros = bytes(min(n, READ))
        left = n
        while left:
            k = min(left, READ)
            self.hash.update(zeros[:k])
            if not self.sparse:
                self.out.write(zeros[:k])
            left -= k
        if self.sparse:
            self.out.seek(n, os.SEEK_CUR)

    def _copy(self, src: int, at: int, n: int) -> None:
        """n bytes of src from `at` to the current position, cloned and hashed as read back (or,
        where this pair of files cannot be cloned after all, read, hashed and written)."""
        self.out.flush()
        dst = self.out.fileno()
        pos = self.out.tell()
        cloned = clone_range(src, at, n, dst, pos)
        done = 0
        while done < n:
            data = os.pread(dst if cloned else src, min(n - done, READ), (pos if cloned else at) + done)
            if not data:
                raise BlockCorrupt("a seed file is shorter than its recorded block index")
            self.hash.update(data)
            if not cloned:
                self.out.write(data)
            done += len(data)
        self.out.seek(pos + n)
