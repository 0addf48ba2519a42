"""Benchmark of booting, printed as ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_boot.py          (needs the hello recipe built: `doit check_boot:hello`)

1. seconds from starting qemu to the login prompt, per mode (tgz, bios, uefi), under the
   accelerator select_accel() picks; baseline: the bare `qemu-system-x86_64 -kernel -initrd
   -append` line typed by hand with the same settings (tgz mode: ratio ~1.0x = our command
   line costs nothing; bios/uefi: what firmware and boot loader add)
2. the pipeline's overhead before qemu starts: `doit run_tgz:hello` on an up-to-date graph,
   from launching doit to the moment qemu is exec'd     target < 0.3 s
   baselines: `python -c pass`, bare `doit list` on an empty dodo.py (launch to exit), and a
   bare dodo.py whose one task runs qemu (launch to exec, like ours)

The boots go straight through headless.boot_to_marker() (never the check cache). For 2, a fake
`qemu-system-x86_64` first on PATH records its start time (bash's $EPOCHREALTIME: no extra
process) and exits 0; LDT_ACCEL=tcg, so select_accel() does not probe KVM with that fake.
The machine may be small and shared: the numbers are noisy.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import firmware, headless, kvm, qemu, vm  # noqa: E402
from pipeline.launch import machine_argv  # noqa: E402
from pipeline.project import Project  # noqa: E402
from pipeline.qemu import Mode  # noqa: E402

RECIPE = "hello"
BOOT_REPEAT = 2  # tgz ours and bare, alternating; bios and uefi boot once (~30 s each under TCG)
START_REPEAT = 5
DOIT = str(ROOT / ".venv" / "bin" / "doit")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
FAKE_QEMU = '#!/bin/bash\nprintf "%s\\n" "${EPOCHREALTIME//[.,]/}" >> "$LDT_BENCH_STAMP"\n'  # microseconds

# What a user types for the tgz boot, with the settings our command uses (1 line per concern).
BARE_TGZ = """\
qemu-system-x86_64 -machine q35 {accel} -smp {cpus} -m {memory}
  -nodefaults -display none -serial stdio -no-reboot
  -kernel {kernel} {initrd} -append {cmdline}
  -drive file={disk},format=raw,if=virtio,snapshot=on -device virtio-rng-pci
"""
BARE_ACCEL = {"tcg": "-accel tcg,thread=multi -cpu max", "kvm": "-accel kvm -cpu host"}


def row(name: str, value: float, baseline: float, unit: str = "s", target: str = "") -> None:
    print(f"{name:<46} {value:8.3f}{unit}  baseline {baseline:8.3f}{unit}  ratio {value / baseline:6.2f}x  {target}",
          flush=True)


def note(text: str) -> None:
    print(f"{'':<46} {text}", flush=True)


# -- 1. boot to the login prompt -------------------------------------------------------------------


def boot(cmd: list[str], marker: re.Pattern[str], timeout: int) -> headless.BootResult:
    res = headless.boot_to_marker(cmd, timeout=timeout, marker=marker)
    if not res.ok:
        note(f"FAILED: {res.reason}; last console lines:")
        for line in res.tail[-5:]:
            note(f"  {line}")
    return res


def bench_boot(p: Project, tmp: Path) -> None:
    r = p.recipe(RECIPE)
    choice = kvm.select_accel(cache_dir=p.store.root, notice=False)
    print(f"{choice.notice}; guest {r.memory} RAM, {r.cpus} CPUs, {os.cpu_count()} host CPUs", flush=True)
    settings = qemu.VmSettings(memory_mib=vm.memory_mib(r.memory), cpus=r.cpus, accel=choice.accel,
                               network=False)
    marker = re.compile(r.boot_marker or headless.LOGIN_PROMPT.pattern, re.MULTILINE)
    b = vm.boot_inputs(p, r, Mode.TGZ)
    bare_cmd = shlex.split(BARE_TGZ.format(
        accel=BARE_ACCEL[choice.accel], cpus=settings.cpus, memory=settings.memory_mib,
        kernel=shlex.quote(str(b.kernel)), initrd=f"-initrd {shlex.quote(str(b.initrd))}" if b.initrd else "",
        cmdline=shlex.quote(b.cmdline or ""), disk=shlex.quote(str(b.disk)),
    ))

    def ours(mode: str) -> headless.BootResult:
        with machine_argv(vm.machine(Mode(mode), vm.boot_inputs(p, r, Mode(mode)), settings)) as cmd:
            return boot(cmd, marker, r.boot_timeout)  # fresh OVMF vars per boot

    times: dict[str, list[float]] = {"bare": [], "tgz": []}
    for i in range(BOOT_REPEAT):
        for label in ("bare", "tgz") if i % 2 == 0 else ("tgz", "bare"):
            res = boot(bare_cmd, marker, r.boot_timeout) if label == "bare" else ours("tgz")
            times[label].append(res.seconds)
    bare_s = statistics.median(times["bare"])
    row(f"boot tgz to login (median of {BOOT_REPEAT})", statistics.median(times["tgz"]), bare_s,
        target="(vs the bare -kernel line: ~1.0x)")
    note(f"runs: ours {' '.join(f'{t:.1f}' for t in times['tgz'])}, bare {' '.join(f'{t:.1f}' for t in times['bare'])}")
    for mode in ("bios", "uefi"):
        row(f"boot {mode} to login (1 run)", ours(mode).seconds, bare_s, target="(vs the bare -kernel line)")


# -- 2. overhead before qemu starts ---------------------------------------------------------------


def start_to_exec(cmd: list[str], cwd: Path, env: dict[str, str], stamp: Path) -> tuple[float, float, str]:
    """(launch -> fake qemu's first timestamp, launch -> exit, output) of one run."""
    stamp.unlink(missing_ok=True)
    t0 = time.time_ns() // 1000
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    t_exit = time.time_ns() // 1000
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    stamps = stamp.read_text().split() if stamp.exists() else []
    if len(stamps) != 1:
        raise SystemExit(f"{shlex.join(cmd)}: the fake qemu ran {len(stamps)} times, not once")
    return (int(stamps[0]) - t0) / 1e6, (t_exit - t0) / 1e6, proc.stdout + proc.stderr


def wall(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, check=True, capture_output=True)
    return time.perf_counter() - t


def bench_start(p: Project, tmp: Path) -> None:
    fakebin = tmp / "fakebin"
    fakebin.mkdir()
    fake = fakebin / qemu.QEMU
    fake.write_text(FAKE_QEMU)
    fake.chmod(0o755)
    stamp = tmp / "qemu-started"
    env = {**os.environ, "PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}", "LDT_BENCH_STAMP": str(stamp),
           kvm.ACCEL_ENV: "tcg"}
    empty, bare = tmp / "empty", tmp / "bare"
    empty.mkdir()
    (empty / "dodo.py").write_text("def task_nothing():\n    return {'actions': None}\n")
    bare.mkdir()
    (bare / "dodo.py").write_text(f"def task_vm():\n    return {{'actions': [[{qemu.QEMU!r}]], 'uptodate': [False]}}\n")

    stale = stale_build_tasks(p)
    if stale:  # timing it would time a build (and write into the store): not this benchmark
        print(f"overhead before qemu starts: skipped, the graph is not up to date ({', '.join(stale)}); "
              f"run `doit run_tgz:{RECIPE}` once, then this benchmark again", flush=True)
        return
    runs, python, listing, bare_exec = [], [], [], []
    for _ in range(START_REPEAT):  # round-robin: a burst of load on the shared machine hits all four
        runs.append(start_to_exec([DOIT, f"run_tgz:{RECIPE}"], ROOT, env, stamp))
        python.append(wall([PYTHON, "-c", "pass"], empty, env))
        listing.append(wall([DOIT, "list"], empty, env))
        bare_exec.append(start_to_exec([DOIT, "vm"], bare, env, stamp)[0])
    ours = statistics.median(t for t, _, _ in runs)

    print(f"overhead before qemu starts ({kvm.ACCEL_ENV}=tcg, so no KVM probe; fake qemu first on PATH; "
          f"median of {START_REPEAT})", flush=True)
    name = f"doit run_tgz:{RECIPE}: launch -> qemu exec"
    row(name, ours, statistics.median(python), target="(baseline: python -c pass; target < 0.3 s absolute)")
    row(name, ours, statistics.median(listing), target="(baseline: bare `doit list`, empty dodo.py)")
    row(name, ours, statistics.median(bare_exec), target="(baseline: bare dodo.py, one task running qemu)")
    note(f"runs: {' '.join(f'{t:.3f}' for t, _, _ in runs)}; launch -> doit exit "
         f"{statistics.median(e for _, e, _ in runs):.3f}s")
    lines = [[ln.strip() for ln in out.splitlines() if ln.startswith(("-- ", ".  "))] for _, _, out in runs]
    build = [ln for run in lines for ln in run if "run_" not in ln]
    up_to_date = bool(build) and all(ln.startswith("-- ") for ln in build)
    note(f"build tasks up to date (`--`) in every run: {'yes' if up_to_date else 'NO'}: {', '.join(lines[0])}")
    probe_notes(env, tmp)


def stale_build_tasks(p: Project) -> list[str]:
    """The build tasks run_tgz depends on that `doit list --status` would run (not 'U')."""
    names, todo = [], [RECIPE]
    while todo:
        name = todo.pop()
        names.append(f"build_tgz:{name}")
        todo += p.recipe(name).parents
    names += [f"extract_boot:{RECIPE}", f"build_rootfs:{RECIPE}"]
    out = subprocess.run([DOIT, "list", "--status", "--all", *names], cwd=ROOT, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    status = {parts[1]: parts[0] for parts in map(str.split, out.splitlines()) if len(parts) >= 2}
    return [f"{status.get(n, '?')} {n}" for n in names if status.get(n) != "U"]


def probe_notes(env: dict[str, str], tmp: Path) -> None:
    """What select_accel() does without LDT_ACCEL, shown against scratch caches (cache/ untouched)."""
    if kvm.kvm_unavailable():
        note(f"without {kvm.ACCEL_ENV}: no probe either ({kvm.kvm_unavailable()})")
        return
    saved = dict(os.environ)
    try:
        os.environ.update(PATH=env["PATH"], LDT_BENCH_STAMP=str(tmp / "probe-stamp"))
        found = firmware.find_qemu()
        choice = kvm.select_accel(env={}, cache_dir=tmp / "probe-fake", notice=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    note(f"without {kvm.ACCEL_ENV}: find_qemu() resolves the fake ({found}), probe_key() no longer matches")
    note("  cache/accel-probe.json, so run_tgz would run the KVM probe on the fake and overwrite that file;")
    note(f"  on a scratch cache: {choice.notice}")
    t = time.perf_counter()
    real = kvm.probe_kvm(firmware.find_qemu())  # no cache involved
    note(f"  the real probe, paid on a cold cache (once per host boot and qemu binary): "
         f"{time.perf_counter() - t:.2f}s, {real.notice}")


def main() -> None:
    p = Project(ROOT)
    tmp = Path(tempfile.mkdtemp(prefix="ldt-bench-boot-"))
    try:
        bench_start(p, tmp)  # first: seconds, while the boots take minutes
        bench_boot(p, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
