"""pipeline.virt without a VM: the cpio writer and reader, the guest scripts, the qemu command
line, the fast-boot transformations and the checks."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline import virt
from pipeline.errors import UserError
from pipeline.qemu import Accel
from pipeline.virt import VirtOptions

FDS = {"stdin": 10, "stdout": 11, "stderr": 12, "control": 13}


def qemu_cmd(tmp_path: Path, **opts) -> list[str]:
    return virt.virt_qemu_cmd(
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        rootfs=tmp_path / "root.ext4",
        workdir=tmp_path / "work",
        options=VirtOptions(**opts),
        accel=Accel.TCG,
        fds=FDS,
        console_log=tmp_path / "console.log",
    )


def option(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


# ── cpio ────────────────────────────────────────────────────────────────────────────────


def test_make_cpio_round_trips_through_our_reader():
    archive = virt.make_cpio({"b/c/init": b"#!/bin/sh\n", "a": b"x" * 5})
    members, end = virt.read_cpio(archive)
    assert end == len(archive)
    assert [m.name for m in members] == ["a", "b", "b/c", "b/c/init"]
    modes = {m.name: m.mode for m in members}
    assert stat.S_ISDIR(modes["b/c"]) and stat.S_ISREG(modes["b/c/init"])
    assert stat.S_IMODE(modes["b/c/init"]) == 0o755
    assert all(len(m.raw) % 4 == 0 for m in members)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio tool to cross-check with")
def test_make_cpio_is_read_by_gnu_cpio(tmp_path: Path):
    archive = virt.make_cpio({"dir/file": b"content\n", "odd name": b""})
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "dir" / "file").read_bytes() == b"content\n"
    assert (tmp_path / "odd name").exists()


def test_make_cpio_refuses_escaping_names():
    with pytest.raises(ValueError):
        virt.make_cpio({"../etc/passwd": b""})


def test_pad4_aligns_the_appended_archive():
    assert [len(virt.pad4(n)) for n in range(5)] == [0, 3, 2, 1, 0]


# ── the guest scripts ───────────────────────────────────────────────────────────────────


NASTY_ARGV = ["printf", "%s|", "it's", "a b", "$HOME", "`id`", "new\nline", "", "-", "*", "\\", "é"]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX sh")
def test_argv_script_gives_back_the_exact_argv(tmp_path: Path):
    conf = tmp_path / "conf"
    conf.write_text(virt.argv_script(NASTY_ARGV, ro=True, net=False, term="xterm"))
    out = subprocess.run(
        ["sh", "-c", '. "$1"; echo "$LDT_RO$LDT_NET$LDT_TERM"; printf "%s\\0" "$@"', "sh", conf],
        capture_output=True,
        check=True,
    ).stdout
    flags, _, rest = out.partition(b"\n")
    assert flags == b"10xterm"
    assert rest.split(b"\0")[:-1] == [a.encode() for a in NASTY_ARGV]


def test_argv_script_needs_a_command():
    with pytest.raises(ValueError):
        virt.argv_script([], ro=False, net=False, term=None)


def test_init_script_is_filled_in_and_parses():
    script = virt.init_script()
    assert not re.search(r"@[A-Z_]+@", script)
    assert f"{virt.MOUNT_TAG} $R/work" in script
    assert "msize=524288" in script
    if shutil.which("sh"):
        subprocess.run(["sh", "-n"], input=script.encode(), check=True)


def test_virt_cpio_holds_init_and_settings():
    members, _ = virt.read_cpio(virt.virt_cpio(["true"], options=VirtOptions(ro=True), term=None))
    names = {m.name: m for m in members}
    assert set(names) == {virt.INIT, virt.CONF}
    assert b"LDT_RO=1" in names[virt.CONF].raw


def test_kernel_cmdline_carries_no_argv():
    line = virt.virt_kernel_cmdline()
    assert f"rdinit=/{virt.INIT}" in line and "quiet" in line and "panic=-1" in line
    assert "root=" not in line  # the init script mounts the root itself


# ── the qemu command line ───────────────────────────────────────────────────────────────


def test_qemu_cmd_defaults(tmp_path: Path):
    cmd = qemu_cmd(tmp_path)
    assert "-no-reboot" in cmd and "-nodefaults" in cmd
    assert option(cmd, "-accel") == ["tcg"]
    assert option(cmd, "-m") == ["1024"] and option(cmd, "-smp") == ["1"]
    (drive,) = option(cmd, "-drive")
    assert "snapshot=on" in drive and "format=raw" in drive
    (fsdev,) = option(cmd, "-fsdev")
    assert fsdev == f"local,id=work,path={tmp_path / 'work'},security_model=none"
    assert "-netdev" not in cmd  # no network unless asked
    assert option(cmd, "-serial") == [f"file:{tmp_path / 'console.log'}"]
    chardevs = option(cmd, "-chardev")
    assert chardevs == [f"socket,id={p},fd={fd}" for p, fd in FDS.items()]
    ports = [d for d in option(cmd, "-device") if d.startswith("virtserialport")]
    assert [d.rsplit("name=", 1)[1] for d in ports] == ["ldt.stdin", "ldt.stdout", "ldt.stderr", "ldt.control"]


def test_qemu_cmd_ro_net_and_sizes(tmp_path: Path):
    cmd = qemu_cmd(tmp_path, ro=True, net=True, memory=512, cpus=2)
    assert option(cmd, "-fsdev")[0].endswith(",readonly=on")
    assert option(cmd, "-netdev") == ["user,id=net0"]
    assert "virtio-net-pci,netdev=net0,romfile=" in option(cmd, "-device")
    assert option(cmd, "-m") == ["512"] and option(cmd, "-smp") == ["2"]
    assert option(cmd, "-accel") == ["tcg,thread=multi"]


def test_qemu_cmd_escapes_commas_in_paths(tmp_path: Path):
    cmd = virt.virt_qemu_cmd(
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        rootfs=tmp_path / "a,b.ext4",
        workdir=tmp_path / "w,x",
        options=VirtOptions(),
        accel=Accel.KVM,
        fds=FDS,
        console_log=tmp_path / "c",
        bios=Path("/usr/share/qemu/qboot.rom"),
    )
    assert "a,,b.ext4" in option(cmd, "-drive")[0]
    assert "path=" + os.fspath(tmp_path / "w,,x") + "," in option(cmd, "-fsdev")[0]
    assert option(cmd, "-bios") == ["/usr/share/qemu/qboot.rom"]
    assert option(cmd, "-accel") == ["kvm"]


def test_qemu_cmd_needs_every_port(tmp_path: Path):
    with pytest.raises(ValueError, match="control"):
        virt.virt_qemu_cmd(
            kernel=tmp_path / "k", initrd=tmp_path / "i", rootfs=tmp_path / "r", workdir=tmp_path,
            options=VirtOptions(), accel=Accel.TCG, fds={"stdin": 3, "stdout": 4, "stderr": 5},
            console_log=tmp_path / "c",
        )  # fmt: skip


@pytest.mark.parametrize("bad", [{"memory": 64}, {"cpus": 0}, {"timeout": 0}])
def test_options_are_checked(bad):
    with pytest.raises(UserError):
        VirtOptions(**bad)


# ── checks and guest errors ─────────────────────────────────────────────────────────────


def test_check_workdir(tmp_path: Path):
    assert virt.check_workdir(tmp_path) == tmp_path.resolve()
    for refused in ("/", "/proc"):
        with pytest.raises(UserError, match="refusing"):
            virt.check_workdir(Path(refused))
    with pytest.raises(UserError, match="does not exist"):
        virt.check_workdir(tmp_path / "gone")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        virt.check_workdir(tmp_path / "file")


def test_check_workdir_unreadable(tmp_path: Path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    if os.geteuid() == 0:  # root reads every directory: let access() answer as for anybody else
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    try:
        with pytest.raises(UserError, match="not readable"):
            virt.check_workdir(locked)
    finally:
        locked.chmod(0o755)


def test_guest_error_names_the_module_and_the_package():
    console = "[    2.1] virtio_blk virtio1: [vda]\nldt-virt-error: root-module 9p\n[    2.2] sysrq: Resetting\n"
    error = virt.guest_error(console)
    assert error is not None
    assert error.message == "module 9p is missing from the image"
    assert "linux-image-amd64" in error.hint
    assert virt.guest_error("no tag here") is None
    initrd = virt.guest_error("ldt-virt-error: initrd-module virtio_blk")
    assert initrd is not None and "initrd" in initrd.message and "MODULES=most" in initrd.hint


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
    closure = virt.module_closure(MODULES_DEP, SOFTDEP, ALIAS, ["virtio_pci", "virtio_blk", "ext4", "builtin_x"])
    assert closure == {
        "kernel/fs/ext4/ext4.ko", "kernel/lib/crc16.ko", "kernel/fs/jbd2/jbd2.ko",
        "kernel/crypto/crc32c_generic.ko", "kernel/arch/x86/crypto/crc32c-intel.ko",
        "kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/block/virtio_blk.ko",
    }  # fmt: skip


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
    early = virt.make_cpio({"kernel/x86/microcode/AuthenticAMD.bin": b"ucode"})
    main = gzip.compress(virt.make_cpio(files))
    return early + main


def test_slim_initrd_keeps_tools_and_needed_modules_only():
    slim = virt.slim_initrd(fake_initrd())
    members, end = virt.read_cpio(slim)
    assert end == len(slim)
    names = {m.name for m in members}
    assert "usr/bin/sh" in names and "kernel/x86/microcode/AuthenticAMD.bin" in names
    assert "usr/lib/modules/6.1.0-1-amd64/kernel/fs/ext4/ext4.ko" in names
    assert "usr/lib/modules/6.1.0-1-amd64/modules.dep" in names
    assert "usr/lib/modules/6.1.0-1-amd64/kernel/drivers/gpu/drm/huge.ko" not in names
    assert "usr/lib/firmware/big.bin" not in names


def test_initrd_archives_rejects_garbage():
    with pytest.raises(ValueError):
        virt.initrd_archives(b"not an initrd")


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
    assert virt.has_pvh_note(elf_with_notes([(b"GNU", 3), (b"Xen", 18)]))
    assert not virt.has_pvh_note(elf_with_notes([(b"Xen", 6)]))
    assert not virt.has_pvh_note(b"MZ not an elf")


def test_extract_vmlinux_from_an_xz_bzimage():
    elf = elf_with_notes([(b"Xen", 18)])
    assert virt.extract_vmlinux(fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\1\2\3\4")) == elf
    assert virt.extract_vmlinux(fake_bzimage(gzip.compress(elf))) == elf
    no_pvh = elf_with_notes([(b"GNU", 3)])
    assert virt.extract_vmlinux(fake_bzimage(gzip.compress(no_pvh))) is None
    assert virt.extract_vmlinux(b"not a kernel") is None


def test_fast_boot_files_are_cached_and_fall_back(tmp_path: Path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(fake_bzimage(gzip.compress(elf_with_notes([(b"Xen", 18)]))))
    initrd.write_bytes(fake_initrd())
    cache = tmp_path / "cache"
    k, i = virt.fast_boot_files(kernel, initrd, cache)
    assert k.name == "vmlinux" and i.name == "initrd.cpio"
    assert virt.fast_boot_files(kernel, initrd, cache) == (k, i)
    # unusable inputs: boot the originals
    kernel.write_bytes(b"not a bzImage")
    initrd.write_bytes(b"garbage")
    assert virt.fast_boot_files(kernel, initrd, cache) == (kernel, initrd)
