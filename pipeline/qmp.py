"""The QEMU monitor protocol (QMP): the one client, over a connected socket.

Qmp(sock) reads the greeting, negotiates capabilities, then call() sends one command at a
time and returns its answer, skipping asynchronous events. ask() is the one-shot form for a
monitor QEMU listens on (qemu.qmp_listen_args): connect, one command, True when acknowledged.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


class QmpError(Exception):
    """QEMU refused a command, or the monitor went away (QmpClosed)."""


class QmpClosed(QmpError):
    """QEMU closed its monitor (it quit, or died)."""


class Qmp:
    """One monitor connection: one command at a time, events skipped."""

    def __init__(self, sock: socket.socket, timeout: float = 60.0) -> None:
        sock.settimeout(timeout)
        self.f = sock.makefile("rwb")
        self._reply()  # the greeting
        self.call("qmp_capabilities")

    def _reply(self) -> dict[str, Any]:
        while True:
            line = self.f.readline()
            if not line:
                raise QmpClosed("QEMU closed its monitor")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def call(self, command: str, **arguments: Any) -> dict[str, Any]:
        """The command's return value (a dict; {} for none); QmpError when QEMU refused it."""
        self.f.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.f.flush()
        msg = self._reply()
        if "error" in msg:
            raise QmpError(f"qmp {command}: {msg['error'].get('desc', msg['error'])}")
        return msg.get("return", {}) if isinstance(msg.get("return"), dict) else {}


def ask(path: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 2.0) -> bool:
    """Send one command to the monitor listening at `path`; True when QEMU acknowledged it, or
    closed the monitor while acting on it (as it does on `quit`). Never raises."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            Qmp(sock, timeout).call(command, **(arguments or {}))
            return True
    except QmpClosed:
        return True
    except (OSError, ValueError, QmpError):
        return False
