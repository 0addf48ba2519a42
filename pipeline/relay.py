"""virt's streams: the host's stdin, stdout and stderr relayed to and from the guest's
virtio-serial ports (socketpairs to QEMU), and the control port that carries a restored
guest's settings in and the command's exit status and byte counts out.

The protocol's other side is pipeline/guest/virt-init.sh; virt.py starts QEMU and runs a Relay
until the command's output is complete (complete()) or QEMU closed every stream.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import time

from pipeline.run import verbose

STATUS_LINE = re.compile(rb"status (\d+) (\d+|-) (\d+|-)\n")


class PipeClosed(Exception):
    """The host's stdout or stderr is a pipe whose reader is gone."""


class Relay:
    """Host stdin → the stdin port; the stdout/stderr ports → fds 1/2; the control port → status."""

    CHUNK = 65536
    MAX_PENDING = 1 << 20  # stop reading host stdin while this much waits for the guest

    def __init__(self, proc: subprocess.Popen, socks: dict[str, socket.socket], preamble: bytes = b"") -> None:
        self.sel = selectors.PollSelector()  # unlike epoll, poll takes regular files and /dev/null
        self.proc = proc
        self.socks = socks
        self.status: int | None = None
        self.control = b""
        self.err = bytearray()
        self.pending = b""  # host stdin not yet taken by the guest
        self.stdin_eof = False
        self.stdin_closed = False
        self.sinks = {"stdout": 1, "stderr": 2}
        self.received = {"stdout": 0, "stderr": 0}
        self.expected: dict[str, int | None] = {}  # bytes each output port sent, from the status line
        self.to_control = preamble  # a restored guest's settings, not yet sent
        self.started = not preamble  # the guest started the command (host stdin flows only then)
        self.guarded = False  # pump() gave up waiting for the start
        self.marks: dict[str, float] = {}  # when the guest started the command, when its status came
        for s in socks.values():
            s.setblocking(False)
        self.sel.register(socks["stdout"], selectors.EVENT_READ, "stdout")
        self.sel.register(socks["stderr"], selectors.EVENT_READ, "stderr")
        self.sel.register(socks["control"], selectors.EVENT_READ | (selectors.EVENT_WRITE if preamble else 0),
                          "control")
        assert proc.stderr is not None
        self.sel.register(proc.stderr, selectors.EVENT_READ, "qemu")
        self.stdin_fd = self._host_stdin()
        if self.stdin_fd is None:
            self._close_stdin()
        elif self.started:
            self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    @staticmethod
    def _host_stdin() -> int | None:
        try:
            os.fstat(0)
        except OSError:
            return None
        return 0

    def _open_streams(self) -> set[str]:
        return {key.data for key in self.sel.get_map().values()} & {"stdout", "stderr", "control", "qemu"}

    def complete(self) -> bool:
        """The status arrived and so did every byte the guest sent (or its reader went away)."""
        if self.status is None or len(self.expected) < 2:
            return False
        for port, count in self.expected.items():
            if count is None:
                return False  # unknown: wait for the guest's reset
            if port in self.sinks and self.received[port] < count:
                return False
        return True

    def pump(self, deadline: float | None, start_guard: float | None = None) -> bool:
        """Relay until the command's output is complete or QEMU has closed every stream;
        False when the deadline passed first. Until the guest started the command,
        `start_guard` ends the relay too (self.guarded)."""
        while self._open_streams() and not self.complete():
            if not self.started and start_guard is not None and time.monotonic() >= start_guard:
                self.guarded = True
                return True
            ends = [t for t in (deadline, None if self.started else start_guard) if t is not None]
            wait = None if not ends else min(ends) - time.monotonic()
            if deadline is not None and deadline <= time.monotonic():
                return False
            for key, events in self.sel.select(max(wait, 0) if wait is not None else None):
                self._handle(key.data, events)
        return True

    def _handle(self, what: str, events: int) -> None:
        if what == "host-stdin":
            self._read_host_stdin()
        elif what == "guest-stdin":
            self._write_guest_stdin()
        elif what == "control" and events & selectors.EVENT_WRITE:
            self._write_control()
            if events & selectors.EVENT_READ:
                self._read_port(what)
        elif what == "qemu":
            assert self.proc.stderr is not None
            data = os.read(self.proc.stderr.fileno(), self.CHUNK)
            if data:
                self.err += data
            else:
                self.sel.unregister(self.proc.stderr)
        else:
            self._read_port(what)

    def _read_port(self, port: str) -> None:
        sock = self.socks[port]
        try:
            data = sock.recv(self.CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            return
        if port == "control":
            self.control += data
            if not self.started and b"started\n" in self.control:
                self._started()
            found = STATUS_LINE.search(self.control)
            if found and "status" not in self.marks:
                self.marks["status"] = time.monotonic()
            if found:
                self.status = int(found.group(1))
                for name, count in zip(("stdout", "stderr"), found.group(2, 3), strict=True):
                    self.expected[name] = int(count) if count != b"-" else None
            return
        self.received[port] += len(data)
        fd = self.sinks.get(port)
        if fd is None:
            return
        try:
            _write_all(fd, data)
        except BrokenPipeError:
            raise PipeClosed from None  # `virt -- yes | head`: end like the writer of a pipe
        except OSError:  # a closed descriptor (2>&-): discard, like /dev/null
            del self.sinks[port]

    def _write_control(self) -> None:
        sock = self.socks["control"]
        try:
            sent = sock.send(self.to_control)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # QEMU is gone: the reads say so
            sent = len(self.to_control)
        self.to_control = self.to_control[sent:]
        if not self.to_control and sock in {k.fileobj for k in self.sel.get_map().values()}:
            self.sel.modify(sock, selectors.EVENT_READ, "control")

    def _started(self) -> None:
        self.started = True
        self.marks["started"] = time.monotonic()
        if self.stdin_fd is not None and not self.stdin_eof and self.stdin_fd not in self.sel.get_map():
            self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    def _read_host_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, self.CHUNK)
        except OSError:
            data = b""
        if not data:
            self.stdin_eof = True
            self.sel.unregister(self.stdin_fd)
            if not self.pending:
                self._close_stdin()
            return
        self.pending += data
        self._write_guest_stdin()
        if len(self.pending) >= self.MAX_PENDING and self.stdin_fd in self.sel.get_map():
            self.sel.unregister(self.stdin_fd)

    def _write_guest_stdin(self) -> None:
        sock = self.socks.get("stdin")
        if sock is None or self.stdin_closed:
            self.pending = b""
            return
        try:
            sent = sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the guest is gone
            self.pending = b""
            self._close_stdin()
            return
        self.pending = self.pending[sent:]
        registered = sock in {k.fileobj for k in self.sel.get_map().values()}
        if self.pending and not registered:
            self.sel.register(sock, selectors.EVENT_WRITE, "guest-stdin")
        elif not self.pending and registered:
            self.sel.unregister(sock)
        if not self.pending:
            if self.stdin_eof:
                self._close_stdin()
            elif self.stdin_fd is not None and self.stdin_fd not in self.sel.get_map():
                self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    def _close_stdin(self) -> None:
        """EOF for the guest command, after everything sent before it.

        shutdown(), not close(): QEMU reads the socket only as fast as the guest takes the
        data and sees the end of the stream after it; a closed socket is a hang-up that QEMU
        acts on at once, dropping what it has not read yet.
        """
        sock = self.socks.get("stdin")
        if sock is None or self.stdin_closed:
            return
        self.stdin_closed = True
        if sock in {k.fileobj for k in self.sel.get_map().values()}:
            self.sel.unregister(sock)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def qemu_stderr(self) -> str:
        return self.err.decode(errors="replace")

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
        self.sel.close()
        for s in self.socks.values():
            s.close()
        if self.err and verbose():
            sys.stderr.write(self.qemu_stderr())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        view = view[n:]
