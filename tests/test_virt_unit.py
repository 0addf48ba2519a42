"""pipeline.virt without a VM: the guest scripts, the qemu command line and the checks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import initramfs, qemu, virt
from pipeline.errors import UserError
from pipeline.qemu import Accel
from pipeline.virt import VirtOptions

FDS = {"stdin": 10, "stdout": 11, "stderr": 12, "control": 13}


def qemu_cmd(tmp_path: Path, **opts) -> list[str]:
    return qemu.virt_cmd(
        virt.machine(VirtOptions(**opts), kernel=tmp_path / "vmlinux", rootfs=tmp_path / "root.ext4", accel=Accel.TCG),
        initrd=tmp_path / "initrd",
        workdir=tmp_path / "work",
        fds=FDS,
        console_log=tmp_path / "console.log",
    )


def option(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


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
    members, _ = initramfs.read_cpio(virt.virt_cpio(["true"], options=VirtOptions(ro=True), term=None))
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
    cmd = qemu.virt_cmd(
        virt.machine(VirtOptions(), kernel=tmp_path / "k", rootfs=tmp_path / "a,b.ext4", accel=Accel.KVM,
                     bios=Path("/usr/share/qemu/qboot.rom")),
        initrd=tmp_path / "i",
        workdir=tmp_path / "w,x",
        fds=FDS,
        console_log=tmp_path / "c",
    )
    assert "a,,b.ext4" in option(cmd, "-drive")[0]
    assert "path=" + os.fspath(tmp_path / "w,,x") + "," in option(cmd, "-fsdev")[0]
    assert option(cmd, "-bios") == ["/usr/share/qemu/qboot.rom"]
    assert option(cmd, "-accel") == ["kvm"]


def test_qemu_cmd_needs_every_port(tmp_path: Path):
    with pytest.raises(ValueError, match="control"):
        qemu.virt_cmd(
            virt.machine(VirtOptions(), kernel=tmp_path / "k", rootfs=tmp_path / "r", accel=Accel.TCG),
            initrd=tmp_path / "i", workdir=tmp_path, fds={"stdin": 3, "stdout": 4, "stderr": 5},
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


