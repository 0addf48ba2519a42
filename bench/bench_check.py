"""Benchmark of the in-image check: what logging in and running [check] commands adds to a boot.

    .venv/bin/python bench/bench_check.py [MODE…]    (needs hello built: `doit build_efistub:hello
                                                       build_syslinux_bios:hello`; default: tgz)
    LDT_BENCH_REPEAT=1 .venv/bin/python bench/bench_check.py bios uefi    (one pair per mode)

Per mode, alternating, REPEAT times each: a boot to the login prompt and its power-off (the check
without [check]: baseline), and the same boot, then a login on the serial console and the default
command (systemd's failed units), then QMP quit (the check with it). Printed: the medians, the
ratio, and the difference against the goal (at most 3 s per mode under TCG), with the login and
the command's own seconds. Boots go straight through headless.boot_to_marker(), never the cache.
The machine may be small and shared: the numbers are noisy.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import headless, kvm, qemu, vm  # noqa: E402
from pipeline.launch import machine_argv  # noqa: E402
from pipeline.project import Project  # noqa: E402
from pipeline.qemu import Mode  # noqa: E402

RECIPE = "hello"
REPEAT = int(os.environ.get("LDT_BENCH_REPEAT", "2"))
GOAL = 3.0  # seconds an in-image check may add per mode (issue 19)


def boot(p: Project, mode: Mode, inside: headless.Inside | None) -> tuple[float, headless.BootResult]:
    r = p.recipe(RECIPE)
    b = vm.boot_inputs(p, r, mode)
    accel = kvm.select_accel(cache_dir=p.store.root).accel
    settings = qemu.VmSettings(memory_mib=vm.memory_mib(r.memory), cpus=r.cpus, accel=accel, network=False)
    m = vm.machine(mode, b, settings)
    start = time.monotonic()
    with machine_argv(m) as cmd:
        res = headless.boot_to_marker(cmd, timeout=r.boot_timeout, marker=re.compile(headless.LOGIN_PROMPT.pattern,
                                                                                    re.MULTILINE),
                                      expect=vm.expect(m), inside=inside)
    total = time.monotonic() - start
    if not res.ok:
        raise SystemExit(f"{mode}: the boot failed: {res.reason}")
    return total, res


def main(modes: list[str]) -> None:
    p = Project(ROOT)
    r = p.recipe(RECIPE)
    for name in modes or ["tgz"]:
        mode = Mode(name)
        inside = vm.inside_of(r.checks, vm.boot_inputs(p, r, mode).plan)
        if inside is None:
            raise SystemExit(f"{RECIPE} has no in-image check to measure")
        plain: list[float] = []
        checked: list[float] = []
        logins: list[float] = []
        commands: list[float] = []
        for _ in range(REPEAT):
            plain.append(boot(p, mode, None)[0])
            total, res = boot(p, mode, inside)
            assert res.inside is not None
            if res.inside.login_error:
                raise SystemExit(f"{mode}: {res.inside.login_error}")
            checked.append(total)
            logins.append(res.inside.login_seconds or 0.0)
            commands.append(sum(c.seconds for c in res.inside.commands))
        base, with_check = statistics.median(plain), statistics.median(checked)
        added = with_check - base
        print(f"{RECIPE} {mode}: boot+power-off {base:6.1f}s  boot+check+quit {with_check:6.1f}s  "
              f"ratio {with_check / base:5.2f}x  added {added:+5.1f}s (goal <= {GOAL:g}s: "
              f"{'met' if added <= GOAL else 'NOT met'})  login {statistics.median(logins):4.1f}s  "
              f"commands {statistics.median(commands):4.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
