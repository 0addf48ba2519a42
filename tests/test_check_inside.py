"""check_boot's in-image commands, wired: headless hands the console it read to a console
session after the check passed (a fake 'qemu': sh behind a fake getty on the console socket),
vm turns what ran into the table, the error and the report's records, and keys passes by the
commands; graph gives check_boot its --junit and ci_plan its task."""

from __future__ import annotations

import dataclasses
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import process_gone

from pipeline import graph, headless, report, stages, vm
from pipeline.app import InitKind, Plan
from pipeline.console import SYSTEMD_FAILED_UNITS, CheckSettings, CommandResult, Login, Step, Verdict
from pipeline.errors import UserError
from pipeline.qemu import Mode

# A 'qemu' whose serial console is a getty stand-in: the prompt, then a shell (sh -i prompts on
# stderr, so 2>&1). boot_to_marker appends -qmp …, which sh takes as $1, $2. The pid file proves
# it is gone afterwards.
GETTY = """echo $$ > {pid}; echo 'Debian GNU/Linux 12 host ttyS0'; echo; printf 'host login: '; read user;
{password}exec sh -i 2>&1"""
ASK_PASSWORD = """printf 'Password: '; read pw; if [ "$pw" != s3cret ]; then echo; echo 'Login incorrect';
printf 'host login: '; sleep 30; exit 1; fi; """


def fake_qemu(tmp_path: Path, *, password: bool = False, script: str | None = None) -> tuple[list[str], Path]:
    pid = tmp_path / "pid"
    body = script or GETTY.format(pid=pid, password=ASK_PASSWORD if password else "")
    return ["sh", "-c", body.replace("{pid}", str(pid))], pid


def gone(pidfile: Path) -> bool:
    return process_gone(int(pidfile.read_text()))


def test_commands_run_after_the_login_prompt_with_status_and_output(tmp_path):
    cmd, pid = fake_qemu(tmp_path)
    inside = headless.Inside(("echo one; echo two", "echo bad >&2; exit 3"), Login("root"), timeout=10,
                             login_timeout=10, env={})
    res = headless.boot_to_marker(cmd, timeout=20, inside=inside)
    assert res.ok and res.inside is not None, res
    ok, bad = res.inside.commands
    assert (ok.status, ok.output) == (0, "one\ntwo")
    assert (bad.status, bad.output, bad.verdict) == (3, "bad", Verdict.FAILED)
    assert not res.inside.ok and not res.inside.login_error
    assert any("host login:" in line for _, line in res.log)  # the whole console, stamped, for the report
    steps = res.inside.steps  # where the seconds went, on the console log's clock
    assert [s for _, s in steps][:2] == [Step.LOGIN_PROMPT, Step.USER_SENT] and Step.READY in {s for _, s in steps}
    assert all(0 < t <= res.log[-1][0] + 1 for t, _ in steps) and [t for t, _ in steps] == sorted(t for t, _ in steps)
    assert gone(pid)


def test_a_password_from_the_environment_is_never_kept(tmp_path):
    cmd, pid = fake_qemu(tmp_path, password=True)
    inside = headless.Inside(("echo in",), Login("root", "PW"), timeout=10, login_timeout=15, env={"PW": "s3cret"})
    res = headless.boot_to_marker(cmd, timeout=20, inside=inside)
    assert res.inside is not None and res.inside.ok, res
    assert not any("s3cret" in line for _, line in res.log) and not any("s3cret" in t for t in res.tail)


def test_a_wrong_password_is_one_line(tmp_path):
    cmd, _ = fake_qemu(tmp_path, password=True)
    inside = headless.Inside(("true",), Login("root", "PW"), timeout=10, login_timeout=15, env={"PW": "wrong"})
    res = headless.boot_to_marker(cmd, timeout=20, inside=inside)
    assert res.inside is not None
    assert res.inside.login_error == "the check cannot log in as root: Login incorrect"
    assert "$PW" in res.inside.login_hint and "wrong" not in res.inside.login_hint
    assert [c.verdict for c in res.inside.commands] == [Verdict.NOT_RUN]


def test_no_getty_is_one_line_saying_what_to_add(tmp_path):
    cmd, pid = fake_qemu(tmp_path, script="echo $$ > {pid}; echo Welcome; sleep 30")
    inside = headless.Inside(("true",), Login("root"), timeout=5, login_timeout=2, env={})
    start = time.monotonic()
    res = headless.boot_to_marker(cmd, timeout=20, marker="Welcome", inside=inside)
    assert res.inside is not None and res.inside.login_error.startswith("the check cannot log in: no login prompt")
    assert "serial-getty@ttyS0" in res.inside.login_hint
    assert time.monotonic() - start < 15 and gone(pid)


def test_a_hang_is_stopped_by_the_command_timeout_and_the_vm_with_it(tmp_path):
    cmd, pid = fake_qemu(tmp_path)
    inside = headless.Inside(("true", "sleep 4", "echo never"), Login("root"), timeout=1, login_timeout=10, env={})
    start = time.monotonic()
    res = headless.boot_to_marker(cmd, timeout=20, inside=inside)
    assert res.inside is not None
    assert [c.verdict for c in res.inside.commands] == [Verdict.PASSED, Verdict.TIMED_OUT, Verdict.NOT_RUN]
    assert time.monotonic() - start < 15
    assert gone(pid)


# ── vm: what runs, the key, the table, the error ─────────────────────────────────────────────


def test_what_runs_inside_each_kind_of_image():
    os_inside = vm.inside_of(CheckSettings(run=("true",), login="admin", password_env="X"), Plan())
    assert os_inside is not None and os_inside.login == Login("admin", "X") and os_inside.commands == ("true",)
    app_inside = vm.inside_of(CheckSettings(run=("true",)), Plan(init=InitKind.LDT))
    assert app_inside is not None and app_inside.login is None  # our init's shell: nothing to log in to
    assert vm.inside_of(CheckSettings(run=()), Plan()) is None
    assert vm.inside_of(CheckSettings(), Plan(init=InitKind.LDT)) is None  # no systemd: no default check
    default = vm.inside_of(CheckSettings(), Plan())  # an OS image waiting for its login prompt: failed units
    assert default is not None and default.commands == (SYSTEMD_FAILED_UNITS,)
    # an OS image with its own marker may have no getty: the default stays out (the [check] commands it names run)
    assert vm.inside_of(CheckSettings(), Plan(), marker="LDT-ARCH-BOOTED") is None
    assert vm.inside_of(CheckSettings(run=("true",)), Plan(), marker="LDT-ARCH-BOOTED") is not None
    systemd_app = vm.inside_of(CheckSettings(), Plan(init=InitKind.SYSTEMD), marker="sysapp: user=")
    assert systemd_app is not None and systemd_app.commands == (SYSTEMD_FAILED_UNITS,)


def test_a_pass_is_keyed_by_the_commands_not_the_password():
    b = vm.Boot(Path("/d"), needs={"ext4": "k"})
    spec = {"marker": "login: ", "http": None}
    base = vm.check_manifest(Mode.BIOS, b, spec, CheckSettings(run=("true",)))
    assert base["version"] == stages.CHECK.version == 4 and base["inside"]["run"] == ["true"]
    assert vm.check_manifest(Mode.BIOS, b, spec, CheckSettings(run=("false",))) != base
    assert vm.check_manifest(Mode.BIOS, b, spec, CheckSettings(run=("true",), password_env="OTHER")) == base


FAILED = CommandResult("systemctl is-system-running", 1, "\n".join(f"line {i}" for i in range(9)) + "\ndegraded",
                       0.5, 60)
PASSED = CommandResult("true", 0, "", 0.1, 60)


def booted(**kw) -> vm.CheckResult:
    return vm.CheckResult(Mode.BIOS, True, 12.0, False, passed_by="login prompt", tail=("host login: ",), **kw)


def test_the_table_shows_the_failing_command_its_status_and_last_lines():
    res = vm.with_inside(booted(), headless.Ran((PASSED, FAILED)))
    assert not res.ok and res.reason == "`systemctl is-system-running` exited with status 1"
    table = vm.check_table("hello", [res])
    assert "FAIL" in table.splitlines()[1]
    assert "$ systemctl is-system-running  (status 1)" in table
    assert table.splitlines()[-1].endswith("| degraded") and "line 3" not in table  # the last 5 lines
    assert "pass" in table.splitlines()[2] and "$ true" in table.splitlines()[2]


def test_a_failed_command_fails_check_boot_after_the_reports_are_written(tmp_path, monkeypatch):
    p, r = project(tmp_path)
    results = iter([vm.with_inside(booted(), headless.Ran((PASSED, FAILED))),
                    dataclasses.replace(booted(commands=(PASSED,)), mode=Mode.UEFI, cached=True)])
    monkeypatch.setattr(vm, "check_one", lambda *a: next(results))
    monkeypatch.setattr(vm.kvm, "select_accel", lambda **kw: type("C", (), {"accel": "tcg"})())
    paths = report.ReportPaths.beside(tmp_path / "out" / "junit.xml")
    with pytest.raises(UserError) as e:
        vm.check_boot(p, r, (Mode.BIOS, Mode.UEFI), reports=paths)
    assert "boot check failed for bios" in e.value.message and "degraded" in e.value.message
    root = ET.parse(paths.xml).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"bios: boot", "bios: true", "bios: systemctl is-system-running",
                          "uefi: boot", "uefi: true"}  # the cached mode is in the report too
    failure = cases["bios: systemctl is-system-running"].find("failure")
    assert failure is not None and "status 1" in failure.get("message") and "degraded" in failure.text
    assert paths.html.is_file()


def test_no_shell_is_one_line_for_all_modes(tmp_path, monkeypatch):
    p, r = project(tmp_path)
    ran = headless.Ran((CommandResult("true", None, "", 0.0),), "the check cannot log in: no login prompt",
                       "add a getty")
    monkeypatch.setattr(vm, "check_one", lambda p, r, mode, accel: dataclasses.replace(
        vm.with_inside(booted(), ran), mode=mode))
    monkeypatch.setattr(vm.kvm, "select_accel", lambda **kw: type("C", (), {"accel": "tcg"})())
    with pytest.raises(UserError) as e:
        vm.check_boot(p, r, (Mode.TGZ, Mode.BIOS))
    assert e.value.message == "hello (tgz, bios): the check cannot log in: no login prompt"
    assert e.value.hint == "add a getty"


def project(tmp_path: Path):
    from pipeline.project import Project

    (tmp_path / "recipes" / "hello").mkdir(parents=True)
    (tmp_path / "recipes" / "hello" / "Dockerfile").write_text("FROM scratch\n")
    p = Project(tmp_path)
    return p, p.recipe("hello")


# ── graph ────────────────────────────────────────────────────────────────────────────────────


def test_check_boot_takes_junit_and_ci_plan_is_a_task(tmp_path, capsys):
    p, r = project(tmp_path)
    creators = graph.task_creators(p, {r.name: r})
    assert "task_ci_plan" in creators
    task = creators["task_ci_plan"]()
    assert {x["name"] for x in task["params"]} == {"format", "output"}
    check = [t for t in creators["task_check_boot"]() if t.get("name") == "hello"]
    assert check and [x["name"] for x in check[0]["params"]] == ["junit"]
    graph.ci_plan_action(str(tmp_path), "gitlab", str(tmp_path / "ci.yml"))
    assert "recipe-hello:" in (tmp_path / "ci.yml").read_text()
    assert isinstance(graph.ci_plan_action(str(tmp_path), "jenkins"), graph.TaskFailed)


def test_an_app_check_runs_its_commands_in_the_shell_on_the_check_port(tmp_path):
    """Our init's shell beside the app: on the second serial port's socket (its fd on the command
    line, -chardev socket,id=check,fd=N), found by the fake the way QEMU would be given it."""
    pid = tmp_path / "pid"
    script = (f'echo $$ > {pid}; for a in "$0" "$@"; do case $a in socket,id=check,fd=*) fd=${{a##*fd=}};; esac; done; '
              'echo app-ready; eval "exec sh -i <&$fd >&$fd 2>&1"')
    inside = headless.Inside(("echo beside; exit 4",), None, timeout=10, login_timeout=10, env={})
    res = headless.boot_check(["bash", "-c", script], timeout=20, marker=re.compile("app-ready"),  # dash: fds < 10
                              exit_line=app_exit_line(), grace=0.5, inside=inside)
    assert res.ok and res.inside is not None, res
    assert [(c.status, c.output) for c in res.inside.commands] == [(4, "beside")], (res.inside, res.tail)
    assert gone(pid)


def app_exit_line():
    from pipeline import app

    return app.EXIT_MARKER_RE


def test_watch_reads_the_whole_console_until_a_line_of_its_own(tmp_path):
    """headless.watch (tests/console.py re-exports it for the Secure Boot and verity tests)."""
    pid = tmp_path / "pid"
    script = f"echo $$ > {pid}; for i in $(seq 100); do echo line $i; done; echo 'Access Denied'; sleep 30"
    seen = headless.watch(["sh", "-c", script], lambda console: "Access Denied" in console, timeout=20)
    assert seen.matched and seen.seconds < 10 and seen.console.splitlines()[0] == "line 1"
    assert gone(pid)
    ended = headless.watch(["sh", "-c", "echo only; exit 0"], lambda console: "never" in console, timeout=20)
    assert not ended.matched and ended.console == "only" and ended.seconds < 10
