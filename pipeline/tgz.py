"""Rootfs tarballs: stream a tar through a filter into the compressor, and bootstrap with mmdebstrap.

The filter walks the stream with tarstream.TarStream and copies every member it keeps byte for
byte (PAX xattrs, hard links, device nodes, long names); the stream is never buffered whole.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import mmdebstrap
from pipeline.errors import UserError
from pipeline.recipes import Bootstrap
from pipeline.run import check_exit, log, spawn
from pipeline.tarstream import BLOCK, TarStream, norm_name


def hosts_file(hostname: str) -> bytes:
    return (f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
            "::1\t\tlocalhost ip6-localhost ip6-loopback\n").encode()


@dataclass(frozen=True)
class Fixups:
    """What the engine (or mmdebstrap) leaves in a tree that a bootable image must not carry."""

    hostname: str

    def decide(self, path: str, size: int) -> bytes | None | bool:
        """True: keep the member; None: drop it; bytes: replace a regular file's content."""
        if path == ".dockerenv":
            return None  # the engine's marker file
        if path == "etc/resolv.conf":
            return None  # the engine's (or the build host's) resolver; the booted system makes its own
        if path == "etc/hostname":
            return f"{self.hostname}\n".encode()  # never the build host's name, never empty
        if path == "etc/hosts" and size == 0:
            return hosts_file(self.hostname)  # the engine leaves an empty mount point
        return True


COMPRESSORS: tuple[tuple[str, ...], ...] = (
    ("igzip", "-1", "-n", "-c"),  # ISA-L: 676 MB of hello's tar in 1.6 s of CPU (pigz -1: 10.4 s), 2.8 % larger
    ("pigz", "-1", "-n"),  # on its own cores beside the filter
    ("gzip", "-1", "-n"),
)


def compressor_cmd() -> list[str]:
    """The first of COMPRESSORS this machine has. A store remakes a tgz by the command that made it
    (regzip), so the compressor's speed is paid again on every restore and pull of a tgz."""
    return list(next((c for c in COMPRESSORS if shutil.which(c[0])), COMPRESSORS[-1]))


def filter_tar(chunks: Iterable[bytes], write: Callable[[bytes], object], fixups: Fixups) -> int:
    """Copy a tar stream to write(), applying fixups; returns the bytes read. A kept member's
    blocks (its PAX and GNU long-name headers too) are copied byte for byte."""
    stream = TarStream.of_chunks(chunks)
    for member in stream:
        decision = fixups.decide(norm_name(member.name), member.size) if member.type in FILE_TYPES else True
        if decision is True:
            stream.copy_raw(member, write)
        elif decision is not None:
            write(_replacement(member, decision))
    write(bytes(2 * BLOCK))
    return stream.total


FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)  # the members a fixup may replace


def _replacement(member: tarfile.TarInfo, content: bytes) -> bytes:
    ti = tarfile.TarInfo(norm_name(member.name))
    ti.size = len(content)
    ti.mode = 0o644
    ti.mtime = int(member.mtime)
    ti.uname = ti.gname = "root"
    buf = ti.tobuf(format=tarfile.GNU_FORMAT)
    return buf + content + bytes(-len(content) % BLOCK)


class Progress:
    """Bytes so far, on a terminal only (CI logs stay quiet)."""

    def __init__(self, what: str, enabled: bool | None = None) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            rate = nbytes / max(now - self.start, 1e-6)
            print(f"\rldt: {self.what}: {nbytes / 2**20:8.1f} MiB ({rate / 2**20:.0f} MiB/s)",
                  end="", file=sys.stderr, flush=True)

    def done(self, nbytes: int) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr)
        log(f"{self.what}: {nbytes / 2**20:.1f} MiB in {time.monotonic() - self.start:.1f}s")


def write_tgz(chunks: Iterable[bytes], out: Path, fixups: Fixups, what: str, tar_filter=filter_tar) -> None:
    """Filter a tar stream and compress it into `out` (tar_filter: filter_tar, or reroot.reroot_filter(…))."""
    cmd = compressor_cmd()
    progress = Progress(what)
    with open(out, "wb") as f, spawn(cmd, stdin=-1, stdout=f) as proc:  # -1: subprocess.PIPE
        assert proc.stdin is not None

        def counted() -> Iterator[bytes]:
            seen = 0
            for chunk in chunks:
                yield chunk
                seen += len(chunk)
                progress.update(seen)

        total = tar_filter(counted(), proc.stdin.write, fixups)
        proc.stdin.close()
        proc.wait()
        check_exit(proc, cmd)
    progress.done(total)


def bootstrap(b: Bootstrap, out: Path, hostname: str, epoch: int | None) -> None:
    """Make a rootfs tgz with mmdebstrap: no Docker, no registry."""
    if not shutil.which("mmdebstrap"):
        raise UserError("mmdebstrap not found", hint="run ./setup.sh (or `apt-get install mmdebstrap`)")
    cmd = mmdebstrap.tar_cmd(b)
    env = {"SOURCE_DATE_EPOCH": str(epoch)} if epoch is not None else None
    with spawn(cmd, env=env, stdout=-1) as proc:  # -1: subprocess.PIPE
        assert proc.stdout is not None
        try:
            write_tgz(iter(lambda: proc.stdout.read(1 << 20), b""), out, Fixups(hostname), f"bootstrap {hostname}")
        except UserError:
            if proc.wait() != 0:  # the tar ended early because mmdebstrap failed: say that
                check_exit(proc, cmd)
            raise
        proc.wait()
        check_exit(proc, cmd)
