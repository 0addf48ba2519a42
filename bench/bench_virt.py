"""Benchmark of `virt` against virtme-ng, printed as ratios against it, measured in the same run.

    .venv/bin/python bench/bench_virt.py     (needs the virt recipe built: cache/recipes/virt/*)

1. `virt -- true` wall time, median of 5           goal: faster than virtme-ng, resumed <= 1.0 s
   resumed from the snapshot (the default) vs booted (`--cold`) vs
   baseline: `vng -r <the same kernel> -- true`, same vCPUs and memory, both under TCG;
   then the time to make the snapshot once, and where a resumed run's time goes (host
   start-up, QEMU start, state load, the command: virt's LDT_VERBOSE=1 timings line)
2. `cat big >/dev/null` of a 512 MiB file in the shared current directory, MB/s (10^6 bytes),
   timed inside the guest with `date +%s%N`, one read per fresh VM (cold guest cache, warm
   host page cache), median of 3; baseline: the same with vng (the cwd through its 9p root
   share); reference: the host's own `cat big >/dev/null`

virtme-ng is installed into VNG_VENV (created when missing; its column is skipped with the
reason when that fails). It boots the HOST's userspace with the given kernel, so it needs
what this host lacks, all gathered in a scratch directory (nothing on the host changes):
- the kernel's modules: /lib/modules/<ver> from the recipe's rootfs.tgz, next to a copy of
  the kernel at <scratch>/boot/vmlinuz-<ver> (vng -r finds <root>/lib/modules/<ver> by walking
  up from the kernel's path)
- modprobe (vng resolves module dependencies with it): the image's own kmod, from rootfs.tgz
- busybox (vng builds an initramfs with it to load virtio/9p): busybox-static's .deb, fetched
  with `apt-get download` and unpacked with dpkg-deb -x
Flags: --disable-kvm (TCG, like virt here), --force-9p (the host's virtiofsd is QEMU's C one,
which vng refuses: it would wait ~3 s, then fall back to 9p anyway; its default is shown
once as a note). This host has no udevd, so virtme-ng-init finds no /dev/virtio-ports/ links:
the command runs on the console (visible with --verbose only) and vng exits 255 whatever the
command's status. So its rows are checked by a marker the command prints, read with --verbose.
The machine may be small and shared: the numbers are noisy.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import kernel  # noqa: E402

VIRT = ROOT / ".venv" / "bin" / "virt"
ART = ROOT / "cache" / "recipes" / "virt"
KERNEL, INITRD, ROOTFS, TGZ = ART / "vmlinuz", ART / "initrd.img", ART / "rootfs.ext4", ART / "rootfs.tgz"
VNG_VENV = Path(os.environ.get("VNG_VENV", "/tmp/vng-venv"))
CPUS, MEMORY = 1, 1024  # virt's defaults, given to vng too (its own: 2 vCPUs, 1G)
BOOT_REPEAT = 5
READ_REPEAT = 3
BIG_MIB = 512
VM_TIMEOUT = 120  # seconds, per VM
MARK = "ldt-bench-result"
READ_SCRIPT = f's=$(date +%s%N); cat big >/dev/null; e=$(date +%s%N); echo "{MARK} $((e - s))"'


def row(name: str, value: float, baseline: float, unit: str = "s", target: str = "", digits: int = 3) -> None:
    print(f"{name:<46} {value:8.{digits}f}{unit}  baseline {baseline:8.{digits}f}{unit}  "
          f"ratio {value / baseline:6.2f}x  {target}", flush=True)


def note(text: str) -> None:
    print(f"{'':<46} {text}", flush=True)


def runs(values: list[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


class Failed(Exception):
    """A tool could not run the command; the message says why."""


def run_limited(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                timeout: float = VM_TIMEOUT + 30) -> tuple[int, str, float]:
    """(exit status, stdout+stderr, wall seconds); the whole process group is killed on timeout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise Failed(f"{shlex.join(cmd[:3])} … did not finish in {timeout:g}s (killed)") from None
    return proc.returncode, out.decode(errors="replace"), time.perf_counter() - t


def tail(out: str, n: int = 8) -> str:
    return "; ".join(line.strip() for line in out.strip().splitlines()[-n:])


# -- the two tools ----------------------------------------------------------------------------------


def virt_cmd(*argv: str) -> list[str]:
    virt = [str(VIRT)] if VIRT.exists() else [sys.executable, "-c", "from pipeline.cli import virt; virt()"]
    return [*virt, "--accel", "tcg", "--timeout", str(VM_TIMEOUT), "--cpus", str(CPUS), "--memory", str(MEMORY),
            "--kernel", str(KERNEL), "--initrd", str(INITRD), "--rootfs", str(ROOTFS), *argv]


def virt_run(cwd: Path, *argv: str, options: tuple[str, ...] = (), verbose: bool = False) -> tuple[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LDT_VERBOSE": "1" if verbose else "0"}
    status, out, seconds = run_limited([*virt_cmd(*options, "--", *argv)], cwd=cwd, env=env)
    if status != 0:
        raise Failed(f"virt exited {status}: {tail(out)}")
    return out, seconds


class Vng:
    """vng -r <kernel in the scratch root>, with the PATH and flags this host needs."""

    def __init__(self, kernel: Path, busybox: Path, tools: Path) -> None:
        self.kernel, self.busybox = kernel, busybox
        self.env = {**os.environ, "PATH": f"{VNG_VENV / 'bin'}{os.pathsep}{tools}{os.pathsep}{os.environ['PATH']}"}

    def cmd(self, *argv: str, verbose: bool = False, defaults: bool = False) -> list[str]:
        tuned = [] if defaults else ["--force-9p", "--cpus", str(CPUS), "--memory", str(MEMORY)]
        return [str(VNG_VENV / "bin" / "vng"), "-r", str(self.kernel), "--disable-kvm", *tuned,
                "--busybox", str(self.busybox), *(["--verbose"] if verbose else []), "--", *argv]

    def run(self, cwd: Path, *argv: str, verbose: bool = False, defaults: bool = False) -> tuple[str, float]:
        status, out, seconds = run_limited(self.cmd(*argv, verbose=verbose, defaults=defaults), cwd=cwd,
                                           env=self.env)
        if status not in (0, 255):  # 255: no ret port without udev (see the docstring)
            raise Failed(f"vng exited {status}: {tail(out)}")
        return out, seconds


def marked(out: str, tool: str) -> int:
    """The number after MARK in a tool's output (vng's console mixes in kernel messages)."""
    for line in out.splitlines():
        words = line.split()
        if MARK in words and words.index(MARK) + 1 < len(words):
            return int(words[words.index(MARK) + 1])
    raise Failed(f"{tool}: no '{MARK}' line in its output: {tail(out)}")


# -- preparing virtme-ng ----------------------------------------------------------------------------


def kernel_release(bzimage: Path) -> str:
    """The version string a bzImage's setup header points to (kernel.release_of)."""
    release = kernel.release_of(bzimage)
    if release is None:
        raise Failed(f"{bzimage} is not a bzImage")
    return release


def install_vng() -> None:
    if (VNG_VENV / "bin" / "vng").exists():
        return
    t = time.perf_counter()
    for cmd in ([sys.executable, "-m", "venv", str(VNG_VENV)],
                [str(VNG_VENV / "bin" / "pip"), "install", "-q", "virtme-ng"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise Failed(f"`{shlex.join(cmd)}` failed: {tail(proc.stdout + proc.stderr, 3)}")
    note(f"installed virtme-ng into {VNG_VENV} in {time.perf_counter() - t:.0f}s")


def prepare_vng(scratch: Path) -> Vng:
    """virtme-ng and everything it needs on this host, under scratch (see the docstring)."""
    install_vng()
    t = time.perf_counter()
    release = kernel_release(KERNEL)
    root, tools = scratch / "vngroot", scratch / "tools"
    (root / "boot").mkdir(parents=True)
    (tools / "bin").mkdir(parents=True)
    kernel = root / "boot" / f"vmlinuz-{release}"
    shutil.copyfile(KERNEL, kernel)

    unpacked = scratch / "rootfs"
    unpacked.mkdir()
    proc = subprocess.run(["tar", "-xzf", str(TGZ), "-C", str(unpacked), "--wildcards",
                           f"*lib/modules/{release}/*", "*bin/kmod"], capture_output=True, text=True)
    moddir = next((d for d in (unpacked / "usr/lib/modules" / release, unpacked / "lib/modules" / release)
                   if d.is_dir()), None)
    if moddir is None:
        raise Failed(f"no lib/modules/{release} in {TGZ}: {proc.stderr.strip()}")
    (root / "lib" / "modules").mkdir(parents=True)
    moddir.rename(root / "lib" / "modules" / release)
    if not shutil.which("modprobe"):
        kmod = next((p for p in (unpacked / "usr/bin/kmod", unpacked / "bin/kmod") if p.is_file()), None)
        if kmod is None:
            raise Failed(f"the host has no modprobe (vng needs it) and {TGZ} has no kmod")
        for name in ("modprobe", "depmod"):
            (tools / "bin" / name).symlink_to(kmod)

    busybox = shutil.which("busybox-static") or shutil.which("busybox")
    if busybox is None:
        proc = subprocess.run(["apt-get", "download", "busybox-static"], cwd=scratch, capture_output=True, text=True)
        debs = list(scratch.glob("busybox-static_*.deb"))
        if not debs:
            raise Failed(f"the host has no busybox (vng's initramfs needs one) and `apt-get download "
                         f"busybox-static` failed: {tail(proc.stderr, 2)}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(scratch / "busybox")], check=True)
        busybox = str(scratch / "busybox" / "bin" / "busybox")
    note(f"virtme-ng {vng_version()}: kernel {release}, modules from rootfs.tgz, modprobe: "
         f"{shutil.which('modprobe') or 'the image kmod'}, busybox {busybox} "
         f"(prepared in {time.perf_counter() - t:.0f}s)")
    return Vng(kernel, Path(busybox), tools / "bin")


def vng_version() -> str:
    proc = subprocess.run([str(VNG_VENV / "bin" / "vng"), "--version"], capture_output=True, text=True)
    return (proc.stdout or proc.stderr).strip().removeprefix("virtme-ng ")


# -- 1. virt -- true ----------------------------------------------------------------------------------


def bench_true(work: Path, vng: Vng | None) -> None:
    virt_runs, cold_runs, vng_runs = [], [], []
    for _ in range(BOOT_REPEAT):  # alternating: a burst of load on the shared machine hits all
        virt_runs.append(virt_run(work, "true")[1])
        cold_runs.append(virt_run(work, "true", options=("--cold",))[1])
        if vng is not None:
            vng_runs.append(vng.run(work, "true")[1])
    ours = statistics.median(virt_runs)
    row(f"virt -- true resumed vs --cold (median of {BOOT_REPEAT})", ours, statistics.median(cold_runs),
        target="(baseline: virt --cold -- true; goal resumed <= 1.0 s)")
    note(f"runs: resumed {runs(virt_runs)}; cold {runs(cold_runs)}")
    if vng is None:
        print(f"{f'virt -- true (median of {BOOT_REPEAT})':<46} {ours:8.3f}s  (no virtme-ng baseline)")
        note(f"runs: {runs(virt_runs)}")
        return
    row(f"virt -- true (median of {BOOT_REPEAT})", ours, statistics.median(vng_runs),
        target="(baseline: vng -r same kernel -- true; goal < 1x)")
    note(f"runs: virt {runs(virt_runs)}; vng {runs(vng_runs)}")
    _, default = vng.run(work, "true", defaults=True)
    note(f"vng at its defaults (2 vCPUs, virtiofsd tried first): {default:.2f}s (1 run), "
         f"ratio {ours / default:.2f}x")


def bench_snapshot(work: Path) -> None:
    """The snapshot made once (this image, these settings), then where a resumed run's time goes."""
    for entry in (ROOT / "cache" / "store" / "virt_snapshot").glob("*/vm.json"):
        shutil.rmtree(entry.parent)  # every snapshot: the next run has to make this one
    out, seconds = virt_run(work, "true", verbose=True)
    made = next((line for line in out.splitlines() if "snapshot made:" in line), None)
    if made is None:
        raise Failed(f"virt made no snapshot: {tail(out)}")
    print(f"{'first run: make the snapshot, then resume':<46} {seconds:8.3f}s  "
          f"({made.split('snapshot made: ', 1)[1]})", flush=True)
    phases = []
    for _ in range(BOOT_REPEAT):
        out, seconds = virt_run(work, "true", verbose=True)
        line = next((x for x in out.splitlines() if "resume timings:" in x), "")
        parts = dict(p.rsplit(" ", 1) for p in line.split("resume timings: ", 1)[-1].split(", ") if " " in p)
        phases.append((seconds, {k: float(v.rstrip("s")) for k, v in parts.items()}))
    wall = statistics.median(s for s, _ in phases)
    names = list(phases[0][1])
    medians = {n: statistics.median(p[n] for _, p in phases if n in p) for n in names}
    inside = sum(medians.values())
    note(f"resumed `virt -- true` (LDT_VERBOSE=1, median of {BOOT_REPEAT}): wall {wall:.3f}s = "
         f"interpreter start-up + imports + checks {wall - inside:.3f}s, "
         + ", ".join(f"{n} {v:.3f}s" for n, v in medians.items()))


# -- 2. reading a big file from the share ------------------------------------------------------------


def bench_read(work: Path, vng: Vng | None) -> None:
    big = work / "big"
    block = os.urandom(1 << 20)
    with big.open("wb") as f:
        for _ in range(BIG_MIB):
            f.write(block)
    size = big.stat().st_size
    host_runs = []
    subprocess.run(["cat", str(big)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run(["cat", str(big)], stdout=subprocess.DEVNULL, check=True)
        host_runs.append(size / (time.perf_counter() - t) / 1e6)
    host = statistics.median(host_runs)

    virt_runs, vng_runs = [], []
    for _ in range(READ_REPEAT):
        virt_runs.append(size / (marked(virt_run(work, "sh", "-c", READ_SCRIPT)[0], "virt") / 1e9) / 1e6)
        if vng is not None:
            out = vng.run(work, "sh", "-c", READ_SCRIPT, verbose=True)[0]
            vng_runs.append(size / (marked(out, "vng") / 1e9) / 1e6)
    ours = statistics.median(virt_runs)
    name = f"cat {BIG_MIB} MiB from /work (median of {READ_REPEAT})"
    if vng is not None:
        row(name, ours, statistics.median(vng_runs), unit=" MB/s", digits=0,
            target="(baseline: vng, the cwd via its 9p root; > 1x = virt reads faster)")
    row(name, ours, host, unit=" MB/s", digits=0, target="(reference: host's own cat big >/dev/null)")
    note("runs MB/s: virt " + runs(virt_runs, 0) + (f"; vng {runs(vng_runs, 0)}" if vng else "")
         + f"; host {runs(host_runs, 0)}")


def main() -> None:
    missing = [p for p in (KERNEL, INITRD, ROOTFS, TGZ) if not p.is_file()]
    if missing:
        raise SystemExit(f"not built: {', '.join(map(str, missing))} (run `doit build_rootfs:virt` first)")
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="ldt-bench-virt-"))
    try:
        work = scratch / "work"
        work.mkdir()
        print(f"virt vs virtme-ng, both under TCG, {CPUS} vCPU, {MEMORY} MiB; {os.cpu_count()} host CPUs; "
              f"kernel {KERNEL.resolve().name} of the virt recipe", flush=True)
        virt_run(work, "true")  # prepares virt's fast-boot files once (cached under cache/virt)
        vng: Vng | None
        try:
            vng = prepare_vng(scratch)
            out, _ = vng.run(work, "echo", MARK, "0", verbose=True)
            marked(out, "vng")
        except Failed as e:
            vng = None
            note(f"virtme-ng column skipped: {e}")
        bench_true(work, vng)
        bench_snapshot(work)
        bench_read(work, vng)
    except Failed as e:
        raise SystemExit(f"benchmark failed: {e}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    note(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
