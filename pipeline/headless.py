"""Headless boots: QEMU with its serial console on a pipe, watched until a marker or an app's
check, then powered off. check_boot (vm.py) and the tests use these; the argv comes from
pipeline/qemu.py (built with interactive=False), the process from launch.launch().

Reading order: BootResult, Expect (Secure Boot's kernel line, the firmware's refusal), Inside
(the [check] commands to run once the check passed) and boot_to_marker() (an OS to its login
prompt) → Stop, CheckOutcome and boot_check() (an app to its marker, HTTP answer or exit) →
run_inside() (a pipeline.console session on the same console) → _Console, which reads the serial
console (a socketpair that is QEMU's stdin and stdout) and stderr without blocking, to deadlines.
"""

from __future__ import annotations

import codecs
import enum
import os
import re
import selectors
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import qemu, qmp
from pipeline.console import CommandResult, ConsoleLoginError, ConsoleSession, Login, Step, not_run
from pipeline.launch import exit_status, launch, qemu_error, wait
from pipeline.qemu import qmp_listen_args
from pipeline.run import Cmd, argv

# A serial getty starts a line with "<hostname> login: " and no newline; kernel messages may
# follow on the same line, so the prompt is matched at the start of a line, not at its end.
LOGIN_PROMPT = re.compile(r"^(?!Last login)(?:[\w.-]+ )?login: ")


@dataclass(frozen=True)
class BootResult:
    ok: bool
    seconds: float  # from starting qemu to the marker (or to the failure)
    tail: list[str] = field(default_factory=list)  # last console lines, ANSI escapes removed
    reason: str = ""
    refused: bool = False  # the firmware would not start the image (Secure Boot): `reason` is its line
    inside: Ran | None = None  # the in-image commands, when asked for (Inside) and the boot passed
    log: tuple[tuple[float, str], ...] = ()  # every console line, stamped with seconds since qemu started


@dataclass(frozen=True)
class Inside:
    """What runs inside the guest once the check passed: a shell by logging in on the console
    (`login`), or (None) the one our init starts on the check's serial port; then `commands`,
    each within `timeout` seconds. The password comes from the environment (`env`), never logged."""

    commands: tuple[str, ...]
    login: Login | None = Login()
    timeout: float = 60.0
    login_timeout: float = 60.0
    env: Mapping[str, str] | None = None  # None: os.environ


@dataclass(frozen=True)
class Ran:
    """What Inside gave: each command's result (all NOT_RUN when there was no shell), why there
    was no shell (one line and its hint, from console.LoginFailure), the login's seconds, and the
    session's steps stamped in seconds since QEMU started (like BootResult.log: where they went)."""

    commands: tuple[CommandResult, ...]
    login_error: str = ""
    login_hint: str = ""
    login_seconds: float | None = None
    steps: tuple[tuple[float, Step], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.login_error and all(c.ok for c in self.commands)


@dataclass(frozen=True)
class Expect:
    """What else a boot must show, or must not (Secure Boot: the kernel's own line saying it is on
    before the marker; the firmware's refusal ends the boot at once, a failure of one line)."""

    require: tuple[re.Pattern[str], ...] = ()  # lines that must each show, in any order, before the marker
    refuse: re.Pattern[str] | None = None

    def __add__(self, other: Expect) -> Expect:
        refuse = [p.pattern for p in (self.refuse, other.refuse) if p is not None]
        return Expect(self.require + other.require,
                      re.compile("|".join(f"(?:{p})" for p in refuse)) if refuse else None)

    def watch(self, marker: re.Pattern[str] | None) -> re.Pattern[str] | None:
        """The marker or the refusal, whichever shows first."""
        parts = [p.pattern for p in (marker, self.refuse) if p is not None]
        return re.compile("|".join(f"(?:{p})" for p in parts), re.MULTILINE) if parts else None

    def failure(self, console: _Console) -> tuple[str, bool] | None:
        """(reason, refused) when the boot so far breaks the expectation, else None."""
        if self.refuse is not None:
            line = next((ln for ln in reversed(console.tail()) if self.refuse.search(ln)), None)
            if line is not None:
                return f"the firmware refused the image: {line.strip()}", True
        missing = [p.pattern for p in self.require if p.pattern not in console.noticed]
        if missing:
            return f"no {' and no '.join(map(repr, missing))} on the console before the check passed", False
        return None


NOTHING_MORE = Expect()


_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clear screen
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles
    r"|\x1b[()*+][0-9A-Za-z]"  # character set selection
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
    r"|[\x00-\x08\x0b-\x1f\x7f]"  # remaining control characters (keeps \t and \n)
)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def as_pattern(marker: str | re.Pattern[str]) -> re.Pattern[str]:
    """A str marker is literal text; pass re.compile(...) for a regular expression."""
    return marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))


def boot_to_marker(
    cmd: Cmd,
    *,
    timeout: float,
    marker: str | re.Pattern[str] = LOGIN_PROMPT,
    grace: float = 3.0,
    tail_lines: int = 30,
    expect: Expect = NOTHING_MORE,
    inside: Inside | None = None,
) -> BootResult:
    """Boot headless until `marker` shows on the serial console, then power the guest off.

    `cmd` must be built with interactive=False (serial console on stdio). A QMP socket is
    added; after the marker the guest gets an ACPI power-down and `grace` seconds, then
    QEMU is told to quit, then killed. QEMU never outlives this call: not on timeout, on an
    exception or on KeyboardInterrupt. `expect`: a line the console must show before the marker,
    one that ends the boot as a failure at once (refused). `inside`: after the marker, log in on
    the same console and run its commands (BootResult.inside), then quit QEMU at once.
    """
    args = argv(cmd)
    if "mon:stdio" in args:
        raise ValueError("boot_to_marker needs a headless command (interactive=False)")
    pattern = as_pattern(marker)
    with launch((CONSOLE,), qmp_path=True) as vm:
        assert vm.qmp_path is not None
        start = time.monotonic()
        proc = _start(vm, args)
        console = _Console(proc, vm.ours[CONSOLE].fileno(), tail_lines, expect.require, start=start)
        outcome = console.pump(expect.watch(pattern), deadline=start + timeout)
        seconds = time.monotonic() - start
        tail = console.tail()
        broken = expect.failure(console) if outcome == "marker" else None
        if broken is not None:
            return BootResult(False, seconds, tail, broken[0], refused=broken[1], log=console.log())
        if outcome == "marker":
            if inside is not None:
                ran = run_inside(console, inside)
                _quit(proc, console, vm.qmp_path)
                return BootResult(True, seconds, console.tail(), f"marker seen after {seconds:.1f}s",
                                  inside=ran, log=console.log())
            _power_off(proc, console, vm.qmp_path, grace)
            return BootResult(True, seconds, tail, f"marker seen after {seconds:.1f}s", log=console.log())
        wanted = marker if isinstance(marker, str) else f"/{pattern.pattern}/"
        if outcome == "timeout":
            reason = f"no {wanted!r} on the console within {timeout:g}s"
        else:
            reason = f"qemu {_exited(proc)} before {wanted!r}{console.error_suffix()}"
        return BootResult(False, seconds, tail, reason, log=console.log())


CONSOLE = "console"  # the socketpair that is QEMU's stdin and stdout: its serial console, read and typed on


def _start(vm, args: list[str]) -> subprocess.Popen:
    """QEMU with its serial console (stdio) on the launch's console socket, a QMP socket added."""
    assert vm.qmp_path is not None
    theirs = vm.fds[CONSOLE]
    return vm.start([*args, *qmp_listen_args(vm.qmp_path)], stdin=theirs, stdout=theirs)


CHECK_PORT = qemu.CHECK_PORT  # the second serial port (the guest's ttyS1) where our app init starts a shell


def run_inside(console: _Console, inside: Inside, port_fd: int | None = None) -> Ran:
    """Get a shell (log in on the console the check read, or take the shell our init keeps on
    the check's port, `port_fd`) and run the commands; a shell that never came: every command
    NOT_RUN and the one line why. Every line read goes to the console's log and tail."""
    fd = console.out_fd if port_fd is None else port_fd
    session = ConsoleSession(fd, on_line=console.keep, env=inside.env, seen=console.seen() if port_fd is None else "")
    if port_fd is None:  # the session reads the console on from here: its lines come through on_line
        if strip_ansi(console.partial).strip():  # the prompt: a line of the log and the tail now
            console.keep(strip_ansi(console.partial))
        console.partial = ""
    try:
        if inside.login is None:
            session.attach(timeout=inside.login_timeout)
        else:
            session.login(inside.login, timeout=inside.login_timeout)
    except ConsoleLoginError as e:
        return Ran(tuple(not_run(c) for c in inside.commands), e.message, e.hint or "", steps=stamped(session, console))
    results = session.run_all(inside.commands, timeout=inside.timeout)
    return Ran(results, login_seconds=session.login_seconds, steps=stamped(session, console))


def stamped(session: ConsoleSession, console: _Console) -> tuple[tuple[float, Step], ...]:
    """The session's steps in seconds since QEMU started, like the console's log."""
    return tuple((t - console.start, step) for t, step in session.steps)


def _quit(proc: subprocess.Popen, console: _Console, qmp_path: Path) -> None:
    """After the in-image commands: no shutdown to wait for, QEMU quits (reap kills it if not)."""
    if qmp.ask(qmp_path, "quit"):
        console.drain(proc, 3.0)


@dataclass(frozen=True)
class Watched:
    """What watch() saw: the whole console (cleaned lines), its seconds, whether `until` held."""

    console: str
    seconds: float
    matched: bool


def watch(cmd: Cmd, until: Callable[[str], bool], timeout: float) -> Watched:
    """Boot headless until `until(console so far)` holds, QEMU exits or `timeout` passes, then
    kill QEMU: for boots that end on a line of their own (a firmware's refusal, a kernel message)
    rather than at a marker that passes a check (the Secure Boot and verity tests)."""
    args = argv(cmd)
    if "mon:stdio" in args:
        raise ValueError("watch needs a headless command (interactive=False)")
    with launch((CONSOLE,), qmp_path=True) as vm:
        start = time.monotonic()
        proc = _start(vm, args)
        console = _Console(proc, vm.ours[CONSOLE].fileno(), tail_lines=30, start=start)
        while True:
            text = "\n".join(line for _, line in console.log())
            if until(text):
                return Watched(text, time.monotonic() - start, True)
            now = time.monotonic()
            if now - start >= timeout or console.pump(None, deadline=min(start + timeout, now + 0.5)) == "eof":
                text = "\n".join(line for _, line in console.log())
                return Watched(text, time.monotonic() - start, until(text))


class Stop(enum.StrEnum):
    """How a check asks the guest to shut down once it passed: the ACPI power button (systemd
    stops the app's unit), or Ctrl-Alt-Del (our app init turns it into `docker stop`)."""

    POWER_BUTTON = "system_powerdown"
    CTRL_ALT_DEL = "ctrl-alt-delete"

    def request(self, path: Path) -> bool:
        if self is Stop.POWER_BUTTON:
            return qmp.ask(path, "system_powerdown")
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        return qmp.ask(path, "send-key", {"keys": keys})


@dataclass(frozen=True)
class CheckOutcome:
    """What boot_check saw: passed or not, when, by which check; the app's exit status while
    running (a failure) or while stopping (how the power-off ended it), the console's tail."""

    ok: bool
    seconds: float
    passed_by: str = ""
    reason: str = ""
    exit_status: int | None = None
    stop_status: int | None = None
    tail: list[str] = field(default_factory=list)
    refused: bool = False  # the firmware would not start the image (Secure Boot)
    inside: Ran | None = None  # the in-image commands, when asked for (Inside) and the check passed
    log: tuple[tuple[float, str], ...] = ()  # every console line, stamped with seconds since qemu started


def boot_check(
    cmd: Cmd,
    *,
    timeout: float,
    marker: re.Pattern[str] | None,
    probe: Callable[[], str | None] | None = None,
    exit_line: re.Pattern[str],
    stop: Stop = Stop.POWER_BUTTON,
    grace: float = 15.0,
    tail_lines: int = 30,
    expect: Expect = NOTHING_MORE,
    inside: Inside | None = None,
) -> CheckOutcome:
    """Boot an app VM headless until the check passes: `marker` on the console, or `probe()`
    (called about four times a second; it must not block) returning what answered, or, with neither, the app's exit
    line with status 0. The app's exit line with any other status fails at once. After a pass
    the guest is asked to stop (`stop`), and its exit line while stopping is reported too;
    `inside`: before that, its commands run in the shell our init keeps on the check's serial
    port (qemu.VmSettings.check_port). QEMU never outlives this call."""
    args = argv(cmd)
    if "mon:stdio" in args:
        raise ValueError("boot_check needs a headless command (interactive=False)")
    watch = re.compile("|".join(f"(?:{p.pattern})" for p in (exit_line, marker, expect.refuse) if p is not None),
                       re.MULTILINE)
    port = inside is not None and inside.login is None  # our init's shell, on a second serial port
    with launch((CONSOLE, CHECK_PORT) if port else (CONSOLE,), qmp_path=True) as vm:
        assert vm.qmp_path is not None
        start = time.monotonic()
        deadline = start + timeout
        proc = _start(vm, [*args, *qemu.check_port_args(vm.fds[CHECK_PORT])] if port else args)
        console = _Console(proc, vm.ours[CONSOLE].fileno(), tail_lines, expect.require, start=start)
        passed_by = ""
        while not passed_by:
            now = time.monotonic()
            if now >= deadline:
                return CheckOutcome(False, now - start, reason=f"no answer within {timeout:g}s",
                                   tail=console.tail())
            outcome = console.pump(watch, deadline=min(deadline, now + (0.25 if probe is not None else 1.0)))
            status = _last_exit(console, exit_line)
            if status is not None:
                seconds = time.monotonic() - start
                if marker is None and probe is None and status == 0:
                    passed_by = "the app exited 0"
                    break
                return CheckOutcome(False, seconds, reason=f"the app exited with status {status}",
                                   exit_status=status, tail=console.tail())
            refused = expect.failure(console) if outcome == "marker" and expect.refuse is not None else None
            if refused is not None and refused[1]:
                return CheckOutcome(False, time.monotonic() - start, reason=refused[0], tail=console.tail(),
                                    refused=True)
            if outcome == "marker":
                passed_by = f"marker /{marker.pattern}/" if marker is not None else "marker"
            elif outcome == "eof":
                return CheckOutcome(False, time.monotonic() - start,
                                   reason=f"qemu {_exited(proc)} before the check passed{console.error_suffix()}",
                                   tail=console.tail())
            elif probe is not None:
                passed_by = probe() or ""
        seconds = time.monotonic() - start
        broken = expect.failure(console)
        if broken is not None:
            return CheckOutcome(False, seconds, reason=broken[0], tail=console.tail(), refused=broken[1])
        ran = None
        if inside is not None and not passed_by.startswith("the app exited"):
            ran = run_inside(console, inside, vm.ours[CHECK_PORT].fileno() if port else None)
            _last_exit(console, exit_line)  # the commands' own lines are not the app's exit
        before = len(console.all_exits)
        if not passed_by.startswith("the app exited"):
            if stop.request(vm.qmp_path):
                console.drain(proc, grace)
            if proc.poll() is None and qmp.ask(vm.qmp_path, "quit"):
                console.drain(proc, 3.0)
            _last_exit(console, exit_line)  # the lines read while it stopped
        stopped = console.all_exits[before:]
        return CheckOutcome(True, seconds, passed_by, exit_status=None,
                           stop_status=stopped[-1] if stopped else None, tail=console.tail(), inside=ran,
                           log=console.log())


def _last_exit(console: _Console, exit_line: re.Pattern[str]) -> int | None:
    """The status of an exit line among the lines read since the last call."""
    found = None
    for line in console.take_new():
        m = exit_line.search(line)
        if m:
            found = int(m.group(1))
            console.all_exits.append(found)
    return found


def _exited(proc: subprocess.Popen) -> str:
    status = wait(proc, 5.0)
    return exit_status(status) if status is not None else "closed its console"


class _Console:
    """Reads the serial console (`out_fd`: our end of its socket) and qemu's stderr without
    blocking, to deadlines; keeps the last lines, and every line stamped (log) up to MAX_LOG."""

    MAX_LINE = 16384
    MAX_LOG = 20000  # lines of the whole console kept for the report

    def __init__(self, proc: subprocess.Popen, out_fd: int, tail_lines: int,
                 notice: tuple[re.Pattern[str], ...] = (), *, start: float | None = None) -> None:
        self.selector = selectors.DefaultSelector()
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}
        assert proc.stderr is not None
        for fd in (out_fd, proc.stderr.fileno()):
            self.selector.register(fd, selectors.EVENT_READ)
            self.decoders[fd] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.out_fd = out_fd
        self.start = time.monotonic() if start is None else start
        self.stamped: list[tuple[float, str]] = []
        self.max_lines = tail_lines
        self.lines: deque[str] = deque(maxlen=tail_lines)
        self.partial = ""  # raw text after the last newline
        self.stderr: list[str] = []
        self.new: list[str] = []  # complete lines not yet taken (take_new)
        self.all_exits: list[int] = []  # statuses of exit lines seen, for boot_check
        self.notice = notice  # lines to remember when they show (Expect.require), however long ago
        self.noticed: dict[str, str] = {}  # pattern -> the line that matched it first

    def pump(self, pattern: re.Pattern[str] | None, deadline: float) -> str:
        """Read until the marker ("marker"), both pipes close ("eof") or the deadline ("timeout")."""
        while self.selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            for key, _ in self.selector.select(min(remaining, 0.5)):
                if self._read(key.fd, pattern):
                    return "marker"
        return "eof"

    def _read(self, fd: int, pattern: re.Pattern[str] | None) -> bool:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the socket reset as qemu died
            data = b""
        if not data:
            self.selector.unregister(fd)
        text = self.decoders[fd].decode(data, final=not data)
        if fd != self.out_fd:
            self.stderr.append(text)
            return False
        return self._feed(text, pattern)

    def _feed(self, text: str, pattern: re.Pattern[str] | None) -> bool:
        *complete, self.partial = (self.partial + text).split("\n")
        self.partial = self.partial[-self.MAX_LINE :]
        found = False
        for raw in complete:
            line = strip_ansi(raw)
            self.keep(line)
            self.new.append(line)
            for p in self.notice:
                if p.pattern not in self.noticed and p.search(line):
                    self.noticed[p.pattern] = line
            del self.new[: -self.max_lines * 4]
            found = found or bool(pattern and pattern.search(line))
        # Prompts ("login: ") end without a newline: look at the unfinished line too.
        return found or bool(pattern and pattern.search(strip_ansi(self.partial)))

    def keep(self, line: str) -> None:
        """A clean console line, for the tail and the log (also the console session's lines)."""
        self.lines.append(line)
        if len(self.stamped) < self.MAX_LOG:
            self.stamped.append((time.monotonic() - self.start, line))

    def log(self) -> tuple[tuple[float, str], ...]:
        last = strip_ansi(self.partial)
        return (*self.stamped, (time.monotonic() - self.start, last)) if last.strip() else tuple(self.stamped)

    def seen(self) -> str:
        """The last lines and the unfinished one as read (a login prompt without its newline), for
        a console session that starts where this reader stopped."""
        return "\n".join([*list(self.lines)[-3:], self.partial])

    def take_new(self) -> list[str]:
        lines, self.new = self.new, []
        return lines

    def tail(self) -> list[str]:
        last = strip_ansi(self.partial)
        lines = [*self.lines, last] if last.strip() else list(self.lines)
        return lines[-self.max_lines :]

    def error_suffix(self) -> str:
        """": <qemu's error message>" if it printed one on stderr."""
        text = "".join(self.stderr)
        return f": {qemu_error(text)}" if text.strip() else ""

    def drain(self, proc: subprocess.Popen, seconds: float) -> bool:
        """Keep the pipes empty (a full pipe would stall the guest) until qemu exits."""
        deadline = time.monotonic() + seconds
        self.pump(None, deadline)
        return wait(proc, max(0.0, deadline - time.monotonic())) is not None


def _power_off(proc: subprocess.Popen, console: _Console, qmp_path: Path, grace: float) -> None:
    """ACPI power button, then `quit`, then SIGKILL (by reap); each step bounded."""
    if grace > 0 and qmp.ask(qmp_path, "system_powerdown") and console.drain(proc, grace):
        return
    if qmp.ask(qmp_path, "quit"):
        console.drain(proc, 3.0)
