"""Watch a VM's serial console (QEMU's stdout) until a predicate holds or a timeout passes: for
boots that end on a line of their own (a refusal, a kernel message) rather than a login prompt."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.run import spawn


@dataclass(frozen=True)
class Watched:
    console: str
    seconds: float
    matched: bool  # until(console) held before the timeout or the end of the process


def watch(cmd: Sequence[str], until: Callable[[str], bool], timeout: float) -> Watched:
    """Run cmd (stdin closed, stderr into stdout) and read until until(console); the VM is killed
    when this returns (run.spawn reaps it)."""
    seen = b""
    start = time.monotonic()
    with spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while time.monotonic() - start < timeout:
            if select.select([fd], [], [], 2)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                seen += chunk
                if until(seen.decode(errors="replace")):
                    return Watched(seen.decode(errors="replace"), time.monotonic() - start, True)
    return Watched(seen.decode(errors="replace"), time.monotonic() - start, False)
