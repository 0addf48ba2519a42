"""The design's own formats on the real engine and real boots: recipes/debian-mnt (a Debian
bootstrapped into /mnt by docker build, [build] rootfs = "/mnt") through the whole boot matrix,
and debian-install's tree booted by run-dir."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, doit, on_console, require_docker

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def test_debian_mnt_is_its_mnt_rerooted_and_boots_in_every_mode():
    require_docker()
    doit("build_tgz:debian-mnt")
    names, hostname = [], None
    with tarfile.open(ROOT / "cache" / "recipes" / "debian-mnt" / "rootfs.tgz", "r|gz") as t:
        for ti in t:
            names.append(ti.name)
            if ti.name == "./etc/hostname":
                hostname = t.extractfile(ti).read()
    assert names[0] == "." and all(n == "." or n.startswith("./") for n in names)
    assert any(n.startswith("./boot/vmlinuz-") for n in names) and "./usr/sbin/init" in names  # merged /usr
    assert not any(n.startswith("./mnt/") for n in names)  # not the builder container around it
    assert "./usr/bin/mmdebstrap" not in names  # the builder's tool stayed in the builder
    assert "./.dockerenv" not in names and "./etc/resolv.conf" not in names
    assert hostname in (None, b"debian-mnt\n")  # never the build container's id

    out = doit("check_boot:debian-mnt")
    text = out.stdout + out.stderr
    rows = [line.split() for line in text.splitlines() if line.startswith("debian-mnt ")]
    assert [(r[1], r[2]) for r in rows] == [("tgz", "pass"), ("bios", "pass"), ("uefi", "pass")], text


@pytest.fixture(scope="module")
def installed_tree(tmp_path_factory) -> Path:
    """debian-install DIR (as root in CI: mmdebstrap's root mode)."""
    tree = tmp_path_factory.mktemp("debian-install") / "root"
    p = subprocess.run([sys.executable, "-m", "pipeline.install", str(tree)], capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(f"Debian bookworm in {tree} (kernel ") and f"run-dir {tree}" in p.stdout
    return tree


def test_debian_install_makes_a_tree_with_its_kernel_in_boot(installed_tree):
    assert list((installed_tree / "boot").glob("vmlinuz-*")) and list((installed_tree / "boot").glob("initrd.img-*"))
    assert (installed_tree / "lib" / "systemd" / "systemd").exists()


def test_run_dir_boots_the_debian_install_tree(installed_tree):
    """run-dir on a pty, as a user would: the tree becomes a cached ext4 image and boots to a login prompt."""
    seen, status = on_console([str(BIN / "run-dir"), "--no-net", str(installed_tree)], installed_tree.parent)
    assert b"root image: " in seen
    assert status == 0


def test_build_tgz_builds_a_containerfile_folder(tmp_path):
    """The engine gets the Containerfile by name (dockerfile=) inside the uploaded context."""
    require_docker()
    d = tmp_path / "ldtt-containerfile"
    d.mkdir()
    (d / "Containerfile").write_text("FROM ldt/debian-bookworm\nRUN echo built-from-a-containerfile > /marker\n")
    try:
        p = subprocess.run([str(BIN / "build-tgz"), str(d)], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        tgz = Path(p.stdout.strip().splitlines()[-1].removeprefix("rootfs tgz: "))
        with tarfile.open(tgz) as t:
            assert t.extractfile("marker").read() == b"built-from-a-containerfile\n"
    finally:
        subprocess.run("docker images --format '{{.Repository}}:{{.Tag}}' ldt/ldtt-containerfile | xargs -r docker rmi",
                       shell=True, capture_output=True)
