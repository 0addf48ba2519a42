"""Benchmark of an app VM: seconds from starting qemu to the app's first HTTP 200, printed as a
ratio to the same kind of app started the usual way, by a systemd unit on a systemd image.

    .venv/bin/python bench/bench_app.py       (needs the recipes built: `doit check_boot:webapp check_boot:sysapp`)

    webapp  FROM debian-bookworm + python3, CMD python3 -m http.server 8000: no kernel, no init;
            our init (busybox + app-init.sh) as PID 1, virt's kernel with our initrd
    sysapp  FROM hello (kernel, systemd) + python3, the same server as ldt-app.service
    ratio   webapp / sysapp                                               goal <= 0.4 under TCG

Both boot in tgz mode through the check's own executor (headless.boot_check with the HTTP probe,
the forward on a free port), never the check cache; alternating, REPEAT times each, medians.
The machine may be small and shared: the numbers are noisy, and nothing is asserted.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import app, headless, kvm, qemu, vm  # noqa: E402
from pipeline.launch import machine_argv  # noqa: E402
from pipeline.project import Project  # noqa: E402
from pipeline.qemu import Mode  # noqa: E402

OURS, BASELINE = "webapp", "sysapp"
REPEAT = 2
GOAL = 0.4


def first_http_200(p: Project, name: str, accel: qemu.Accel) -> float:
    r = p.recipe(name)
    b = vm.boot_inputs(p, r, Mode.TGZ)
    forwards = vm.plan_forwards(b.plan.tcp_ports[:1], ())
    settings = qemu.VmSettings(memory_mib=vm.memory_mib(r.memory), cpus=r.cpus, accel=accel,
                               port_forwards=forwards)
    with machine_argv(vm.machine(Mode.TGZ, b, settings)) as cmd:
        res = headless.boot_check(cmd, timeout=600, marker=None, probe=vm.http_probe(forwards[0][0], "/"),
                                  exit_line=app.EXIT_MARKER_RE, grace=0)
    if not res.ok:
        raise SystemExit(f"{name}: {res.reason}\n" + "\n".join(res.tail))
    return res.seconds


def main() -> None:
    p = Project(ROOT)
    choice = kvm.select_accel(cache_dir=p.store.root)
    times: dict[str, list[float]] = {OURS: [], BASELINE: []}
    for i in range(REPEAT):
        for name in (OURS, BASELINE):
            times[name].append(first_http_200(p, name, choice.accel))
            print(f"  run {i + 1}: {name:<8} {times[name][-1]:6.1f}s to the first HTTP 200", flush=True)
    ours, base = statistics.median(times[OURS]), statistics.median(times[BASELINE])
    print(f"{'qemu start -> first HTTP 200, our init (' + OURS + ')':<52} {ours:7.1f}s  "
          f"baseline systemd unit ({BASELINE}) {base:7.1f}s  ratio {ours / base:5.2f}x  goal <= {GOAL}x "
          f"({choice.accel})")


if __name__ == "__main__":
    main()
