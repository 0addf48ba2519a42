"""Rootfs tarballs: stream a tar through a filter into the compressor, and bootstrap with mmdebstrap.

The filter works on raw 512-byte tar blocks, so every member it keeps is copied byte for
byte (PAX xattrs, hard links, device nodes, long names) and the stream is never buffered.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.recipes import Bootstrap
from pipeline.run import check_exit, log, spawn

BLOCK = 512


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


def compressor_cmd() -> list[str]:
    """pigz when available (it runs on its own cores beside the filter), else gzip."""
    return ["pigz", "-1", "-n"] if shutil.which("pigz") else ["gzip", "-1", "-n"]


class _Reader:
    """Exact-size reads from an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.it = iter(chunks)
        self.buf = bytearray()
        self.total = 0

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            try:
                chunk = next(self.it)
            except StopIteration:
                raise UserError("the tar stream ended early (truncated archive)") from None
            self.total += len(chunk)
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def copy(self, n: int, write: Callable[[bytes], object] | None) -> None:
        """Pass n bytes to write (or skip them) without joining them into one buffer."""
        while n > 0:
            if not self.buf:
                try:
                    chunk = next(self.it)
                except StopIteration:
                    raise UserError("the tar stream ended early (truncated archive)") from None
                self.total += len(chunk)
                if len(chunk) <= n:
                    if write:
                        write(chunk)
                    n -= len(chunk)
                    continue
                self.buf += chunk
            take = min(n, len(self.buf))
            if write:
                write(bytes(self.buf[:take]))
            del self.buf[:take]
            n -= take

    def drain(self) -> None:
        for chunk in self.it:
            self.total += len(chunk)


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(data: bytes) -> str | None:
    path = None
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1:pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            path = v.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def filter_tar(chunks: Iterable[bytes], write: Callable[[bytes], object], fixups: Fixups) -> int:
    """Copy a tar stream to write(), applying fixups; returns the bytes read."""
    r = _Reader(chunks)
    pending: list[bytes] = []  # pax/GNU long-name headers of the next member
    longname: str | None = None
    while True:
        header = r.read(BLOCK)
        if header == bytes(BLOCK):
            write(bytes(2 * BLOCK))
            r.drain()
            return r.total
        kind = header[156:157]
        size = _octal(header[124:136])
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L", b"g", b"K"):
            data = r.read(padded)
            if kind == b"x":
                longname = _pax_path(data[:size]) or longname
            elif kind == b"L":
                longname = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            pending += [header, data]
            continue
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        path = _norm(longname or name)
        has_data = kind in (b"0", b"\0", b"7")
        decision = fixups.decide(path, size) if kind in (b"0", b"\0", b"7") else True
        if decision is True:
            for blk in pending:
                write(blk)
            write(header)
            r.copy(padded if has_data else 0, write)
        else:
            r.copy(padded if has_data else 0, None)
            if decision is not None:
                write(_replacement(header, path, decision))
        pending, longname = [], None


def _replacement(header: bytes, path: str, content: bytes) -> bytes:
    ti = tarfile.TarInfo(path)
    ti.size = len(content)
    ti.mode = 0o644
    ti.mtime = _octal(header[136:148])
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


def mmdebstrap_cmd(b: Bootstrap) -> list[str]:
    """mmdebstrap writing an uncompressed tar to stdout."""
    cmd = ["mmdebstrap", f"--variant={b.variant}", "--format=tar", "--quiet"]
    if b.packages:
        cmd.append("--include=" + ",".join(b.packages))
    return [*cmd, b.suite, "-", b.mirror]


def bootstrap(b: Bootstrap, out: Path, hostname: str, epoch: int | None) -> None:
    """Make a rootfs tgz with mmdebstrap: no Docker, no registry."""
    if not shutil.which("mmdebstrap"):
        raise UserError("mmdebstrap not found", hint="run ./setup.sh (or `apt-get install mmdebstrap`)")
    cmd = mmdebstrap_cmd(b)
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
