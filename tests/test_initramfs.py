"""pipeline.initramfs: the cpio writer and reader, initrd slimming; pipeline.kernel's vmlinux out of a
bzImage; and the fast_boot stage built on them."""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline import initramfs, kernel, stages
from pipeline.project import Project

# ── cpio ────────────────────────────────────────────────────────────────────────────────


def test_make_cpio_round_trips_through_our_reader():
    archive = initramfs.make_cpio({"b/c/init": b"#!/bin/sh\n", "a": b"x" * 5})
    members, end = initramfs.read_cpio(archive)
    assert end == len(archive)
    assert [m.name for m in members] == ["a", "b", "b/c", "b/c/init"]
    modes = {m.name: m.mode for m in members}
    assert stat.S_ISDIR(modes["b/c"]) and stat.S_ISREG(modes["b/c/init"])
    assert stat.S_IMODE(modes["b/c/init"]) == 0o755
    assert all(len(m.raw) % 4 == 0 for m in members)


def test_make_cpio_is_read_by_gnu_cpio(tmp_path: Path):
    archive = initramfs.make_cpio({"dir/file": b"content\n", "odd name": b""})
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "dir" / "file").read_bytes() == b"content\n"
    assert (tmp_path / "odd name").exists()


def test_make_cpio_refuses_escaping_names():
    with pytest.raises(ValueError):
        initramfs.make_cpio({"../etc/passwd": b""})


def test_pad4_aligns_the_appended_archive():
    assert [len(initramfs.pad4(n)) for n in range(5)] == [0, 3, 2, 1, 0]


# ── fast boot ───────────────────────────────────────────────────────────────────────────

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/gpu/drm/huge.ko:
"""
SOFTDEP = "softdep ext4 pre: crypto-crc32c\n"
ALIAS = "alias crypto-crc32c crc32c_generic\nalias crypto-crc32c crc32c_intel\n"


def test_module_closure_follows_deps_softdeps_and_aliases():
    closure = initramfs.module_closure(MODULES_DEP, SOFTDEP, ALIAS, ["virtio_pci", "virtio_blk", "ext4", "builtin_x"])
    assert closure == {
        "kernel/fs/ext4/ext4.ko", "kernel/lib/crc16.ko", "kernel/fs/jbd2/jbd2.ko",
        "kernel/crypto/crc32c_generic.ko", "kernel/arch/x86/crypto/crc32c-intel.ko",
        "kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/block/virtio_blk.ko",
    }  # fmt: skip


def test_module_load_order_puts_each_module_after_what_it_needs():
    order = initramfs.module_load_order(MODULES_DEP, SOFTDEP, ALIAS, ["ext4", "virtio_blk", "virtio_pci"])
    assert sorted(order) == sorted(initramfs.module_closure(MODULES_DEP, SOFTDEP, ALIAS, ["ext4", "virtio_blk",
                                                                                          "virtio_pci"]))
    assert len(order) == len(set(order))
    at = {p.rsplit("/", 1)[1]: i for i, p in enumerate(order)}
    for before, after in [("crc16.ko", "ext4.ko"), ("jbd2.ko", "ext4.ko"), ("crc32c_generic.ko", "ext4.ko"),
                          ("crc32c-intel.ko", "ext4.ko"), ("virtio.ko", "virtio_blk.ko"),
                          ("virtio.ko", "virtio_pci.ko")]:
        assert at[before] < at[after], (before, after, order)
    later = initramfs.module_load_order(MODULES_DEP, SOFTDEP, ALIAS, ["virtio_pci", "huge"], loaded=order)
    assert later == ["kernel/drivers/gpu/drm/huge.ko"]  # what the first batch loaded is not loaded again


def test_module_load_order_survives_a_dependency_cycle():
    dep = "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n"
    assert sorted(initramfs.module_load_order(dep, "", "", ["a"])) == ["kernel/a.ko", "kernel/b.ko"]


def test_app_initrd_holds_init_busybox_the_modules_in_load_order_and_a_console(tmp_path: Path):
    modules = {p: b"\x7fELF " + p.encode() for p in (line.split(":")[0] for line in MODULES_DEP.splitlines())}
    modules["kernel/drivers/block/virtio_blk.ko"] = lzma.compress(b"\x7fELF blk")  # a .ko.xz's content
    tree = {"modules.dep": MODULES_DEP.encode(), "modules.softdep": SOFTDEP.encode(),
            "modules.alias": ALIAS.encode(), **modules}
    data = initramfs.app_initrd(b"#!/bin/busybox sh\n", b"\x7fELF busybox", tree.get,
                                first=("virtio_pci", "virtio_blk", "ext4", "virtio_net"), more=("huge",))
    members, end = initramfs.read_cpio(data)
    assert end == len(data)
    by_name = {m.name: m for m in members}
    assert stat.S_ISCHR(by_name["dev/console"].mode)
    assert stat.S_IMODE(by_name["init"].mode) == 0o755

    def content(name: str) -> bytes:
        raw = by_name[name].raw
        start = 110 + int(raw[94:102], 16)
        start += -start % 4
        return raw[start : start + int(raw[54:62], 16)]

    assert content("bin/busybox") == b"\x7fELF busybox"
    assert content("lib/ldt/modules/virtio_blk.ko") == b"\x7fELF blk"  # decompressed
    first = content("lib/ldt/first").decode().split()
    assert first.index("virtio.ko") < first.index("virtio_blk.ko") and first.index("jbd2.ko") < first.index("ext4.ko")
    assert "virtio_net.ko" not in first  # built in or absent: nothing to load
    assert content("lib/ldt/more").decode().split() == ["huge.ko"]
    assert {n for n in by_name if n.startswith("lib/ldt/modules/")} == {f"lib/ldt/modules/{n}" for n in
                                                                         [*first, "huge.ko"]}
    # GNU cpio reads it too, device node included
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True).stdout.decode()
    assert any(line.startswith("crw") and line.endswith("dev/console") for line in listing.splitlines())


def test_app_initrd_without_modules_dep_is_an_error():
    with pytest.raises(ValueError, match="modules.dep"):
        initramfs.app_initrd(b"", b"", {}.get)


def fake_initrd() -> bytes:
    moddir = "usr/lib/modules/6.1.0-1-amd64"
    files = {f"{moddir}/{p}": b"\x7fELF module" for p in (line.split(":")[0] for line in MODULES_DEP.splitlines())}
    files |= {
        f"{moddir}/modules.dep": MODULES_DEP.encode(),
        f"{moddir}/modules.softdep": SOFTDEP.encode(),
        f"{moddir}/modules.alias": ALIAS.encode(),
        "usr/lib/firmware/big.bin": b"\0" * 1000,
        "usr/bin/sh": b"#!shell",
    }
    early = initramfs.make_cpio({"kernel/x86/microcode/AuthenticAMD.bin": b"ucode"})
    main = gzip.compress(initramfs.make_cpio(files))
    return early + main


def test_slim_initrd_keeps_tools_and_needed_modules_only():
    slim = initramfs.slim_initrd(fake_initrd())
    members, end = initramfs.read_cpio(slim)
    assert end == len(slim)
    names = {m.name for m in members}
    assert "usr/bin/sh" in names and "kernel/x86/microcode/AuthenticAMD.bin" in names
    assert "usr/lib/modules/6.1.0-1-amd64/kernel/fs/ext4/ext4.ko" in names
    assert "usr/lib/modules/6.1.0-1-amd64/modules.dep" in names
    assert "usr/lib/modules/6.1.0-1-amd64/kernel/drivers/gpu/drm/huge.ko" not in names
    assert "usr/lib/firmware/big.bin" not in names


def test_initrd_archives_rejects_garbage():
    with pytest.raises(ValueError):
        initramfs.initrd_archives(b"not an initrd")


def elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A minimal ELF64 header, one PT_NOTE program header and the notes."""
    blob = b""
    for name, n_type in notes:
        name0 = name + b"\0"
        blob += struct.pack("<III", len(name0), 4, n_type) + name0 + b"\0" * (-len(name0) % 4) + b"\0" * 4
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(blob), len(blob), 4)
    return bytes(header) + phdr + blob


def fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 4
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 0, len(payload))
    return bytes(image) + payload


def test_has_pvh_note():
    assert kernel.has_pvh_note(elf_with_notes([(b"GNU", 3), (b"Xen", 18)]))
    assert not kernel.has_pvh_note(elf_with_notes([(b"Xen", 6)]))
    assert not kernel.has_pvh_note(b"MZ not an elf")


def test_extract_vmlinux_from_an_xz_bzimage():
    elf = elf_with_notes([(b"Xen", 18)])
    assert kernel.extract_vmlinux(fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\1\2\3\4")) == elf
    assert kernel.extract_vmlinux(fake_bzimage(gzip.compress(elf))) == elf
    no_pvh = elf_with_notes([(b"GNU", 3)])
    assert kernel.extract_vmlinux(fake_bzimage(gzip.compress(no_pvh))) is None
    assert kernel.extract_vmlinux(b"not a kernel") is None


def test_fast_boot_files_are_a_store_entry_and_fall_back(tmp_path: Path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(fake_bzimage(gzip.compress(elf_with_notes([(b"Xen", 18)]))))
    initrd.write_bytes(fake_initrd())
    p = Project(tmp_path / "project")
    k, i = stages.fast_boot_files(p, kernel, initrd)
    assert k.read_bytes() == elf_with_notes([(b"Xen", 18)])
    assert initramfs.read_cpio(i.read_bytes())[1] == i.stat().st_size  # one uncompressed archive
    assert k.parent.parent == p.store.store / "fast_boot"  # a normal entry: store_gc and `doit store` see it
    assert stages.fast_boot_files(p, kernel, initrd) == (k, i)
    # unusable inputs: the entry holds the originals
    kernel.write_bytes(b"not a bzImage")
    initrd.write_bytes(b"garbage")
    k2, i2 = stages.fast_boot_files(p, kernel, initrd)
    assert k2 != k and k2.read_bytes() == b"not a bzImage" and i2.read_bytes() == b"garbage"
