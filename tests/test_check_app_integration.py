"""[check] commands beside an app run by our init, booted for real (TCG here), tgz mode only: our
init finds check_boot's second serial port and starts a root shell there; the commands run in it
while the app serves (busybox's wget reaches it, the image has no HTTP client), a failing one
fails the mode with its status, and the VM is stopped the usual way afterwards (the app's exit)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project, require_docker

from pipeline import vm
from pipeline.console import CheckSettings, Verdict
from pipeline.project import Project
from pipeline.qemu import Mode

pytestmark = pytest.mark.integration


def files_of(name: str) -> dict[str, str]:
    return {f.name: f.read_text() for f in (ROOT / "recipes" / name).iterdir() if f.is_file()}


def test_commands_run_beside_the_app_on_the_check_port(tmp_path):
    require_docker()
    doit("build_tgz:webapp", "build_tgz:virt")  # the repository's store: the entries to seed from
    proj = make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
                                         "virt": files_of("virt"), "webapp": files_of("webapp")})
    shutil.rmtree(proj / "cache" / "store" / "check", ignore_errors=True)
    doit("build_rootfs:webapp", "extract_boot:webapp", "build_app:webapp", "extract_boot:virt", cwd=proj)
    p = Project(proj)
    checks = CheckSettings(run=("wget -qO- http://127.0.0.1:8000/ | head -c 200; id -u", "cat /no-such-file"),
                           timeout=60)
    r = dataclasses.replace(p.recipe("webapp"), checks=checks)
    res = vm.check_one(p, r, Mode.TGZ, vm.kvm.select_accel(cache_dir=p.store.root).accel)
    table = vm.check_table("webapp", [res])
    print(table, res.tail[-20:])
    assert not res.ok and res.reason == "`cat /no-such-file` exited with status 1", res
    assert "$ cat /no-such-file  (status 1)" in table
    served, missing = res.commands
    assert served.verdict is Verdict.PASSED and "hello" in served.output.lower() and served.output.endswith("0")
    assert missing.verdict is Verdict.FAILED and "no-such-file" in missing.output
    assert res.passed_by == "HTTP 200 /" and res.stopped == "exit 143"  # then stopped like any app check
