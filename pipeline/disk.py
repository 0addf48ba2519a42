"""Bootable raw disks from boot files and an ext4 root image: BIOS (MBR + Syslinux) and UEFI
(GPT + ESP holding a Unified Kernel Image); qcow2 conversion.

Everything works on image files: sfdisk writes the partition table, mtools formats and
fills the FAT partition in place (`-i disk.img@@offset`), syslinux installs through mtools
with --offset, and the root filesystem is copied into its partition extent by extent, so no
loop device, mount or root is needed and holes stay holes.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import ids, qemu
from pipeline.errors import UserError
from pipeline.ext4 import read_ext4_identity
from pipeline.files import atomic_path, data_extents
from pipeline.run import Step, run
from pipeline.verity import ROOT_X86_64_VERITY_TYPE, Verity

SECTOR = 512
MiB = 1 << 20
ALIGN = MiB  # partition alignment
# File data at 4 KiB-aligned disk offsets: the FAT's clusters and the UKI's .linux and .initrd
# sections start on the block store's blocks (blocks.BLOCK), so a disk's kernel and initrd are
# the same blocks as the boot entry's files and cost nothing more in the store.
BLOCK = 4096
FAT_CLUSTERS = 70000  # FAT32 needs at least 65525 clusters; this leaves a margin

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # systemd auto-discovery: x86-64 root
MBR_FAT32_LBA = "c"
MBR_LINUX = "83"

SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
EFI_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
MBR_CODE_SIZE = 440
UKI_PATH = "::/EFI/BOOT/BOOTX64.EFI"


# --------------------------------------------------------------------------------------------
# Layout and partition tables (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    start: int  # bytes, ALIGN-aligned
    size: int  # bytes, a multiple of SECTOR
    type: str
    name: str | None = None
    uuid: uuid.UUID | None = None
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(sizes: Sequence[int], *, tail: int = 0) -> tuple[list[tuple[int, int]], int]:
    """(start, size) of each partition, 1 MiB aligned after a 1 MiB gap, and the disk size.

    `tail` reserves space after the last partition (the backup GPT needs 33 sectors)."""
    out = []
    pos = ALIGN
    for size in sizes:
        size = round_up(size, ALIGN)
        out.append((pos, size))
        pos += size
    return out, pos + tail


def sfdisk_script(label: str, label_id: str, partitions: Sequence[Partition]) -> str:
    """Input for `sfdisk` describing the whole table; label is 'dos' or 'gpt'."""
    lines = [f"label: {label}", f"label-id: {label_id}", "unit: sectors", f"sector-size: {SECTOR}", ""]
    for p in partitions:
        fields = [f"start={p.start // SECTOR}", f"size={p.size // SECTOR}", f"type={p.type}"]
        if p.uuid is not None:
            fields.append(f"uuid={str(p.uuid).upper()}")
        if p.name is not None:
            fields.append(f'name="{p.name}"')
        if p.bootable:
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


def sfdisk_cmd(image: Path) -> list[str]:
    return ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", os.fspath(image)]


def kernel_cmdline(root_uuid: uuid.UUID, extra: Sequence[str] = ()) -> str:
    """Root by filesystem UUID (any disk bus), console on VGA and on the first serial port."""
    return qemu.kernel_cmdline(root=f"UUID={root_uuid}", extra=extra)


def syslinux_cfg(cmdline: str, *, initrd: bool = True) -> str:
    lines = [
        "SERIAL 0 115200",
        "DEFAULT linux",
        "PROMPT 0",
        "TIMEOUT 0",
        "LABEL linux",
        "  LINUX /vmlinuz",
    ]
    if initrd:
        lines.append("  INITRD /initrd.img")
    lines.append(f"  APPEND {cmdline}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# FAT through mtools (pure command builders)
# --------------------------------------------------------------------------------------------


def mtools_env(epoch: int) -> dict[str, str]:
    return {**ids.source_date_env(epoch), "MTOOLS_SKIP_CHECK": "1"}


def fat_target(image: Path, offset: int) -> str:
    return f"{os.fspath(image)}@@{offset}"


def fat32_cluster_sectors(size: int) -> int:
    """Sectors per cluster: at least one block (4 KiB), larger while FAT32 keeps FAT_CLUSTERS."""
    spc = BLOCK // SECTOR
    while spc < 64 and size // SECTOR // (spc * 2) >= FAT_CLUSTERS:
        spc *= 2
    return spc


def fat_min_size(content: int) -> int:
    """A FAT32 partition size for `content` bytes of files: 10% + 8 MiB spare, and at least
    FAT_CLUSTERS clusters of 4 KiB (276 MiB; the space no file uses stays a hole in the image)."""
    smallest = round_up(FAT_CLUSTERS * BLOCK + 2 * MiB, ALIGN)
    return max(smallest, round_up(int(content * 1.1) + 8 * MiB, ALIGN))


def mformat_cmd(image: Path, part: Partition, *, serial: int, label: str, reserved: int = 32) -> list[str]:
    """FAT32 inside the image at the partition; hidden sectors = partition start (for Syslinux);
    `reserved` sectors before the FATs (format_fat chooses it so the data area starts on a block)."""
    sectors = part.size // SECTOR
    return [
        "mformat", "-i", fat_target(image, part.start),
        "-F", "-c", str(fat32_cluster_sectors(part.size)), "-R", str(reserved),
        "-T", str(sectors), "-h", "64", "-s", "32", "-H", str(part.start // SECTOR),
        "-N", f"{serial:08X}", "-v", label,
        "::",
    ]  # fmt: skip


def fat_data_start(boot_sector: bytes) -> int:
    """The sector (from the file system's start) where a FAT32 file system's clusters begin."""
    reserved = int.from_bytes(boot_sector[14:16], "little")
    fats = boot_sector[16]
    fat_sectors = int.from_bytes(boot_sector[36:40], "little")
    return reserved + fats * fat_sectors


def format_fat(image: Path, part: Partition, *, serial: int, label: str, env: Mapping[str, str]) -> None:
    """mformat, with as many reserved sectors as put the first cluster on a 4 KiB block (the
    FAT's size depends a little on them, hence the loop)."""
    per_block = BLOCK // SECTOR
    reserved = 32
    for _ in range(8):
        run(mformat_cmd(image, part, serial=serial, label=label, reserved=reserved), env=env)
        with open(image, "rb") as f:
            f.seek(part.start)
            start = fat_data_start(f.read(SECTOR))
        if start % per_block == 0:
            return
        reserved += (-start) % per_block
    raise UserError(f"{image.name}: could not start the FAT's clusters on a 4 KiB boundary",
                    hint="a bug: please report it with the partition size")


def mmd_cmd(image: Path, offset: int, dirs: Sequence[str]) -> list[str]:
    return ["mmd", "-i", fat_target(image, offset), *dirs]


def mcopy_cmd(image: Path, offset: int, src: Path, dest: str) -> list[str]:
    return ["mcopy", "-i", fat_target(image, offset), os.fspath(src), dest]


def syslinux_install_cmd(image: Path, offset: int) -> list[str]:
    """Syslinux (mtools flavour) into the FAT file system at `offset` bytes of the image."""
    return ["syslinux", "--install", "--offset", str(offset), os.fspath(image)]


# --------------------------------------------------------------------------------------------
# Unified kernel image (pure parts)
# --------------------------------------------------------------------------------------------

# Idx Name Size VMA LMA File-off Algn
_SECTION_RE = re.compile(r"^\s*\d+\s+(\S+)\s+([0-9a-fA-F]+)\s+([0-9a-fA-F]+)\s+[0-9a-fA-F]+\s+([0-9a-fA-F]+)"
                         r"\s+2\*\*\d+")


def pe_sections(objdump_h: str) -> dict[str, tuple[int, int]]:
    """{name: (size, vma)} from `objdump -h` output."""
    out = {}
    for line in objdump_h.splitlines():
        m = _SECTION_RE.match(line)
        if m:
            out[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
    return out


def pe_file_offsets(objdump_h: str) -> dict[str, int]:
    """{name: file offset} from `objdump -h` output."""
    out = {}
    for line in objdump_h.splitlines():
        m = _SECTION_RE.match(line)
        if m:
            out[m.group(1)] = int(m.group(4), 16)
    return out


def with_pads(payload: Sequence[tuple[str, Path]], pads: Mapping[str, Path]) -> list[tuple[str, Path]]:
    """The payload with a padding section (zeros, ignored by the stub) before each section named in
    `pads`: `.pad1`, `.pad2`, … in order."""
    out: list[tuple[str, Path]] = []
    for name, path in payload:
        if name in pads:
            out.append((f".pad{sum(n.startswith('.pad') for n, _ in out) + 1}", pads[name]))
        out.append((name, path))
    return out


def pe_section_alignment(objdump_p: str) -> int:
    m = re.search(r"^SectionAlignment\s+([0-9a-fA-F]+)", objdump_p, re.MULTILINE)
    if not m:
        raise UserError("cannot read SectionAlignment of the EFI stub (objdump -p)")
    return int(m.group(1), 16)


def uki_section_vmas(stub_sections: dict[str, tuple[int, int]], align: int,
                     payload: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """VMAs for the added sections: packed after the stub's last section, each aligned.

    This is what ukify (systemd 252) and the Arch wiki recipe compute."""
    pos = round_up(max(vma + size for size, vma in stub_sections.values()), align)
    out = []
    for name, size in payload:
        out.append((name, pos))
        pos = round_up(pos + size, align)
    return out


def objcopy_uki_cmd(stub: Path, out: Path, sections: Sequence[tuple[str, Path, int]]) -> list[str]:
    """objcopy adding (name, file, vma) sections to the stub.

    --preserve-dates keeps the stub's PE TimeDateStamp (objcopy would write the current time)."""
    cmd = ["objcopy", "--preserve-dates"]
    for name, path, vma in sections:
        cmd += ["--add-section", f"{name}={os.fspath(path)}", "--change-section-vma", f"{name}={vma:#x}"]
    return [*cmd, os.fspath(stub), os.fspath(out)]


def ukify_cmd(stub: Path, out: Path, kernel: Path, initrd: Path | None, cmdline: Path,
              os_release: Path) -> list[str]:
    cmd = ["ukify", "build", "--stub", os.fspath(stub), "--linux", os.fspath(kernel)]
    if initrd is not None:
        cmd += ["--initrd", os.fspath(initrd)]
    return [*cmd, "--cmdline", f"@{os.fspath(cmdline)}", "--os-release", f"@{os.fspath(os_release)}",
            "--output", os.fspath(out)]


# --------------------------------------------------------------------------------------------
# Executors
# --------------------------------------------------------------------------------------------


def sparse_copy_into(src: Path, dest: Path, offset: int) -> None:
    """Copy src into dest at offset, data extents only (dest's holes stay holes)."""
    with open(src, "rb") as fs, open(dest, "r+b") as fd:
        size = os.fstat(fs.fileno()).st_size
        for start, length in data_extents(fs.fileno(), size):
            done = 0
            while done < length:
                n = os.copy_file_range(fs.fileno(), fd.fileno(), length - done,
                                       start + done, offset + start + done)
                if n == 0:
                    raise UserError(f"short copy of {src} into {dest}")
                done += n


def _create_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def write_mbr_code(image: Path, boot_code: Path = SYSLINUX_MBR) -> None:
    code = boot_code.read_bytes()[:MBR_CODE_SIZE]
    with open(image, "r+b") as f:
        f.write(code)


def _partition_table(image: Path, label: str, label_id: str, parts: Sequence[Partition]) -> None:
    run(sfdisk_cmd(image), input=sfdisk_script(label, label_id, parts).encode(), capture=True)


@dataclass(frozen=True)
class DiskImage:
    path: Path
    size_bytes: int
    root_uuid: uuid.UUID
    cmdline: str


def build_bios_disk(
    kernel: Path, initrd: Path | None, root_img: Path, out: Path, *, key: str, epoch: int,
    extra_cmdline: Sequence[str] = (),
) -> DiskImage:
    """MBR disk: p1 FAT32 (bootable) with Syslinux, kernel, initrd, syslinux.cfg; p2 the ext4 root."""
    root_uuid, _ = read_ext4_identity(root_img)
    cmdline = kernel_cmdline(root_uuid, extra_cmdline)
    files = [kernel, *([initrd] if initrd else [])]
    boot_size = fat_min_size(sum(f.stat().st_size for f in files) + MiB)
    (p1, p2), disk_size = layout([boot_size, root_img.stat().st_size])
    boot = Partition(*p1, type=MBR_FAT32_LBA, bootable=True)
    root = Partition(*p2, type=MBR_LINUX)
    env = mtools_env(epoch)
    with Step(f"writing {out.name}"), atomic_path(out) as tmp:
        _create_sparse(tmp, disk_size)
        _partition_table(tmp, "dos", f"{ids.derive_u32(key, 'mbr-disk-id'):#010x}", [boot, root])
        format_fat(tmp, boot, serial=ids.derive_u32(key, "bios-boot-fat"), label="BOOT", env=env)
        cfg = tmp.with_name(tmp.name + ".syslinux.cfg")
        try:
            cfg.write_text(syslinux_cfg(cmdline, initrd=initrd is not None))
            run(mcopy_cmd(tmp, boot.start, kernel, "::/vmlinuz"), env=env)
            if initrd is not None:
                run(mcopy_cmd(tmp, boot.start, initrd, "::/initrd.img"), env=env)
            run(mcopy_cmd(tmp, boot.start, cfg, "::/syslinux.cfg"), env=env)
        finally:
            cfg.unlink()
        run(syslinux_install_cmd(tmp, boot.start), env=env, capture=True)
        write_mbr_code(tmp)
        sparse_copy_into(root_img, tmp, root.start)
    return DiskImage(out, disk_size, root_uuid, cmdline)


def _efi_stub_layout(stub: Path) -> tuple[dict[str, tuple[int, int]], int]:
    sections = pe_sections(run(["objdump", "-h", stub], capture=True).stdout.decode())
    align = pe_section_alignment(run(["objdump", "-p", stub], capture=True).stdout.decode())
    if not sections:
        raise UserError(f"{stub}: no sections found (is it a PE EFI stub?)")
    return sections, align


def build_uki(
    kernel: Path, initrd: Path | None, cmdline: str, os_release: Path, out: Path, *, stub: Path = EFI_STUB,
) -> Path:
    """Unified kernel image: systemd's EFI stub with .osrel, .cmdline, .linux, .initrd sections.

    ukify when it is on PATH, else objcopy with the section VMAs ukify 252 would use, .linux and
    .initrd starting on a 4 KiB block of the file (_objcopy_uki)."""
    if not stub.exists():
        raise UserError(f"{stub} not found", hint="install systemd-boot-efi (run ./setup.sh)")
    with atomic_path(out) as tmp:
        cmdline_file = tmp.with_name(tmp.name + ".cmdline")
        try:
            cmdline_file.write_text(cmdline + "\n")
            if shutil.which("ukify"):
                run(ukify_cmd(stub, tmp, kernel, initrd, cmdline_file, os_release), capture=True)
            else:
                payload = [(".osrel", os_release), (".cmdline", cmdline_file), (".linux", kernel)]
                if initrd is not None:
                    payload.append((".initrd", initrd))
                _objcopy_uki(stub, tmp, payload)
        finally:
            cmdline_file.unlink(missing_ok=True)
    return out


ALIGNED_SECTIONS = (".linux", ".initrd")


def _objcopy_uki(stub: Path, out: Path, payload: Sequence[tuple[str, Path]]) -> None:
    """objcopy the payload onto the stub; where .linux or .initrd would not start on a 4 KiB block
    of the file, a section of zeros goes before it (a multiple of the PE's 512-byte file
    alignment, both pads worked out from one pass) and the UKI is made again, until both do (a
    second round only when the added section headers outgrew the PE header's room)."""
    sections, align = _efi_stub_layout(stub)
    pads = {name: out.with_name(f"{out.name}{name}.pad") for name in ALIGNED_SECTIONS}
    pad_sizes: dict[str, int] = {}
    try:
        for _ in range(2 * len(ALIGNED_SECTIONS) + 2):
            for name, size in pad_sizes.items():
                pads[name].write_bytes(bytes(size))
            items = with_pads(payload, {name: pads[name] for name in pad_sizes})
            vmas = uki_section_vmas(sections, align, [(n, p.stat().st_size) for n, p in items])
            out.unlink(missing_ok=True)
            run(objcopy_uki_cmd(stub, out, [(n, p, vma) for (n, p), (_, vma) in zip(items, vmas, strict=True)]),
                capture=True)
            offsets = pe_file_offsets(run(["objdump", "-h", out], capture=True).stdout.decode())
            if not any(offsets.get(n, 0) % BLOCK for n in ALIGNED_SECTIONS):
                return
            shift = 0  # what the pads added so far move the sections after them (ALIGNED_SECTIONS is in file order)
            for name in ALIGNED_SECTIONS:
                rest = (offsets[name] + shift) % BLOCK if name in offsets else 0
                if rest:
                    size = pad_sizes.get(name, 0) + BLOCK - rest
                    shift += BLOCK - rest - (BLOCK if size >= BLOCK else 0)
                    pad_sizes[name] = size % BLOCK
                    if not pad_sizes[name]:
                        del pad_sizes[name]
        raise UserError(f"{out.name}: could not start the UKI's kernel and initrd on 4 KiB blocks",
                        hint="a bug: please report it with the EFI stub's version")
    finally:
        for pad in pads.values():
            pad.unlink(missing_ok=True)


def esp_dirs(dests: Sequence[str]) -> list[str]:
    """The folders (mtools paths, parents first) that files at `dests` need on the ESP, besides
    \\EFI\\BOOT, which every UEFI disk has."""
    out: list[str] = []
    for dest in dests:
        parts = dest.removeprefix("::/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "::/" + "/".join(parts[:i])
            if folder not in ("::/EFI", "::/EFI/BOOT") and folder not in out:
                out.append(folder)
    return out


Signer = Callable[[Path, Path], Path]  # (unsigned UKI, where the signed one goes) -> the signed UKI


def verity_cmdline(v: Verity, extra: Sequence[str] = ()) -> str:
    """The command line of a dm-verity root: the root and its hash tree by partition UUID (the root
    hash's halves), the whole table on it (ldt.verity=), the root read-only; consoles, then extra."""
    root, hash_tree = v.partition_uuids
    return qemu.kernel_cmdline(extra=[*v.ldt_cmdline(f"PARTUUID={root}", f"PARTUUID={hash_tree}"), *extra])


def build_uefi_disk(
    kernel: Path, initrd: Path | None, os_release: Path, root_img: Path, out: Path, *, key: str, epoch: int,
    extra_cmdline: Sequence[str] = (), sign: Signer | None = None, esp_files: Mapping[str, Path] | None = None,
    verity: Verity | None = None, hash_img: Path | None = None,
) -> DiskImage:
    """GPT disk: p1 the ESP (FAT32) with a UKI at \\EFI\\BOOT\\BOOTX64.EFI; p2 the ext4 root, typed
    as the x86-64 root partition for systemd's auto-discovery.

    `sign` (Secure Boot) signs the UKI between its build and the copy onto the ESP; `esp_files`
    ({mtools path: file}) go onto the ESP too (the certificates to enroll). `verity` (with its hash
    device `hash_img`, verity.format_verity's of root_img): p3 the hash tree (root-verity type), p2
    and p3 with the partition UUIDs of the root hash, and the UKI's command line opens the root
    through dm-verity, read-only (verity_cmdline): signed, the chain firmware -> UKI -> root hash ->
    every block of the root is closed. Without any of these, the disk is what it always was, byte
    for byte."""
    esp_files = esp_files or {}
    root_uuid, _ = read_ext4_identity(root_img)
    if verity is not None:
        if hash_img is None:
            raise ValueError("a verity root needs its hash device")
        cmdline = verity_cmdline(verity, extra_cmdline)
    else:
        cmdline = kernel_cmdline(root_uuid, extra_cmdline)
    env = mtools_env(epoch)
    unsigned = out.with_name(f".{out.name}.uki-{os.getpid()}.efi")
    signed = unsigned.with_name(unsigned.name + ".signed")
    try:
        with Step("building the unified kernel image"):
            uki = build_uki(kernel, initrd, cmdline, os_release, unsigned)
        if sign is not None:
            with Step("signing the unified kernel image"):
                uki = sign(unsigned, signed)
        esp_size = fat_min_size(uki.stat().st_size + sum(f.stat().st_size for f in esp_files.values()))
        sizes = [esp_size, root_img.stat().st_size, *([hash_img.stat().st_size] if hash_img and verity else [])]
        (p1, p2, *p3), disk_size = layout(sizes, tail=ALIGN)
        root_part, hash_part = verity.partition_uuids if verity else (ids.derive_uuid(key, "gpt-root"), None)
        esp = Partition(*p1, type=ESP_TYPE, name="ESP", uuid=ids.derive_uuid(key, "gpt-esp"))
        root = Partition(*p2, type=ROOT_X86_64_TYPE, name="root", uuid=root_part)
        parts = [esp, root]
        if p3:
            parts.append(Partition(*p3[0], type=ROOT_X86_64_VERITY_TYPE, name="root-verity", uuid=hash_part))
        with Step(f"writing {out.name}"), atomic_path(out) as tmp:
            _create_sparse(tmp, disk_size)
            _partition_table(tmp, "gpt", str(ids.derive_uuid(key, "gpt-disk")).upper(), parts)
            format_fat(tmp, esp, serial=ids.derive_u32(key, "esp-fat"), label="ESP", env=env)
            run(mmd_cmd(tmp, esp.start, ["::/EFI", "::/EFI/BOOT", *esp_dirs(list(esp_files))]), env=env)
            run(mcopy_cmd(tmp, esp.start, uki, UKI_PATH), env=env)
            for dest, src in esp_files.items():
                run(mcopy_cmd(tmp, esp.start, src, dest), env=env)
            sparse_copy_into(root_img, tmp, root.start)
            if hash_img is not None and p3:
                sparse_copy_into(hash_img, tmp, parts[2].start)
    finally:
        unsigned.unlink(missing_ok=True)
        signed.unlink(missing_ok=True)
    return DiskImage(out, disk_size, root_uuid, cmdline)


def qemu_img_convert_cmd(raw: Path, out: Path, *, compress: bool = False) -> list[str]:
    return ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *(["-c"] if compress else []),
            os.fspath(raw), os.fspath(out)]


def to_qcow2(raw: Path, out: Path, *, compress: bool = False) -> Path:
    """qcow2 of a raw disk (holes stay unallocated; -c compresses clusters)."""
    with Step(f"converting {raw.name} to qcow2"), atomic_path(out) as tmp:
        run(qemu_img_convert_cmd(raw, tmp, compress=compress), capture=True)
    return out
