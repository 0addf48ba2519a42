"""The console scripts' wrapper: SIGTERM (a CI timeout, `kill`) unwinds, so nothing outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import process_gone

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


def test_sigterm_reaps_the_children_and_exits_143():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert not process_gone(child)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    deadline = time.monotonic() + 10
    while not process_gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(child)  # killed and reaped by spawn's with block, not orphaned
