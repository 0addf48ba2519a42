"""The console scripts' wrapper: SIGTERM (a CI timeout, `kill`) unwinds, so nothing outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
from pipeline.entrypoint import entry_point
from pipeline.run import spawn

def main(argv):
    with spawn(["sleep", "60"]) as child:
        print(child.pid, flush=True)
        child.wait()
    return 0

entry_point(main)()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_sigterm_reaps_the_children_and_exits_143():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert alive(child)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)  # killed and reaped by spawn's with block, not orphaned
