"""Running and checking VMs of a recipe: run_tgz / run_bios / run_uefi on this terminal, and
check_boot, the boot matrix (each Mode headless to the boot marker, passes kept in the store)."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline import qemu
from pipeline.artifacts import Artifact
from pipeline.cache import key_of
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.qemu import Accel, Mode
from pipeline.recipes import Recipe
from pipeline.run import log, run

CHECK_STAGE = "check"  # store entries of passed boots: cache/store/check/<key>/result.json
CHECK_VERSION = 2


def memory_mib(size: str) -> int:
    """'1G' -> 1024, '512M' -> 512, '768' -> 768 (MiB)."""
    size = size.strip().upper()
    if size.endswith("G"):
        return int(size[:-1]) * 1024
    return int(size.rstrip("M"))


def parse_forwards(spec: str) -> tuple[tuple[int, int], ...]:
    """'2222:22,8080:80' -> ((2222, 22), (8080, 80))."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        host, sep, guest = item.partition(":")
        if not sep or not host.isdigit() or not guest.isdigit():
            raise UserError(f"bad port forward '{item}'", hint="write HOST:GUEST, e.g. --forward 2222:22")
        out.append((int(host), int(guest)))
    return tuple(out)


@dataclass(frozen=True)
class Boot:
    """What one boot mode boots: the disk, and for tgz the kernel, initrd and command line."""

    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    keys: tuple[str, ...] = ()  # store keys of everything booted (check_boot caches against them)


def boot_inputs(p: Project, r: Recipe, mode: Mode) -> Boot:
    """The recipe's current files for booting in `mode` (UserError naming the task when one is missing)."""
    from pipeline import disk, stages
    from pipeline.rootfs import read_ext4_identity

    files = stages.current(p, r, mode.needs(initrd=r.initrd))
    keys = tuple(dict.fromkeys(f.parent.name for f in files.values()))
    if not mode.direct_kernel:
        return Boot(files[mode.disk], keys=keys)
    uuid, _ = read_ext4_identity(files[Artifact.EXT4])
    cmdline = disk.kernel_cmdline(uuid, r.cmdline.split())
    return Boot(files[Artifact.EXT4], files[Artifact.KERNEL], files.get(Artifact.INITRD), cmdline, keys)


def vm_command(mode: Mode, b: Boot, settings: qemu.VmSettings, scratch: Path, disk: Path | None = None) -> list[str]:
    """The qemu argv for booting `b` in one mode (scratch: a per-run dir for OVMF vars)."""
    ovmf = vars_ = None
    if mode.needs_ovmf:
        ovmf = qemu.find_ovmf()
        vars_ = qemu.fresh_ovmf_vars(ovmf, scratch)
    return qemu.qemu_cmd(mode, settings=settings, disk=disk or b.disk, kernel=b.kernel, initrd=b.initrd,
                         cmdline=b.cmdline, ovmf=ovmf, ovmf_vars=vars_, qemu=qemu.find_qemu())


@dataclass(frozen=True)
class RunOptions:
    """The run tasks' and commands' options; empty/zero: the recipe's setting."""

    memory: str = ""
    cpus: int = 0
    cmdline: str = ""
    forward: str = ""
    net: bool = True
    persist: str = ""
    accel: str = ""


def run_recipe(p: Project, r: Recipe, mode: Mode, o: RunOptions) -> int:
    """Boot a recipe on this terminal's serial console; qemu's exit status."""
    return boot_interactive(p, mode, boot_inputs(p, r, mode), o, memory=o.memory or r.memory, cpus=o.cpus or r.cpus)


def boot_interactive(p: Project, mode: Mode, b: Boot, o: RunOptions, *, memory: str, cpus: int) -> int:
    """The cached artifact is never written: the disk is a throwaway snapshot, or with `persist`
    a copy outside the store."""
    choice = qemu.select_accel(Accel.parse(o.accel or "auto", origin="--accel"), cache_dir=p.store.root)
    settings = qemu.VmSettings(memory_mib=memory_mib(memory), cpus=cpus, accel=choice.accel, network=o.net,
                               port_forwards=parse_forwards(o.forward), kernel_args=o.cmdline, interactive=True,
                               snapshot=not o.persist)
    disk = None
    if o.persist:
        disk = Path(o.persist).resolve()
        if p.store.root in disk.parents:
            raise UserError(f"--persist {o.persist} is inside the store", hint="give a path outside cache/")
        if not disk.exists():
            log(f"persistent disk: copying {b.disk.name} to {disk}")
            run(["cp", "--sparse=always", b.disk, disk])
        log(f"persistent disk: {disk} (changes are kept there)")
    with tempfile.TemporaryDirectory(prefix="ldt-run-") as scratch:
        return qemu.run_interactive(vm_command(mode, b, settings, Path(scratch), disk))


@dataclass(frozen=True)
class CheckResult:
    mode: Mode
    ok: bool
    seconds: float
    cached: bool
    reason: str = ""
    tail: tuple[str, ...] = ()


def check_one(p: Project, r: Recipe, mode: Mode, accel: Accel) -> CheckResult:
    """Boot one variant headless to the marker, unless that exact image already passed."""
    b = boot_inputs(p, r, mode)
    marker = r.boot_marker or qemu.LOGIN_PROMPT.pattern
    manifest = {"stage": CHECK_STAGE, "version": CHECK_VERSION, "mode": str(mode), "booted": list(b.keys),
                "marker": marker, "cmdline": b.cmdline}
    key = key_of(manifest)
    entry = p.store.lookup(CHECK_STAGE, key)
    if entry is not None:
        p.store.push_entry(CHECK_STAGE, key)  # the fleet's, if it lacks this pass
    else:
        entry = p.store.pull(CHECK_STAGE, key, manifest)
    if entry is not None:
        res = json.loads((entry / "result.json").read_text())
        return CheckResult(mode, True, res["seconds"], cached=True)
    settings = qemu.VmSettings(memory_mib=memory_mib(r.memory), cpus=r.cpus, accel=accel, network=False)
    with tempfile.TemporaryDirectory(prefix="ldt-check-") as scratch:
        cmd = vm_command(mode, b, settings, Path(scratch))
        log(f"{r.name}: booting {mode} headless, waiting for {marker!r} (timeout {r.boot_timeout}s)")
        res = qemu.boot_to_marker(cmd, timeout=r.boot_timeout, marker=re.compile(marker, re.MULTILINE))
    if res.ok:  # only passes are remembered: a failure is retried next time
        with p.store.build(CHECK_STAGE, key, manifest) as work:
            (work / "result.json").write_text(json.dumps({"seconds": round(res.seconds, 1), "accel": str(accel)}))
        p.store.push_entry(CHECK_STAGE, key)
    return CheckResult(mode, res.ok, res.seconds, cached=False, reason=res.reason, tail=tuple(res.tail))


def check_table(name: str, results: list[CheckResult]) -> str:
    lines = [f"{'recipe':<16} {'mode':<5} {'result':<6} {'seconds':>8}"]
    for c in results:
        note = " (cached)" if c.cached else ""
        lines.append(f"{name:<16} {c.mode:<5} {'pass' if c.ok else 'FAIL':<6} {c.seconds:>8.1f}{note}")
    return "\n".join(lines)


def check_boot(p: Project, r: Recipe, modes: tuple[Mode, ...] = tuple(Mode)) -> list[CheckResult]:
    """The boot matrix of a recipe: each mode to its marker, headless; prints a table of the
    results, and raises a UserError naming the failed modes with their last console lines."""
    accel = qemu.select_accel(cache_dir=p.store.root).accel
    results = [check_one(p, r, mode, accel) for mode in modes]
    print(check_table(r.name, results), flush=True)
    failed = [c for c in results if not c.ok]
    if failed:
        details = "\n".join(f"{c.mode}: {c.reason}\n  last console lines:\n" + "\n".join("    " + t for t in c.tail)
                            for c in failed)
        raise UserError(f"{r.name}: boot check failed for {', '.join(c.mode for c in failed)}\n{details}",
                        hint=f"boot it interactively with `doit {failed[0].mode.run_task}:{r.name}`")
    print(f"boot it yourself: doit run_uefi:{r.name} (or run_bios, run_tgz); quit with Ctrl-A X", flush=True)
    return results
