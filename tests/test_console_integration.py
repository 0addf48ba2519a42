"""The console session on a real boot: recipes/hello in tgz mode under QEMU (TCG here), its serial
console on a socketpair as QEMU's stdio. Logs in as root (no password in that image), runs
commands (a pass, a failure with its status, systemd's failed units), times each, and a hang gives
a timeout; leaving the block kills QEMU, so nothing is left running."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from conftest import doit

from pipeline import qemu, run, vm
from pipeline.console import SYSTEMD_FAILED_UNITS, ConsoleSession, Login, Verdict
from pipeline.project import Project
from pipeline.qemu import Mode
from pipeline.report import phases_from_console

pytestmark = pytest.mark.integration


def test_login_and_commands_on_a_real_boot(built_hello, tmp_path):
    doit("build_app:hello", "extract_boot:hello", "build_rootfs:hello", cwd=built_hello)
    p = Project(built_hello)
    r = p.recipe("hello")
    b = vm.boot_inputs(p, r, Mode.TGZ)
    accel = qemu.select_accel(cache_dir=p.store.root).accel
    settings = qemu.VmSettings(memory_mib=vm.memory_mib(r.memory), cpus=r.cpus, accel=accel, network=False)
    cmd = vm.vm_command(Mode.TGZ, b, settings, tmp_path)
    ours, theirs = socket.socketpair()
    stamped: list[tuple[float, str]] = []
    start = time.monotonic()
    with ours, run.spawn(cmd, stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL) as proc:
        theirs.close()
        s = ConsoleSession(ours.fileno(), on_line=lambda line: stamped.append((time.monotonic() - start, line)))
        s.login(Login("root"), timeout=r.boot_timeout)
        boot = time.monotonic() - start
        results = s.run_all(["true"] * 5 + ["echo out; echo err >&2; exit 3", SYSTEMD_FAILED_UNITS,
                                            "uname -r"], timeout=120)
        hang = s.run("sleep 600", timeout=3)
    assert proc.poll() is not None  # QEMU is gone
    per = sum(x.seconds for x in results[:5]) / 5
    ready_at = next(t for t, line in stamped if "login:" in line)
    phases = phases_from_console(stamped, ready_at=ready_at, login=s.login_seconds)
    print(f"\n{accel}: boot to a ready shell {boot:.1f}s ({phases}), "
          f"per command {per:.3f}s, failed units {results[6].seconds:.2f}s")
    print("\n".join(f"{t:7.2f} {line}" for t, line in stamped if t >= ready_at - 1)[:4000])
    assert all(x.ok for x in results[:5]), results
    assert (results[5].status, results[5].output) == (3, "out\nerr")
    assert results[6].verdict in (Verdict.PASSED, Verdict.FAILED), results[6]
    assert results[7].ok and results[7].output.strip()
    assert hang.verdict is Verdict.TIMED_OUT
    assert phases.kernel is not None and phases.init is not None
    assert per < 0.5, per  # the console's own cost per command; login(1) itself is the image's (see the report)
