"""debian-install: the mmdebstrap command line as a list, and the checks around it (no mmdebstrap run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import install, mmdebstrap
from pipeline.errors import UserError
from pipeline.install import Install, mmdebstrap_install_cmd, parse_include
from pipeline.mmdebstrap import PrivilegeMode as Mode


def test_the_command_as_root():
    assert mmdebstrap_install_cmd(Install(), Path("/srv/tree"), Mode.ROOT) == [
        "mmdebstrap", "--mode=root", "--variant=minbase",
        "--include=linux-image-amd64,initramfs-tools,systemd-sysv,udev",
        '--customize-hook=chroot "$1" passwd -d root',
        "bookworm", "/srv/tree", "http://deb.debian.org/debian"]


def test_the_command_rootless_with_every_option():
    spec = Install(suite="trixie", variant="important", include=("vim", "udev", "openssh-server"),
                   mirror="http://mirror.example/debian")
    cmd = mmdebstrap_install_cmd(spec, Path("tree"), Mode.UNSHARE)
    assert cmd[:3] == ["mmdebstrap", "--mode=unshare", "--variant=important"]
    assert cmd[3] == "--include=linux-image-amd64,initramfs-tools,systemd-sysv,udev,vim,openssh-server"  # no twice
    assert cmd[-3:] == ["trixie", "tree", "http://mirror.example/debian"]


def test_mode_follows_the_uid():
    assert Mode.for_uid(0) is Mode.ROOT and Mode.for_uid(1000) is Mode.UNSHARE


def test_tree_reader_goes_through_the_unshare_helper_only_for_a_shifted_tree():
    tar = ["tar", "-C", "/t", "-cf", "-", "."]
    assert mmdebstrap.unshare_helper_cmd(tar, shifted=False) == tar
    assert mmdebstrap.unshare_helper_cmd(tar, shifted=True) == ["mmdebstrap", "--unshare-helper", *tar]


def test_parse_include():
    assert parse_include("") == ()
    assert parse_include(" vim, openssh-server ,libc6:amd64,gcc=4:12.2.0-3") == (
        "vim", "openssh-server", "libc6:amd64", "gcc=4:12.2.0-3")
    with pytest.raises(UserError, match="'Vim;' is not a Debian package name"):
        parse_include("Vim;")


def test_the_target_must_be_new_or_empty(tmp_path):
    install.check_target(tmp_path / "new")
    install.check_target(tmp_path)
    (tmp_path / "x").write_text("")
    with pytest.raises(UserError, match="not an empty folder"):
        install.check_target(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        install.check_target(tmp_path / "a" / "b")


def test_kernel_of_wants_a_kernel_with_its_initrd(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    with pytest.raises(UserError, match="without a kernel and initrd"):
        install.kernel_of(tmp_path)
    for name in ("vmlinuz-6.1.0-50-amd64", "initrd.img-6.1.0-50-amd64", "vmlinuz-6.1.0-9-amd64"):
        (boot / name).write_text("")
    assert install.kernel_of(tmp_path) == "6.1.0-50-amd64"


def test_no_mmdebstrap_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="mmdebstrap not found") as info:
        install.debian_install(Install(), tmp_path / "t")
    assert "apt-get install mmdebstrap" in info.value.hint


def test_debian_install_runs_the_command_for_the_mode(monkeypatch, tmp_path):
    ran = []

    def fake_run(cmd):
        ran.append(cmd)
        (tmp_path / "t" / "boot").mkdir(parents=True)
        for name in ("vmlinuz-6.1.0-50-amd64", "initrd.img-6.1.0-50-amd64"):
            (tmp_path / "t" / "boot" / name).write_text("")

    monkeypatch.setattr(install.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(install, "run", fake_run)
    assert install.debian_install(Install(), tmp_path / "t", uid=1000) == "6.1.0-50-amd64"
    assert ran == [mmdebstrap_install_cmd(Install(), tmp_path / "t", Mode.UNSHARE)]


def test_help_has_the_sentence_about_root(capsys):
    with pytest.raises(SystemExit) as info:
        install.debian_install_main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: debian-install" in out and "unshare mode" in out and "run-dir DIR" in out
