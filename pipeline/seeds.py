"""Where materialized bytes go: the Sink that hashes and writes them on a thread of its own, and
seeds, local files that already hold most of an artifact's blocks.

A disk image's root partition is its rootfs.ext4, block for block (hello's BIOS disk: 181,986
of its 182,057 data blocks are the ext4's, in 2,079 runs). When the ext4 is a plain file here,
the disk is made by copying those runs from it (os.copy_file_range: in the kernel, and shared
extents where the filesystem reflinks, btrfs or XFS) instead of decompressing and checking the
same blocks again; the rest comes from the packs. A copied run is not checked block by block:
the whole file's sha256 is, and the sink reads the copied bytes back for it, so a seed changed
since its sha256 was recorded is a mismatch, and BlockStore.materialize then makes the file
from the packs alone. Only a file cut FIXED (not a tgz's tar stream) is a seed, and only one
whose block index this store recorded (BlockStore.record_file).
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.blocks import BLOCK, HOLE, READ, BlockCorrupt

WRITE_BUFFER = 1 << 20  # materialized bytes are hashed and written in pieces of about this
SINK_QUEUE = 8  # pieces queued for the writing thread (memory: about this many MiB)
NO_SHARED_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


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
    hashes and writes the pieces (sha256, write() and copy_file_range let go of the GIL, so on two
    cores they overlap the reading of the next blocks: hello's ext4 6.6 -> 4.0 s). An error of
    that thread (a full disk) is raised by the next call or on leaving the block, never lost."""

    def __init__(self, out: BinaryIO, *, sparse: bool) -> None:
        self.out, self.sparse = out, sparse
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
            self._put(tuple(self.run))
            self.run = None

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
        """n bytes of src from `at` to the current position, then hashed as read back."""
        self.out.flush()
        dst = self.out.fileno()
        pos = self.out.tell()
        done = 0
        while done < n:
            try:
                k = os.copy_file_range(src, dst, n - done, at + done, pos + done)
            except OSError as e:
                if e.errno not in NO_SHARED_COPY:
                    raise
                data = os.pread(src, min(n - done, READ), at + done)
                k = os.pwrite(dst, data, pos + done) if data else 0
            if k == 0:
                raise BlockCorrupt("a seed file is shorter than its recorded block index")
            done += k
        done = 0
        while done < n:
            data = os.pread(dst, min(n - done, READ), pos + done)
            if not data:
                raise BlockCorrupt("a copied run reads back short")
            self.hash.update(data)
            done += len(data)
        self.out.seek(pos + n)
