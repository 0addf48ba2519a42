"""Files: writing them so that a reader sees the old file or the new one, never half of one, and
finding a sparse file's data."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """A temporary path beside dest (same folder, so the rename is atomic), renamed over dest when
    the block succeeds and removed when it fails. Whatever the block creates there (a file, a
    symlink, a folder) replaces dest whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        _remove(tmp)


def write_atomic(dest: Path, data: bytes | str) -> Path:
    with atomic_path(dest) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
    return dest


def link_or_copy(src: Path, dest: Path) -> Path:
    """dest as a hard link of src where the file system allows it (free), else a sparse copy."""
    with atomic_path(dest) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dest


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data (non-hole) ranges of a file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.EINVAL:  # a filesystem that cannot tell (some FUSE, old NFS): all data
                yield pos, size - pos
            return  # ENXIO: only a hole remains
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end
