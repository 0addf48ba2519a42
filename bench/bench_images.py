"""Benchmark of the image stages, printed as ratios against the bare command pipelines that do
the same work, measured in the same run (median of REPEAT, ours and bare alternating).

    .venv/bin/python bench/bench_images.py        (needs the hello recipe built: `doit check_boot:hello`)

1. ext4 root image    ext4.build_ext4          target <= 1.2x  baseline: tar -x into a dir + mkfs.ext4 -d
2. BIOS disk          disk.build_bios_disk       target <= 1.2x  baseline: truncate, sfdisk, mtools, syslinux, dd
3. UEFI disk          disk.build_uefi_disk       target <= 1.2x  baseline: objcopy UKI, truncate, sfdisk, mtools, dd
and the image sizes, apparent and allocated, of ours and of the bare ones.

Inputs are the artifacts cache/recipes/hello/ points at; the store is only read. Outputs go to
a temporary directory. The machine may be small and shared: the numbers are noisy.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import disk, ext4, stages  # noqa: E402
from pipeline.artifacts import Artifact  # noqa: E402
from pipeline.builders import MiB  # noqa: E402
from pipeline.project import Project  # noqa: E402

BIOS_IMG, EXT4, INITRD, KERNEL = Artifact.BIOS_IMG, Artifact.EXT4, Artifact.INITRD, Artifact.KERNEL
OS_RELEASE, TGZ, UEFI_IMG = Artifact.OS_RELEASE, Artifact.TGZ, Artifact.UEFI_IMG

RECIPE = "hello"
REPEAT = 3
TARGET = "(target <= 1.2x)"


def row(name: str, value: float, baseline: float, unit: str = "s", target: str = "") -> None:
    print(f"{name:<46} {value:8.3f}{unit}  baseline {baseline:8.3f}{unit}  ratio {value / baseline:6.2f}x  {target}",
          flush=True)


def sizes(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size / MiB:7.0f} MiB apparent, {st.st_blocks * 512 / MiB:6.0f} MiB allocated"


def bare(script: str, cwd: Path) -> None:
    """A bare pipeline, as a user would type it into a shell."""
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})


def compare(name: str, tmp: Path, ours: Callable[[Path], Path], theirs: Callable[[Path], Path],
            reference: Path) -> None:
    """Median wall time of ours and of the bare pipeline, alternating; each run in a fresh dir.

    `sync` before every run (untimed), so no run pays for the previous one's writeback."""
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    kept: dict[str, Path] = {}
    for i in range(REPEAT):
        order = [("ours", ours), ("bare", theirs)]
        for label, build in order if i % 2 == 0 else order[::-1]:
            work = tmp / f"{name}-{label}-{i}"
            work.mkdir()
            subprocess.run(["sync"], check=True)
            with contextlib.redirect_stderr(io.StringIO()):  # our stages' progress lines
                t = time.perf_counter()
                out = build(work)
                times[label].append(time.perf_counter() - t)
            if label in kept:
                shutil.rmtree(work)
            else:
                kept[label] = out
    ours_s, bare_s = statistics.median(times["ours"]), statistics.median(times["bare"])
    row(f"{name} (median of {REPEAT})", ours_s, bare_s, target=TARGET)
    print(f"{'':<46} runs: ours {' '.join(f'{t:.2f}' for t in times['ours'])}, "
          f"bare {' '.join(f'{t:.2f}' for t in times['bare'])}")
    identical = subprocess.run(["cmp", "-s", kept["ours"], reference]).returncode == 0
    print(f"{'':<46} ours: {sizes(kept['ours'])}  (byte-identical to the store's: {'yes' if identical else 'NO'})")
    print(f"{'':<46} bare: {sizes(kept['bare'])}")
    for out in kept.values():
        shutil.rmtree(out.parent)


class Inputs:
    """The hello recipe's current artifacts and the settings its stages used."""

    def __init__(self) -> None:
        p = Project(ROOT)
        self.recipe = r = p.recipe(RECIPE)
        store = p.store

        def entry(artifact: str, task: str) -> Path:
            e = store.current(RECIPE, artifact)
            if e is None:
                raise SystemExit(f"no {artifact} for {RECIPE}: run `doit {task}:{RECIPE}` first")
            return e

        self.tgz_entry = entry(TGZ, "build_tgz")
        self.tgz = self.tgz_entry / TGZ
        boot = entry(KERNEL, "extract_boot")
        self.kernel, self.os_release = boot / KERNEL, boot / OS_RELEASE
        self.initrd = boot / INITRD if (boot / INITRD).exists() else None
        self.ext4_entry = entry(EXT4, "build_rootfs")
        self.ext4 = self.ext4_entry / EXT4
        self.bios_entry = entry(BIOS_IMG, "build_syslinux_bios")
        self.uefi_entry = entry(UEFI_IMG, "build_efistub")
        self.epoch = stages.tgz_epoch(self.tgz_entry)
        self.extra = r.cmdline.split()
        self.root_uuid, _ = ext4.read_ext4_identity(self.ext4)
        self.cmdline = disk.kernel_cmdline(self.root_uuid, self.extra)


# -- ext4 ----------------------------------------------------------------------------------------


def bench_ext4(tmp: Path, i: Inputs) -> None:
    r = i.recipe
    sizing: dict[str, int] = {"headroom_bytes": r.headroom_mib * MiB}
    if r.size_mib:
        sizing["size_bytes"] = r.size_mib * MiB
    # the store entry's key: same UUID and hash seed as the stage, so the output must match it
    params = ext4.Ext4Params.for_key(i.ext4_entry.name, epoch=i.epoch, label="root", **sizing)
    size = i.ext4.stat().st_size

    def ours(work: Path) -> Path:
        return ext4.build_ext4(i.tgz, work / EXT4, params).path

    def theirs(work: Path) -> Path:
        # Not reproducible (random UUID and hash seed, readdir order, ctimes and mkfs times of
        # now), and it needs root: tar -p/--numeric-owner chowns every file and sets
        # security.* xattrs. It also runs on the host's /etc/mke2fs.conf defaults (lazy inode
        # table and journal init on a file: less written than ours).
        bare(f"mkdir d && tar -xpzf {shlex.quote(str(i.tgz))} -C d --xattrs --xattrs-include='*' --numeric-owner"
             f" && mkfs.ext4 -q -d d -L root img {size // 1024}k", work)
        return work / "img"

    compare("ext4 root image (build_ext4)", tmp, ours, theirs, i.ext4)


# -- BIOS and UEFI disks ---------------------------------------------------------------------------


def _geometry(first: int, i: Inputs, tail: int = 0) -> tuple[int, int, int, int]:
    """(p1 start, p1 size, p2 start, disk size): the layout ours uses, so both write the same."""
    (p1, p2), disk_size = disk.layout([first, i.ext4.stat().st_size], tail=tail)
    return p1[0], p1[1], p2[0], disk_size


def bench_bios(tmp: Path, i: Inputs) -> None:
    files = [i.kernel, *([i.initrd] if i.initrd else [])]
    boot_size = disk.fat_min_size(sum(f.stat().st_size for f in files) + MiB)
    off, p1_size, p2, disk_size = _geometry(boot_size, i)
    q = shlex.quote

    def ours(work: Path) -> Path:
        out = work / BIOS_IMG
        disk.build_bios_disk(i.kernel, i.initrd, i.ext4, out, key=i.bios_entry.name, epoch=i.epoch,
                             extra_cmdline=i.extra)
        return out

    cfg = disk.syslinux_cfg(i.cmdline, initrd=i.initrd is not None)
    initrd_copy = f"mcopy -i img@@{off} {q(str(i.initrd))} ::/initrd.img\n" if i.initrd else ""
    script = (
        f"truncate -s {disk_size} img\n"
        f"printf 'label: dos\\nstart={off // 512}, size={p1_size // 512}, type=c, bootable\\n"
        f"start={p2 // 512}, type=83\\n' | sfdisk -q img\n"
        f"mformat -i img@@{off} -F -T {p1_size // 512} -H {off // 512} -v BOOT ::\n"
        f"mcopy -i img@@{off} {q(str(i.kernel))} ::/vmlinuz\n"
        f"{initrd_copy}"
        f"printf %s {q(cfg)} > syslinux.cfg\n"
        f"mcopy -i img@@{off} syslinux.cfg ::/syslinux.cfg\n"
        f"syslinux --install --offset {off} img\n"
        f"dd if={disk.SYSLINUX_MBR} of=img bs=440 count=1 conv=notrunc status=none\n"
        f"dd if={q(str(i.ext4))} of=img bs=1M seek={p2 // MiB} conv=sparse,notrunc status=none\n"
    )

    def theirs(work: Path) -> Path:
        bare(script, work)
        return work / "img"

    compare("BIOS disk (build_bios_disk)", tmp, ours, theirs, i.bios_entry / BIOS_IMG)


def bench_uefi(tmp: Path, i: Inputs) -> None:
    q = shlex.quote

    def ours(work: Path) -> Path:
        out = work / UEFI_IMG
        disk.build_uefi_disk(i.kernel, i.initrd, i.os_release, i.ext4, out, key=i.uefi_entry.name, epoch=i.epoch,
                             extra_cmdline=i.extra)
        return out

    # The UKI the way the Arch wiki typed it for years: fixed section addresses (ours asks
    # objdump for the stub's sections and packs them, as ukify does). Same ESP size as ours.
    payload = sum(f.stat().st_size for f in (i.kernel, i.os_release, *([i.initrd] if i.initrd else [])))
    esp_size = disk.fat_min_size(disk.EFI_STUB.stat().st_size + payload + 4096)
    off, p1_size, p2, disk_size = _geometry(esp_size, i, tail=disk.ALIGN)
    initrd_section = (f" --add-section .initrd={q(str(i.initrd))} --change-section-vma .initrd=0x3000000"
                      if i.initrd else "")
    script = (
        f"printf '%s\\n' {q(i.cmdline)} > cmdline.txt\n"
        f"objcopy --add-section .osrel={q(str(i.os_release))} --change-section-vma .osrel=0x20000"
        f" --add-section .cmdline=cmdline.txt --change-section-vma .cmdline=0x30000"
        f" --add-section .linux={q(str(i.kernel))} --change-section-vma .linux=0x2000000"
        f"{initrd_section} {disk.EFI_STUB} uki.efi\n"
        f"truncate -s {disk_size} img\n"
        f"printf 'label: gpt\\nstart={off // 512}, size={p1_size // 512}, type={disk.ESP_TYPE}, name=ESP\\n"
        f"start={p2 // 512}, size={(disk_size - disk.ALIGN - p2) // 512}, type={disk.ROOT_X86_64_TYPE}, name=root\\n'"
        f" | sfdisk -q img\n"
        f"mformat -i img@@{off} -F -T {p1_size // 512} -v ESP ::\n"
        f"mmd -i img@@{off} ::/EFI ::/EFI/BOOT\n"
        f"mcopy -i img@@{off} uki.efi ::/EFI/BOOT/BOOTX64.EFI\n"
        f"dd if={q(str(i.ext4))} of=img bs=1M seek={p2 // MiB} conv=sparse,notrunc status=none\n"
    )

    def theirs(work: Path) -> Path:
        bare(script, work)
        return work / "img"

    compare("UEFI disk (build_uefi_disk)", tmp, ours, theirs, i.uefi_entry / UEFI_IMG)


def main() -> None:
    i = Inputs()
    print(f"inputs: {i.tgz_entry.parent.name}/{i.tgz_entry.name[:12]} ({i.tgz.stat().st_size / MiB:.0f} MiB tgz), "
          f"{os.cpu_count()} CPUs; wall times, noisy on a small or shared machine", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ldt-bench-images-"))
    try:
        bench_ext4(tmp, i)
        bench_bios(tmp, i)
        bench_uefi(tmp, i)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
