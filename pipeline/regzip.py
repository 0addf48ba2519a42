"""A gzip artifact as its uncompressed stream plus the command that compresses it back, exactly.

Our rootfs tgz is `tar | igzip -1 -n -c` (tgz.compressor_cmd; `pigz -1 -n` where ISA-L is not
installed, as in stores written before it). What makes a tgz remakes it on every restore and
pull, so its speed counts twice: on hello's 676 MB tar igzip -1 takes 1.6 s of CPU, pigz -1
10.4 s (2.8 % smaller). igzip is one thread whose output does not depend on how its input
arrives (measured on hello: whole, piped, in 777-byte writes, with -T 2: one sha256). ISA-L
picks its code by CPU; a machine where that gives other bytes fails the sha256 and builds the
tgz instead of restoring it. pigz's output does not depend on the number of threads once it is
two or more (128 KiB input blocks, each ending in a sync flush): `zcat rootfs.tgz | pigz -1 -n
-p 2` and `-p 3` both reproduce its sha256 (`-p 1` is a single deflate stream and does not).
-n leaves no name or time in the header. Storing the tar, cut per member (blocks.Layout.TAR),
shares every file's data with the ext4 and the disks; the tgz is made again by the recorded
command and checked against its sha256.

Which command made a file is found by a probe (compress the first PROBE compressed bytes'
worth of stream with each candidate, compare the prefixes; when that is too short to tell, the
candidate whose output starts like the file for longest), then proved by a full pass: the
stream is fed to the command while it is cut, and the command's output must have the file's
sha256. A file that no candidate reproduces is stored as its compressed bytes (Layout.FIXED).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pipeline.blocks import READ, BlockCorrupt, Gzip
from pipeline.errors import UserError
from pipeline.run import check_exit, run, spawn

CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("igzip", "-1", "-n", "-c"),  # tgz.compressor_cmd() where ISA-L's igzip is installed (./setup.sh)
    ("pigz", "-1", "-n", "-p", "2"),  # tgz.compressor_cmd() on a machine with 2+ cores
    ("pigz", "-1", "-n", "-p", "1"),  # ... on a single core
    ("gzip", "-1", "-n"),  # ... without pigz
)
PROBE = 4 << 20  # compressed bytes the probe reads
PROBE_STREAM = 32 << 20  # the most uncompressed bytes the probe makes (compressed zeros would be far more)
MARGIN = 256 << 10  # compressed bytes at the end of a probe that may differ (the stream's end)
GZIP_MAGIC = b"\x1f\x8b"


def probe(path: Path) -> tuple[str, ...] | None:
    """The candidate command whose output starts like the file's, if one does."""
    with open(path, "rb") as f:
        head = f.read(PROBE)
    if not head.startswith(GZIP_MAGIC):
        return None
    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        stream = dec.decompress(head, PROBE_STREAM)
    except zlib.error:
        return None
    whole = dec.eof and not dec.unused_data  # the probe holds the whole (single-member) file
    # else: a prefix of the stream, whose compression must start like the file (but for its end)
    undecided, undecided_common = None, -1  # when the probe is too short to tell (a stream of zeros):
    for cmd in CANDIDATES:  # the candidate whose output starts like the file for longest
        if not shutil.which(cmd[0]):
            continue
        out = run(cmd, input=stream, capture=True).stdout
        if whole:
            if out == head:
                return cmd
            continue
        n = min(len(out), len(head)) - MARGIN
        if n > 0 and out[:n] == head[:n]:
            return cmd
        if n <= 0 and (common := len(os.path.commonprefix([out, head]))) > undecided_common:
            undecided, undecided_common = cmd, common
    return undecided  # the full pass proves it or not


class Recompressing:
    """A gzip file read as its uncompressed stream (read(n), what Layout.pieces wants), which is
    at the same time fed to `cmd`; afterwards `reproduced` says whether the command's output
    was the file, byte for byte (sha256 and size). Memory: READ bytes of each, whatever the
    compression ratio."""

    def __init__(self, path: Path, cmd: tuple[str, ...]) -> None:
        self.path, self.cmd = path, cmd
        self.file_hash, self.out_hash = hashlib.sha256(), hashlib.sha256()
        self.file_size = self.out_size = 0
        self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.pending = b""  # compressed input not yet given to the decompressor
        self.buf = b""
        self.eof = False
        self.reproduced = False

    def __enter__(self) -> Recompressing:
        self._spawn = spawn(list(self.cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.proc = self._spawn.__enter__()
        self.f = open(self.path, "rb")  # noqa: SIM115 (closed in __exit__)
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        return self

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read(READ):
            self.out_hash.update(chunk)
            self.out_size += len(chunk)

    def _more(self) -> bytes:
        """The next piece of the uncompressed stream, b"" at its end."""
        while True:
            if self.dec.unconsumed_tail:
                data, self.pending = self.dec.unconsumed_tail, b""
            elif self.pending:
                data, self.pending = self.pending, b""
            else:
                data = self.f.read(READ)
                if not data:
                    if not self.dec.eof:
                        raise UserError(f"{self.path.name}: the gzip stream ended early (truncated file)")
                    return b""
                self.file_hash.update(data)
                self.file_size += len(data)
            if self.dec.eof:  # another gzip member follows
                self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                out = self.dec.decompress(data, READ)
            except zlib.error as e:
                raise UserError(f"{self.path.name}: not a valid gzip stream ({e})") from None
            if self.dec.eof and self.dec.unused_data:
                self.pending = self.dec.unused_data
            if out:
                assert self.proc.stdin is not None
                self.proc.stdin.write(out)
                return out

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.eof:
            more = self._more()
            if not more:
                self.eof = True
            self.buf += more
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def __exit__(self, exc_type, *_: object) -> None:
        try:
            self.f.close()
            if exc_type is None:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.reader.join()
                self.proc.wait()
                check_exit(self.proc, self.cmd)
                self.reproduced = (self.out_size == self.file_size
                                   and self.out_hash.digest() == self.file_hash.digest())
        finally:
            self._spawn.__exit__(None, None, None)
            self.reader.join(timeout=10)


def on_all_cores(cmd: tuple[str, ...]) -> tuple[str, ...]:
    """The recorded command, with pigz's threads raised to this machine's cores where that gives
    the same bytes (two or more threads: see above); any other command as it is."""
    cores = os.cpu_count() or 1
    if cmd[:1] != ("pigz",) or "-p" not in cmd or cores <= 2:
        return cmd
    i = cmd.index("-p") + 1
    return (*cmd[:i], str(cores), *cmd[i + 1:]) if i < len(cmd) and int(cmd[i]) >= 2 else cmd


def compress_into(gzip: Gzip, write_stream: Callable[[BinaryIO], object], dest: Path) -> None:
    """dest = the recorded command's output for the stream write_stream() writes into it."""
    with open(dest, "wb") as out:
        try:
            with spawn(list(on_all_cores(gzip.cmd)), stdin=subprocess.PIPE, stdout=out) as proc:
                assert proc.stdin is not None
                write_stream(proc.stdin)
                proc.stdin.close()
                proc.wait()
                check_exit(proc, gzip.cmd)
        except BlockCorrupt:
            raise
        except (UserError, BrokenPipeError) as e:
            raise BlockCorrupt(f"{dest.name}: {' '.join(gzip.cmd)} could not compress the stored stream "
                               f"({getattr(e, 'message', e)})") from None
