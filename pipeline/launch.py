"""Starting QEMU: the one way a QEMU process is started and ended, with its sockets.

launch() is a context manager: it makes the socketpairs the caller names (QEMU's ends go to
the command line as fds: virt's ports, a QMP monitor) and, if asked, a unix socket path for a
monitor QEMU listens on; the caller builds the argv with those (pipeline/qemu.py) and start()s
it once. Leaving the block kills and reaps QEMU if it still runs (run.spawn) and closes every
socket: no QEMU outlives its `with` block. Port forwards are part of the argv (VmSettings).

Also here: machine_argv() (a Machine plus the host's qemu and OVMF, the one step from vm.py's
description to an argv), run_interactive() (a VM on this terminal) and how QEMU ended, in words.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline import firmware, qemu
from pipeline.errors import UserError
from pipeline.run import Cmd, log, spawn

QUIT_KEYS = "Ctrl-A X"


class Launch:
    """One QEMU to start: `fds` are QEMU's ends of the sockets (for the argv), `ours` this
    process's ends, `qmp_path` the monitor path when asked for; start() starts it once."""

    def __init__(self, stack: contextlib.ExitStack, names: Sequence[str], qmp_path: Path | None) -> None:
        self._stack = stack
        self.ours: dict[str, socket.socket] = {}
        self._theirs: dict[str, socket.socket] = {}
        for name in names:
            ours, theirs = socket.socketpair()
            self.ours[name], self._theirs[name] = stack.enter_context(ours), stack.enter_context(theirs)
        self.fds = {name: s.fileno() for name, s in self._theirs.items()}
        self.qmp_path = qmp_path
        self.proc: subprocess.Popen | None = None

    def start(self, cmd: Cmd, *, pass_fds: Sequence[int] = (), stdin: Any = subprocess.DEVNULL,
              stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.PIPE,
              new_session: bool = False) -> subprocess.Popen:
        """Start QEMU (once); its socket ends are handed over and closed here. stdin/stdout/
        stderr as for Popen (None: this terminal); `new_session`: Ctrl-C is ours, not QEMU's."""
        if self.proc is not None:
            raise RuntimeError("this QEMU was started already")
        self.proc = self._stack.enter_context(spawn(
            cmd, pass_fds=[*self.fds.values(), *pass_fds], stdin=stdin, stdout=stdout, stderr=stderr,
            start_new_session=new_session,
        ))  # fmt: skip
        for s in self._theirs.values():  # QEMU holds them now
            s.close()
        return self.proc


@contextlib.contextmanager
def launch(sockets: Sequence[str] = (), *, qmp_path: bool = False) -> Iterator[Launch]:
    """A QEMU to start with socketpairs named `sockets` (and, with qmp_path, a path for a
    listening monitor, qemu.qmp_listen_args); QEMU is reaped and the sockets closed on leaving."""
    with contextlib.ExitStack() as stack:
        path = None
        if qmp_path:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ldt-qmp-"))) / "qmp.sock"
        yield Launch(stack, sockets, path)


@contextlib.contextmanager
def machine_argv(m: qemu.Machine) -> Iterator[list[str]]:
    """The argv of a Machine on this host: the qemu binary found and, for UEFI, OVMF with a
    fresh copy of its variables (in a scratch folder removed on leaving): OVMF's Secure Boot
    build over the machine's enrolled variables when it has them (a signed disk)."""
    with tempfile.TemporaryDirectory(prefix="ldt-vm-") as scratch:
        ovmf = vars_ = None
        if m.mode.needs_ovmf:
            ovmf = firmware.find_ovmf() if m.secure_vars is None else firmware.find_secboot_ovmf(m.secure_vars)
            vars_ = firmware.fresh_ovmf_vars(ovmf, Path(scratch))
        yield qemu.machine_cmd(m, qemu=firmware.find_qemu(), ovmf=ovmf, ovmf_vars=vars_)


def run_interactive(cmd: Cmd, *, timeout: float | None = None) -> int:
    """Run a VM built with interactive=True on this terminal; returns qemu's exit status."""
    log(f"serial console on this terminal; quit with {QUIT_KEYS} (Ctrl-A C: QEMU monitor)")
    saved = _save_terminal()
    try:
        with launch() as vm:
            proc = vm.start(cmd, stdin=None, stdout=None, stderr=None)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise UserError(f"timed out after {timeout:g}s: {qemu.QEMU}") from None
    finally:
        _restore_terminal(saved)


def _save_terminal() -> list | None:
    try:
        import termios

        return termios.tcgetattr(0) if os.isatty(0) else None
    except (ImportError, OSError):
        return None


def _restore_terminal(saved: list | None) -> None:
    """QEMU restores the terminal itself, unless it was killed: then we do."""
    if saved is None:
        return
    import termios

    try:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
    except OSError:
        pass


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or None if it still runs after `timeout` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def qemu_error(stderr: str) -> str:
    """The line of qemu's stderr that says what went wrong, without the program prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    wanted = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no message")
    return re.sub(r"^qemu-system-\w+: ", "", wanted)


def exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"

