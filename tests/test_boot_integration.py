"""The boot matrix on real artifacts under the accelerator this host allows (TCG here).

Runs in a throwaway project seeded with the repository's store, minus the cached boot-check
results, so every boot here is a real boot.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project, on_console

from pipeline.cache import hash_file

pytestmark = pytest.mark.integration

HELLO = {f.name: f.read_text() for f in (ROOT / "recipes" / "hello").iterdir() if f.is_file()}


@pytest.fixture(scope="module")
def boot_project(hello_artifacts, tmp_path_factory) -> Path:
    proj = make_project(tmp_path_factory.mktemp("boot"), {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
                                                          "hello": HELLO})
    shutil.rmtree(proj / "cache" / "store" / "check", ignore_errors=True)
    return proj


def artifact_hashes(proj: Path) -> dict[str, str]:
    d = proj / "cache" / "recipes" / "hello"
    return {name: hash_file(d / name) for name in ("rootfs.ext4", "bios.img", "uefi.img", "vmlinuz", "initrd.img")}


def test_check_boot_hello_all_modes_then_cached(boot_project):
    doit("build_efistub:hello", "build_syslinux_bios:hello", cwd=boot_project)  # store hits
    before = artifact_hashes(boot_project)

    out = doit("check_boot:hello", cwd=boot_project)
    text = out.stdout + out.stderr
    rows = [line.split() for line in text.splitlines() if line.startswith("hello ")]
    assert [(r[1], r[2]) for r in rows] == [("tgz", "pass"), ("bios", "pass"), ("uefi", "pass")], text
    assert "(cached)" not in text
    assert all(0 < float(r[3]) < 600 for r in rows)
    assert "accelerator:" in text  # the one-line notice says which and why
    assert "doit run_uefi:hello" in text  # ... and how to boot it interactively

    # booting never changes a cached artifact
    assert artifact_hashes(boot_project) == before

    # unchanged images are not booted again
    t = time.monotonic()
    again = doit("check_boot:hello", cwd=boot_project)
    assert (again.stdout + again.stderr).count("(cached)") == 3
    assert time.monotonic() - t < 20


def test_broken_recipe_fails_with_the_console_tail(hello_artifacts, tmp_path):
    # Root on a UUID that does not exist: initramfs-tools gives up, panic=-1 ends the VM at once.
    broken = {"Dockerfile": "FROM ldt/hello\n",
              "recipe.toml": '[boot]\ncmdline = "root=UUID=00000000-0000-4000-8000-000000000000 rootdelay=2 '
                             'panic=-1"\ntimeout = 240\n'}
    proj = make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}, "hello": HELLO,
                                         "ldtt-broken": broken})
    checks = proj / "cache" / "store" / "check"
    passes_before = set(checks.iterdir()) if checks.is_dir() else set()
    try:
        t = time.monotonic()
        out = doit("check_boot:ldtt-broken", cwd=proj, check=False)
        print(text := out.stdout + out.stderr)
        assert out.returncode != 0, text
        assert "boot check failed for tgz, bios, uefi" in text
        assert "last console lines" in text
        assert "00000000-0000-4000-8000-000000000000" in text  # the guest's own complaint, from the tail
        assert "Traceback" not in text
        assert time.monotonic() - t < 600
        assert (set(checks.iterdir()) if checks.is_dir() else set()) == passes_before  # failures are not cached
    finally:
        # by tag: the image id is ldt/hello's too (FROM ldt/hello, no RUN)
        subprocess.run("docker images --format '{{.Repository}}:{{.Tag}}' ldt/ldtt-broken | xargs -r docker rmi",
                       shell=True, capture_output=True)


def test_run_tgz_attaches_the_terminal_and_quits_with_ctrl_a_x(boot_project):
    """`doit run_tgz:hello` on a pseudo-terminal: the guest's login prompt arrives, Ctrl-A X quits."""
    seen, status = on_console([sys.executable, "-m", "doit", "run_tgz:hello", "--no-net"], boot_project, timeout=300)
    assert b"Ctrl-A X" in seen  # how to quit, printed once
    assert status == 0
