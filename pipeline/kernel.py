"""Kernel images, in one place: where a distribution puts them (file names), the x86 bzImage setup
header (its release string and compressed payload), the ELF vmlinux inside with its PVH note,
and Debian's version order for choosing among several kernels."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from pipeline.compression import compression_of, decompress
from pipeline.errors import UserError
from pipeline.files import link_or_copy

# ── Debian version order ─────────────────────────────────────────────────────────────────────


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def compare_versions(a: str, b: str) -> int:
    """dpkg's verrevcmp(): <0, 0, >0. '6.1.0-50-amd64' > '6.1.0-9-amd64', '6.1~rc1' < '6.1'."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def choose_version(available: list[str], wanted: str | None) -> str | None:
    """The recipe's version if given (None if absent), else the newest by dpkg order."""
    if wanted is not None:
        return wanted if wanted in available else None
    best: str | None = None
    for v in available:
        if best is None or compare_versions(v, best) > 0:
            best = v
    return best


# ── kernel and initrd file names in a root filesystem ────────────────────────────────────────

_KERNEL_RE = re.compile(r"^(?:boot/(?:vmlinuz|vmlinux)-(?P<v1>.+)|(?:usr/)?lib/modules/(?P<v2>[^/]+)/vmlinuz)$")
_INITRD_RE = re.compile(
    r"^(?:boot/(?:initrd\.img-(?P<v1>.+)|initramfs-(?P<v2>.+)\.img|initrd-(?P<v3>.+?)(?:\.img)?)"
    r"|(?:usr/)?lib/modules/(?P<v4>[^/]+)/initrd(?:\.img)?)$"
)
# Unversioned names, used only when no versioned kernel is found (version then comes from the
# symlink target if there is one).
PLAIN_KERNELS = ("vmlinuz", "boot/vmlinuz")
PLAIN_INITRDS = ("initrd.img", "boot/initrd.img")


def kernel_name_version(path: str) -> str | None:
    """The version in a kernel's file name ('boot/vmlinuz-6.1.0-9-amd64' -> '6.1.0-9-amd64'), None for others."""
    m = _KERNEL_RE.match(path)
    return (m.group("v1") or m.group("v2")) if m else None


def initrd_name_version(path: str) -> str | None:
    """The version in an initrd's file name ('boot/initrd.img-6.1.0-9-amd64'), None for others."""
    m = _INITRD_RE.match(path)
    return next((v for v in m.groups() if v), None) if m else None


# ── the x86 bzImage ──────────────────────────────────────────────────────────────────────────

HEADER_END = 0x250  # the setup header fields read here all lie before this offset
RELEASE_READ = 0x200 + 0xFFFF + 256  # the release string's farthest end (a 16-bit pointer past 0x200)


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header (Linux boot protocol) this project reads."""

    setup_sects: int  # 512-byte sectors of real-mode setup after the boot sector
    release_at: int | None  # file offset of the kernel_version string (protocol 2.00+), None: absent
    payload: tuple[int, int] | None  # (file offset, length) of the compressed kernel (protocol 2.08+)


def setup_header(image: bytes) -> SetupHeader | None:
    """The setup header of an x86 bzImage (magic "HdrS" at 0x202), None for anything else."""
    if len(image) < 0x210 or image[0x202:0x206] != b"HdrS":
        return None
    setup_sects = image[0x1F1] or 4
    (pointer,) = struct.unpack_from("<H", image, 0x20E)
    payload = None
    if len(image) >= HEADER_END:
        offset, length = struct.unpack_from("<II", image, 0x248)
        payload = ((setup_sects + 1) * 512 + offset, length)
    return SetupHeader(setup_sects, pointer + 0x200 if pointer else None, payload)


def release(image: bytes) -> str | None:
    """The release a bzImage says it is ("6.1.0-28-amd64"), from its setup header's kernel_version
    pointer; None for anything else. `image` may be the file's first RELEASE_READ bytes."""
    header = setup_header(image)
    if header is None or header.release_at is None or header.release_at >= len(image):
        return None
    text = image[header.release_at : header.release_at + 256].split(b"\0", 1)[0].decode(errors="replace")
    return text.split()[0] if text.strip() else None


def release_of(path: Path) -> str | None:
    """release() of a kernel file, reading only the part of it that can hold the string."""
    with open(path, "rb") as f:
        return release(f.read(RELEASE_READ))


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage when it has a PVH entry point, else None."""
    header = setup_header(bzimage)
    if header is None or header.payload is None:
        return None
    start, length = header.payload
    payload = bzimage[start : start + length]
    method = compression_of(payload)
    if method is None:
        return None
    try:
        elf = decompress(payload, method)
    except (OSError, EOFError, ValueError, UserError):
        return None
    return elf if has_pvh_note(elf) else None


def has_pvh_note(elf: bytes) -> bool:
    """A 64-bit ELF with a Xen PHYS32_ENTRY note (type 18): QEMU can boot it directly."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def write_vmlinux(kernel: Path, out: Path) -> None:
    """The uncompressed kernel inside a bzImage, which QEMU boots through its PVH entry without
    the guest decompressing it (~2.5 s under TCG); the file as is when it is no bzImage (a
    vmlinux already), has no PVH note or an unknown compression: slower, same result."""
    elf = extract_vmlinux(kernel.read_bytes())
    if elf is None:
        link_or_copy(kernel, out)
    else:
        out.write_bytes(elf)
