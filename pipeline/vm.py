"""Running and checking VMs of a recipe: run_tgz / run_bios / run_uefi on this terminal, and
check_boot, the boot matrix (each Mode headless to the boot marker, passes kept in the store).

How the work splits: vm.py knows recipes, their artifacts and apps; it describes each VM once
as a frozen qemu.Machine (machine()) and hands it down: launch.machine_argv() turns it into an
argv on this host, launch.run_interactive() or headless.boot_to_marker()/boot_check() run it.
Nothing below calls back up. (virt.py is the other user of the QEMU toolkit: a command in a VM.)

An app image (app.json has an app) boots into its app: the run forwards its EXPOSEd TCP ports
and ends with the app's exit status (read from the console's `ldt-app-exit: N`); its check waits
for [boot] marker, an HTTP answer at [boot] http, or else the app's exit with status 0.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import app, disk, headless, kvm, qemu, report, secureboot, stages, verity
from pipeline.app import InitKind, Plan
from pipeline.artifacts import Artifact
from pipeline.cache import Source
from pipeline.console import CheckSettings, CommandResult
from pipeline.errors import UserError
from pipeline.ext4 import read_ext4_identity
from pipeline.launch import exit_status, machine_argv, run_interactive
from pipeline.project import Project
from pipeline.qemu import Accel, Mode
from pipeline.recipes import Recipe
from pipeline.run import log, run


def memory_mib(size: str) -> int:
    """'1G' -> 1024, '512M' -> 512, '768' -> 768 (MiB)."""
    size = size.strip().upper()
    if size.endswith("G"):
        return int(size[:-1]) * 1024
    return int(size.rstrip("M"))


def parse_forwards(spec: str) -> tuple[tuple[int, int], ...]:
    """'2222:22,8080:80' -> ((2222, 22), (8080, 80))."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        host, sep, guest = item.partition(":")
        if not sep or not host.isdigit() or not guest.isdigit():
            raise UserError(f"bad port forward '{item}'", hint="write HOST:GUEST, e.g. --forward 2222:22")
        out.append((int(host), int(guest)))
    return tuple(out)


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be listened on now (what QEMU's hostfwd will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def plan_forwards(exposed: tuple[int, ...], explicit: tuple[tuple[int, int], ...],
                  free: Callable[[int], bool] = port_free) -> tuple[tuple[int, int], ...]:
    """The run's TCP forwards (host, guest): every --forward, then each EXPOSEd port that no
    --forward already reaches, on the same host port or the next free one."""
    out = list(explicit)
    hosts = {h for h, _ in explicit}
    for port in exposed:
        if any(g == port for _, g in explicit):
            continue
        host = port
        while host in hosts or not free(host):
            host += 1
            if host > 65535:
                raise UserError(f"no free host port for the app's port {port}", hint="give one with --forward")
        out.append((host, port))
        hosts.add(host)
    return tuple(out)


@dataclass(frozen=True)
class Boot:
    """What one boot mode boots: the disk, and for tgz the kernel, initrd and command line."""

    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    needs: dict[str, str] = field(default_factory=dict)  # {row: key} of everything booted (a pass's needs)
    plan: Plan = Plan()  # the app it runs (none: an OS)


def boot_inputs(p: Project, r: Recipe, mode: Mode) -> Boot:
    """The recipe's current files for booting in `mode` (UserError naming the task when one is missing)."""
    files = stages.current(p, r, mode.needs(initrd=r.initrd))
    needs = stages.needs_of(files)
    plan = Plan.from_json(json.loads(files[Artifact.APP].read_text()))
    if not mode.direct_kernel:
        return Boot(files[mode.disk], needs=needs, plan=plan)
    uuid, _ = read_ext4_identity(files[Artifact.EXT4])
    cmdline = disk.kernel_cmdline(uuid, [*plan.kernel_args.split(), *r.cmdline.split()])
    return Boot(files[Artifact.EXT4], files[Artifact.VMLINUX], files.get(Artifact.INITRD), cmdline, needs, plan)


def machine(mode: Mode, b: Boot, settings: qemu.VmSettings, persistent: Path | None = None) -> qemu.Machine:
    """The VM that boots `b` in one mode (`persistent`: a writable copy of b.disk to boot
    instead), handed down whole to launch.machine_argv(). A signed UEFI disk ([boot] secure_boot)
    boots under Secure Boot on the variable store its entry holds beside it (builders.uefi)."""
    return qemu.Machine(mode, settings, persistent or b.disk, b.kernel, b.initrd, b.cmdline, secure_vars(mode, b))


def secure_vars(mode: Mode, b: Boot) -> Path | None:
    """The enrolled variable store a signed UEFI disk boots on: in the disk's entry, beside it."""
    if not mode.needs_ovmf:
        return None
    found = b.disk.parent / Artifact.SB_VARS
    return found if found.is_file() else None


SECURE_BOOT = headless.Expect(  # what a boot under Secure Boot must show: the kernel's own line, no refusal
    require=(re.compile(re.escape(secureboot.KERNEL_SECURE_BOOT_LINE)),),
    refuse=re.compile("|".join(re.escape(m) for m in secureboot.FIRMWARE_REFUSAL_MARKERS)))
VERITY = headless.Expect(require=(re.compile(re.escape(verity.OPENED_LINE)),))  # the initrd opened the root


def verity_root(r: Recipe, mode: Mode) -> bool:
    """The disk this mode boots has a dm-verity root ([disk] verity: the UEFI disk only)."""
    return r.verity and mode is Mode.UEFI


def expect(m: qemu.Machine, r: Recipe) -> headless.Expect:
    e = SECURE_BOOT if m.secure_vars is not None else headless.NOTHING_MORE
    return e + VERITY if verity_root(r, m.mode) else e


def notes(m: qemu.Machine, r: Recipe) -> str:
    """What the check column adds to how a boot passed: what the boot also showed."""
    return (SECURE_NOTE if m.secure_vars is not None else "") + (VERITY_NOTE if verity_root(r, m.mode) else "")


@dataclass(frozen=True)
class RunOptions:
    """The run tasks' and commands' options; empty/zero: the recipe's setting."""

    memory: str = ""
    cpus: int = 0
    cmdline: str = ""
    forward: str = ""
    net: bool = True
    persist: str = ""
    accel: str = ""


def run_recipe(p: Project, r: Recipe, mode: Mode, o: RunOptions) -> int:
    """Boot a recipe on this terminal's serial console; qemu's exit status."""
    return boot_interactive(p, mode, boot_inputs(p, r, mode), o, memory=o.memory or r.memory, cpus=o.cpus or r.cpus)


def boot_interactive(p: Project, mode: Mode, b: Boot, o: RunOptions, *, memory: str, cpus: int) -> int:
    """The cached artifact is never written: the disk is a throwaway snapshot, or with `persist`
    a copy outside the store."""
    choice = kvm.select_accel(Accel.parse(o.accel or "auto", origin="--accel"), cache_dir=p.store.root)
    forwards = plan_forwards(b.plan.tcp_ports if o.net else (), parse_forwards(o.forward))
    for host, guest in forwards:
        exposed = " (EXPOSE)" if guest in b.plan.tcp_ports else ""
        log(f"forwarding localhost:{host} -> guest port {guest}{exposed}")
    persistent = None
    if o.persist:
        persistent = Path(o.persist).resolve()
        if p.store.root in persistent.parents:
            raise UserError(f"--persist {o.persist} is inside the store", hint="give a path outside cache/")
        if not persistent.exists():
            log(f"persistent disk: copying {b.disk.name} to {persistent}")
            run(["cp", "--sparse=always", b.disk, persistent])
        log(f"persistent disk: {persistent} (changes are kept there)")
    with tempfile.TemporaryDirectory(prefix="ldt-run-") as scratch:
        console_log = Path(scratch) / "console.log" if b.plan.app is not None else None
        settings = qemu.VmSettings(memory_mib=memory_mib(memory), cpus=cpus, accel=choice.accel, network=o.net,
                                   port_forwards=forwards, kernel_args=o.cmdline, interactive=True,
                                   snapshot=not o.persist, console_log=console_log)
        with machine_argv(machine(mode, b, settings, persistent)) as cmd:
            status = run_interactive(cmd)
        if console_log is None:
            return status
        app_status = app.exit_status(console_log.read_text(errors="replace")) if console_log.exists() else None
        if app_status is None:
            # like `docker run` when the container never ran its command (125: the runtime failed)
            code = status if status > 0 else NO_APP_STATUS
            log(f"qemu {exit_status(status)} before the app reported its exit status; exiting {code}")
            return code
        log(f"the app exited with status {app_status}")
        return app_status


NO_APP_STATUS = 125  # a run target's status when the app never reported one (docker run's, for its own failures)


def runs_app(p: Project, r: Recipe) -> bool:
    """Whether the recipe's current image boots into an app (its run ends with the app's status)."""
    f = stages.current(p, r, (Artifact.APP,))[Artifact.APP]
    return Plan.from_json(json.loads(f.read_text())).app is not None


@dataclass(frozen=True)
class CheckResult:
    """One mode of the matrix: `ok` when the boot passed and every [check] command in it did;
    `reason` the first thing that failed (the boot's, the login's, a command's) in one line."""

    mode: Mode
    ok: bool
    seconds: float  # the boot, to its check
    cached: bool
    reason: str = ""
    tail: tuple[str, ...] = ()
    passed_by: str = "marker"  # which check passed: the marker, an HTTP answer, the app's exit
    stopped: str = ""  # an app: how the power-off ended it ("exit 143"), when it said
    refused: bool = False  # the firmware would not start the image (Secure Boot): `reason` says it in a line
    commands: tuple[CommandResult, ...] = ()  # the [check] commands run inside, in order
    login_hint: str = ""  # the check got no shell: what to change (reason says why, in one line)
    log: tuple[tuple[float, str], ...] = ()  # the console, stamped (a boot made now; not kept in the store)
    phases: report.Phases = report.Phases()

    @property
    def booted(self) -> bool:
        """The boot itself passed (its commands may still have failed)."""
        return self.ok or bool(self.commands) or bool(self.login_hint)

    @property
    def no_shell(self) -> bool:
        return bool(self.login_hint)

    def record(self, recipe: str) -> report.BootRecord:
        """The report's row for this mode."""
        log = "\n".join(f"{t:8.2f} {line}" for t, line in self.log)
        reason = self.reason if not self.booted or self.no_shell else ""
        return report.BootRecord(recipe, str(self.mode), self.booted and not self.no_shell, self.seconds, reason,
                                 self.tail, log, self.phases, self.commands, self.cached, self.passed_by)


def check_spec(r: Recipe, plan: Plan) -> dict[str, str | None]:
    """What the check of a recipe waits for: the marker, an HTTP path, or (an app with neither)
    its exit with status 0; an OS waits for the marker or a login prompt."""
    if plan.app is None:
        return {"marker": r.boot_marker or headless.LOGIN_PROMPT.pattern, "http": None}
    return {"marker": r.boot_marker, "http": r.http if r.boot_marker is None else None}


class HttpProbe:
    """GETs through the forward for a check, never blocking the caller: each call starts a new
    attempt when the last one is `every` seconds old (at most `most` in flight, each waiting up
    to `timeout` for its answer) and returns the first answer ("HTTP 200 /"), or None. QEMU's
    user-mode network holds every connection it takes before the guest's network is up (it
    retries the SYN with backoff), so one attempt at a time, or a few, would see a listening
    app seconds late; `most` covers `timeout` of held attempts."""

    def __init__(self, port: int, path: str, *, every: float = 0.25, timeout: float = 10.0, most: int = 64):
        self.url, self.path = f"http://127.0.0.1:{port}{path}", path
        self.every, self.timeout, self.most = every, timeout, most
        self._lock = threading.Lock()
        self._answer: str | None = None
        self._in_flight = 0
        self._last = float("-inf")

    def __call__(self) -> str | None:
        with self._lock:
            now = time.monotonic()
            if self._answer is None and self._in_flight < self.most and now - self._last >= self.every:
                self._in_flight += 1
                self._last = now
                threading.Thread(target=self._attempt, daemon=True).start()
            return self._answer

    def _attempt(self) -> None:
        answer = None
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as resp:
                answer = f"HTTP {resp.status} {self.path}"
        except urllib.error.HTTPError as e:
            answer = f"HTTP {e.code} {self.path}" if e.code < 500 else None
        except (OSError, ValueError):
            pass  # not listening yet: slirp accepts, then resets (or holds it while the guest boots)
        with self._lock:
            self._in_flight -= 1
            if answer is not None and self._answer is None:
                self._answer = answer


def http_probe(port: int, path: str) -> Callable[[], str | None]:
    """The check's probe of an app's HTTP answer through the forward (HttpProbe)."""
    return HttpProbe(port, path)


def check_one(p: Project, r: Recipe, mode: Mode, accel: Accel) -> CheckResult:
    """Boot one variant headless to the marker (an app: to its check), then run the recipe's
    [check] commands inside, unless that exact image already passed with those commands: a pass
    is an entry of the store's check row, made by the one path (local, registry, boot), and
    stored only when the boot and every command passed (a failure is retried next time)."""
    b = boot_inputs(p, r, mode)
    spec = check_spec(r, b.plan)

    def boot(work: Path, key: str) -> CheckResult:
        res = check_os(r, mode, b, accel, spec["marker"] or "") if b.plan.app is None else \
            check_app(r, mode, b, accel, spec)
        if res.ok:
            (work / "result.json").write_text(json.dumps({
                "seconds": round(res.seconds, 1), "accel": str(accel), "passed_by": res.passed_by,
                "stopped": res.stopped, "commands": [c.to_json() for c in res.commands],
                "phases": dict(res.phases.items())}))
        return res

    got = p.store.obtain(stages.CHECK, check_manifest(mode, b, spec, r.checks, r.boot_marker), boot,
                         passed=lambda res: res.ok)
    if got.source is Source.BUILT:
        return got.result
    res = json.loads((got.entry / "result.json").read_text())
    return CheckResult(mode, True, res["seconds"], cached=True, passed_by=res.get("passed_by", "login prompt"),
                       stopped=res.get("stopped", ""),
                       commands=tuple(CommandResult.from_json(c) for c in res.get("commands", ())),
                       phases=report.Phases(**res.get("phases", {})))


def systemd_init(plan: Plan, marker: str | None = None) -> bool:
    """Whether the failed-units default applies: where systemd may be init and the check can log
    in: an app under its own systemd, or an OS image whose boot check waits for its login prompt.
    An OS image with its own [boot] marker may have no getty (a busybox init that prints a line):
    the default would fail a boot that passes, so it runs only the [check] commands it names."""
    if plan.init is InitKind.LDT:
        return False
    return plan.init is InitKind.SYSTEMD or marker is None


def inside_of(checks: CheckSettings, plan: Plan, marker: str | None = None) -> headless.Inside | None:
    """What runs inside after the boot check: the [check] commands (or the default), as the
    [check] login on the serial console, or in the shell our init gives an app on the check's
    port; None when there is nothing to run. `marker`: the recipe's [boot] marker."""
    commands = checks.commands(systemd=systemd_init(plan, marker))
    if not commands:
        return None
    login = None if plan.init is InitKind.LDT else checks.as_login
    return headless.Inside(commands, login, timeout=checks.timeout, login_timeout=checks.login_timeout)


NO_SETTINGS = CheckSettings()  # a recipe without [check]


def check_manifest(mode: Mode, b: Boot, spec: dict[str, str | None],
                   checks: CheckSettings = NO_SETTINGS, marker: str | None = None) -> dict[str, object]:
    """What a pass is keyed by: the mode, the entries of everything booted, what it waited for,
    the commands run inside (CheckSettings.key: the password is not part of it)."""
    manifest: dict[str, object] = {**stages.CHECK.head(), "mode": str(mode), "needs": b.needs,
                                   "marker": spec["marker"], "cmdline": b.cmdline,
                                   "inside": checks.key(systemd=systemd_init(b.plan, marker))}
    if b.plan.app is not None:
        manifest["http"] = spec["http"]
    return manifest


# ── booting a check ─────────────────────────────────────────────────────────────────────


SECURE_NOTE = "; secure boot"  # the check column of a pass under Secure Boot (the kernel said so)
VERITY_NOTE = "; verity root"  # ... of a pass whose initrd opened the root through dm-verity


def under(m: qemu.Machine) -> str:
    return " under Secure Boot" if m.secure_vars is not None else ""


def check_os(r: Recipe, mode: Mode, b: Boot, accel: Accel, marker: str) -> CheckResult:
    """Boot an OS headless to its marker, then log in and run the [check] commands (inside_of)."""
    inside = inside_of(r.checks, b.plan, r.boot_marker)
    settings = qemu.VmSettings(memory_mib=memory_mib(r.memory), cpus=r.cpus, accel=accel, network=False)
    m = machine(mode, b, settings)
    with machine_argv(m) as cmd:
        log(f"{r.name}: booting {mode}{under(m)} headless, waiting for {marker!r} (timeout {r.boot_timeout}s)"
            + ran_note(inside))
        res = headless.boot_to_marker(cmd, timeout=r.boot_timeout, marker=re.compile(marker, re.MULTILINE),
                                      expect=expect(m, r), inside=inside)
    passed_by = ("marker" if r.boot_marker else "login prompt") + notes(m, r)
    boot = CheckResult(mode, res.ok, res.seconds, cached=False, reason=res.reason, tail=tuple(res.tail),
                       passed_by=passed_by, refused=res.refused, log=res.log)
    return with_inside(boot, res.inside)


def ran_note(inside: headless.Inside | None) -> str:
    if inside is None:
        return ""
    n = len(inside.commands)
    return f", then {n} [check] command{'s' if n != 1 else ''} inside" + (
        f" as {inside.login.user}" if inside.login is not None else " beside the app")


def with_inside(boot: CheckResult, ran: headless.Ran | None) -> CheckResult:
    """A passed boot's result with what ran inside it: failed when there was no shell or a command
    failed, its reason the login's line or the first failing command's."""
    phases = report.phases_from_console(boot.log, ready_at=boot.seconds if boot.ok else None,
                                        login=ran.login_seconds if ran is not None else None)
    if not boot.ok or ran is None:
        return dataclasses.replace(boot, phases=phases)
    failed = next((c for c in ran.commands if not c.ok), None)
    reason = ran.login_error or (failed.reason if failed is not None else "")
    return dataclasses.replace(boot, ok=ran.ok, reason=reason, commands=ran.commands, login_hint=ran.login_hint,
                               phases=phases)


def check_app(r: Recipe, mode: Mode, b: Boot, accel: Accel, spec: dict[str, str | None]) -> CheckResult:
    """Boot an app headless to its check, run the [check] commands beside it (inside_of); then
    stop it the way a power-off does and say how it ended."""
    inside = inside_of(r.checks, b.plan, r.boot_marker)
    marker, path = spec["marker"], spec["http"]
    probe = forwards = None
    if path is not None:
        if not b.plan.tcp_ports:
            raise UserError(f"{r.name}: [boot] http needs an EXPOSEd TCP port", hint="add EXPOSE to the Dockerfile")
        forwards = plan_forwards(b.plan.tcp_ports[:1], ())
        probe = http_probe(forwards[0][0], path)
    settings = qemu.VmSettings(memory_mib=memory_mib(r.memory), cpus=r.cpus, accel=accel, network=True,
                               port_forwards=forwards or ())
    what = f"marker {marker!r}" if marker else f"HTTP {path} on port {b.plan.tcp_ports[0]}" if path else "its exit 0"
    stop = headless.Stop.CTRL_ALT_DEL if b.plan.init is InitKind.LDT else headless.Stop.POWER_BUTTON
    m = machine(mode, b, settings)
    with machine_argv(m) as cmd:
        log(f"{r.name}: booting {mode}{under(m)} headless, waiting for {what} (timeout {r.boot_timeout}s)"
            + ran_note(inside))
        res = headless.boot_check(cmd, timeout=r.boot_timeout,
                                  marker=re.compile(marker, re.MULTILINE) if marker else None,
                                  probe=probe, exit_line=app.EXIT_MARKER_RE, stop=stop, expect=expect(m, r),
                                  inside=inside)
    stopped = "" if res.stop_status is None else f"exit {res.stop_status}"
    passed_by = res.passed_by + notes(m, r)
    boot = CheckResult(mode, res.ok, res.seconds, cached=False, reason=res.reason, tail=tuple(res.tail),
                       passed_by=passed_by, stopped=stopped, refused=res.refused, log=res.log)
    return with_inside(boot, res.inside)


TABLE_OUTPUT_LINES = 5  # the last lines of a failed command's output the table shows


def check_table(name: str, results: list[CheckResult]) -> str:
    """One row per mode, then under a mode one row per [check] command; a failed command shows its
    status and its last output lines."""
    lines = [f"{'recipe':<16} {'mode':<5} {'result':<6} {'seconds':>8}  check"]
    for c in results:
        note = " (cached)" if c.cached else ""
        how = c.passed_by if c.booted else ""
        if c.booted and c.stopped:
            how += f"; stopped: {c.stopped}"
        word = "pass" if c.ok else "FAIL"
        if c.no_shell:
            how = f"{how}; {c.reason}"
        lines.append(f"{name:<16} {c.mode:<5} {word:<6} {c.seconds:>8.1f}  {how}{note}".rstrip())
        if c.no_shell:
            continue
        for cmd in c.commands:
            lines.append(f"{'':<16} {'':<5} {cmd.verdict.label:<6} {cmd.seconds:>8.1f}  $ {one_line(cmd.command)}"
                         + (f"  (status {cmd.status})" if cmd.status not in (None, 0) else ""))
            if not cmd.ok and cmd.output:
                lines += [f"{'':<41}| {out}" for out in cmd.output.splitlines()[-TABLE_OUTPUT_LINES:]]
    return "\n".join(lines)


def one_line(command: str, width: int = 60) -> str:
    first = command.strip().splitlines()[0] if command.strip() else command
    return first if len(first) <= width and "\n" not in command.strip() else first[: width - 1] + "…"


def check_boot(p: Project, r: Recipe, modes: tuple[Mode, ...] = tuple(Mode),
               reports: report.ReportPaths | None = None) -> list[CheckResult]:
    """The boot matrix of a recipe: each mode to its marker, headless, then the [check] commands
    inside; prints a table of the results, writes the JUnit XML and HTML `reports` (this recipe's
    rows beside the other recipes' last ones), and raises a UserError naming the failed modes
    with their last console lines (a disk the firmware refused under Secure Boot, or a check that
    could not log in: that one line)."""
    accel = kvm.select_accel(cache_dir=p.store.root).accel
    results = [check_one(p, r, mode, accel) for mode in modes]
    print(check_table(r.name, results), flush=True)
    if reports is not None:
        written = report.update_reports(reports, r.name, [c.record(r.name) for c in results], keep=p.recipes)
        print(f"reports: {written.xml} (JUnit), {written.html}", flush=True)
    failed = [c for c in results if not c.ok]
    if failed and all(c.refused for c in failed):  # Secure Boot said no: its one line says everything
        raise UserError(f"{r.name}: {', '.join(f'{c.mode}: {c.reason}' for c in failed)}",
                        hint="the disk is not signed by the db key the firmware enrolled; build it again "
                             f"(doit build_efistub:{r.name})")
    if failed and all(c.no_shell for c in failed):  # the same line for every mode: say it once
        modes_text = ", ".join(str(c.mode) for c in failed)
        raise UserError(f"{r.name} ({modes_text}): {failed[0].reason}", hint=failed[0].login_hint)
    if failed:
        details = "\n".join(failure_details(c) for c in failed)
        raise UserError(f"{r.name}: boot check failed for {', '.join(c.mode for c in failed)}\n{details}",
                        hint=f"boot it interactively with `doit {failed[0].mode.run_task}:{r.name}`")
    print(f"boot it yourself: doit run_uefi:{r.name} (or run_bios, run_tgz); quit with Ctrl-A X", flush=True)
    return results


def failure_details(c: CheckResult) -> str:
    """A failed mode for the error text: its reason, a failed command's output, the console's last lines."""
    out = [f"{c.mode}: {c.reason}"]
    for cmd in c.commands:
        if not cmd.ok and cmd.output:
            out += ["  output:", *("    " + t for t in cmd.output.splitlines()[-TABLE_OUTPUT_LINES * 2:])]
    out += ["  last console lines:", *("    " + t for t in c.tail)]
    return "\n".join(out)
