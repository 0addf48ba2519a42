"""The boot matrix on real artifacts under the accelerator this host allows (TCG here).

Runs in a throwaway project seeded with the repository's store, minus the cached boot-check
results, so every boot here is a real boot.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project, on_console

from pipeline import vm
from pipeline.cache import hash_file
from pipeline.console import CheckSettings
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.qemu import Mode
from pipeline.report import ReportPaths

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
    print(text)
    rows = [line.split() for line in text.splitlines() if line.startswith("hello ")]
    assert [(r[1], r[2]) for r in rows] == [("tgz", "pass"), ("bios", "pass"), ("uefi", "pass")], text
    assert "(cached)" not in text
    assert all(0 < float(r[3]) < 600 for r in rows)
    assert "accelerator:" in text  # the one-line notice says which and why
    assert "doit run_uefi:hello" in text  # ... and how to boot it interactively
    # hello has systemd: the default in-image check logs in on ttyS0 and finds no failed units, per mode
    assert len([line for line in text.splitlines() if line.lstrip().startswith("pass") and "$ [ -d " in line]) == 3
    junit = ET.parse(boot_project / "cache" / "reports" / "check_boot.xml").getroot()
    cases = [c.get("name") for c in junit.iter("testcase")]
    assert len(cases) == 6 and {"tgz: boot", "bios: boot", "uefi: boot"} <= set(cases), cases
    assert junit.get("failures") == "0" and (boot_project / "cache" / "reports" / "check_boot.html").is_file()

    # booting never changes a cached artifact
    assert artifact_hashes(boot_project) == before

    # unchanged images are not booted again
    t = time.monotonic()
    again = doit("check_boot:hello", cwd=boot_project)
    assert (again.stdout + again.stderr).count("(cached)") == 3
    assert time.monotonic() - t < 20
    assert len(list(ET.parse(boot_project / "cache" / "reports" / "check_boot.xml").getroot().iter("testcase"))) == 6


def qemus_of(project: Path) -> list[int]:
    """QEMU processes booting something of this project (its store's files are on their command line)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and b"qemu-system" in args[0] and any(str(project).encode() in a for a in args):
                found.append(int(d.name))
    return found


def test_check_commands_pass_fail_and_hang_show_in_the_junit_xml(boot_project, tmp_path):
    """hello with [check] commands in tgz mode: the README's example and one more pass, one fails
    (status, output), one hangs (the command timeout ends it, the VM is stopped); the JUnit XML
    says so in the shape CI reads."""
    doit("build_rootfs:hello", "extract_boot:hello", "build_app:hello", cwd=boot_project)  # store hits
    p = Project(boot_project)
    readme = "systemctl is-system-running --wait"  # the README's [check] example, as written there
    assert f'run = ["{readme}"]' in (ROOT / "README.md").read_text()
    checks = CheckSettings(run=(readme, "echo inside-ok; uname -s", "echo oops-from-inside; exit 3", "sleep 600"),
                           timeout=20)
    r = dataclasses.replace(p.recipe("hello"), checks=checks)
    paths = ReportPaths.beside(tmp_path / "junit" / "check.xml")
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        vm.check_boot(p, r, (Mode.TGZ,), reports=paths)
    print(e.value.message)
    assert "`echo oops-from-inside; exit 3` exited with status 3" in e.value.message
    assert "oops-from-inside" in e.value.message  # its output, in the error (and the table)
    assert time.monotonic() - t < 600
    assert qemus_of(boot_project) == []  # the hang stopped the VM: nothing left running

    root = ET.parse(paths.xml).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "check_boot.hello"
    assert {k: suite.get(k) for k in ("tests", "failures", "errors")} == {"tests": "5", "failures": "1", "errors": "1"}
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert all(c.get("classname") == "check_boot.hello" and float(c.get("time")) >= 0 for c in cases.values())
    assert cases["tgz: boot"].find("failure") is None
    example = cases[f"tgz: {readme}"]
    assert example.find("failure") is None and example.findtext("system-out").strip() == "running"
    passed = cases["tgz: echo inside-ok; uname -s"]
    assert passed.find("failure") is None and "Linux" in passed.findtext("system-out")
    failed = cases["tgz: echo oops-from-inside; exit 3"].find("failure")
    assert failed is not None and failed.get("message") == "`echo oops-from-inside; exit 3` exited with status 3"
    assert "oops-from-inside" in failed.text and "last console lines" in failed.text
    hung = cases["tgz: sleep 600"].find("error")
    assert hung is not None and "did not finish within 20s" in hung.get("message")
    etree = pytest.importorskip("lxml.etree")
    schema = etree.XMLSchema(etree.parse(str(Path(__file__).with_name("data") / "junit-jenkins.xsd")))
    assert schema.validate(etree.parse(str(paths.xml))), schema.error_log
    assert paths.html.is_file() and "oops-from-inside" in paths.html.read_text()
    stored = [m.read_text() for m in (p.store.root / "check").glob("*/manifest.json")]
    assert not any("oops-from-inside" in m for m in stored)  # a failure is never stored as a pass


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
