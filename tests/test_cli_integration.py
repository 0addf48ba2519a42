"""The console scripts on real inputs: suco on the real engine, the stage commands on real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, on_console, require_docker

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def cli(name: str, *args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], cwd=cwd, input=input, capture_output=True, text=True,
                          timeout=900)


# -- suco --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suco_dir(tmp_path_factory) -> Path:
    require_docker()
    d = tmp_path_factory.mktemp("suco")
    (d / "in.txt").write_text("from the host\n")
    return d


def test_suco_passes_exit_status_and_separates_streams(suco_dir):
    p = cli("suco", "sh", "-c", "cat in.txt; echo to-stderr >&2; exit 3", cwd=suco_dir)
    assert p.returncode == 3
    assert p.stdout == "from the host\n"  # nothing but CMD's stdout: build chatter goes to stderr
    assert "to-stderr" in p.stderr and "to-stderr" not in p.stdout


def test_suco_is_root_with_the_current_folder_at_work_and_stdin(suco_dir):
    p = cli("suco", "--", "sh", "-c", "id -u; pwd; cat > written.txt", cwd=suco_dir, input="piped in\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", "/work"]
    assert (suco_dir / "written.txt").read_text() == "piped in\n"


def test_suco_can_do_what_needs_privileges(suco_dir):
    p = cli("suco", "sh", "-c", "mount -t tmpfs none /mnt && echo mounted", cwd=suco_dir)
    assert p.returncode == 0 and p.stdout.strip() == "mounted", p.stderr


def test_suco_unknown_recipe_is_one_line(suco_dir):
    p = cli("suco", "--image", "nope", "true", cwd=suco_dir)
    assert p.returncode == 2
    assert p.stderr.startswith("error: unknown recipe 'nope'") and "Traceback" not in p.stderr


# -- the stage commands ------------------------------------------------------------------------


def test_build_efistub_on_a_tgz_file_prints_where_the_image_is(hello_tgz, tmp_path):
    outside = tmp_path / "my-rootfs.tgz"
    os.link(hello_tgz, outside)  # a file outside recipes/
    p = cli("build-efistub", str(outside))
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("UEFI disk image: ")
    image = Path(line.removeprefix("UEFI disk image: "))
    assert image.is_file() and image.is_relative_to(ROOT / "cache" / "store")
    again = cli("build-efistub", str(outside))  # the same cache: the second time is a store hit
    assert again.stdout == p.stdout and "restored from the store" in again.stderr


def test_stage_commands_have_help_and_clear_errors(tmp_path):
    for name in ("build-tgz", "run-tgz", "build-syslinux-bios", "run-bios", "build-efistub", "run-uefi", "run-dir",
                 "virt", "suco"):
        p = cli(name, "--help")
        assert p.returncode == 0 and "usage:" in p.stdout, name
        assert "root" in p.stdout.lower(), name  # what it needs of the host: root, the Docker socket, /dev/kvm
    p = cli("run-bios", str(tmp_path / "missing.img"))
    # before the error, at most the tool's one-time note (e.g. that root is not needed)
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert lines[-2:] == [f"error: {tmp_path / 'missing.img'}: no such disk image",
                          "  hint: build one with build-syslinux-bios or build-efistub"]
    assert all(ln.startswith("run-bios: ") for ln in lines[:-2])
    p = cli("build-syslinux-bios", str(tmp_path / "missing.tgz"))
    assert p.returncode == 2 and "no such file" in p.stderr


@pytest.fixture(scope="module")
def mmdebstrap_tree(tmp_path_factory) -> Path:
    """A root folder with a kernel and initrd in boot/, as mmdebstrap leaves it."""
    tree = tmp_path_factory.mktemp("mmdebstrap") / "root"
    subprocess.run(["mmdebstrap", "--variant=minbase", "--quiet",
                    "--include=linux-image-amd64,initramfs-tools,systemd-sysv,udev",
                    "--customize-hook=chroot \"$1\" passwd -d root",
                    "bookworm", str(tree), "http://deb.debian.org/debian"], check=True, timeout=900)
    return tree


def test_run_dir_boots_an_mmdebstrap_tree(mmdebstrap_tree):
    """run-dir on a pty: the tree becomes a cached ext4 image and boots to a login prompt."""
    seen, status = on_console([str(BIN / "run-dir"), "--no-net", str(mmdebstrap_tree)], mmdebstrap_tree.parent)
    assert b"root image: " in seen
    assert status == 0
