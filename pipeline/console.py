"""A shell on a guest's serial console, without a guest agent: log in, run commands, and read each
command's output and exit status between markers no echo can forge.

The console is any bidirectional byte stream given as a file descriptor: QEMU's serial chardev
as a unix socket or a socketpair, or, in the tests, a pseudo-terminal. Everything read is cleaned
(ANSI escapes and control characters removed, CR dropped) before it is matched, and kernel
messages (`[   12.345678] …`) are taken out wherever they interrupt a line, so colours, echo,
prompts and printk noise cannot hide or fake a marker.

How a command runs (one line typed into the shell, then the shell's prompt is ignored):

    printf '%s%s\\n' __LDT_ BEGIN_<nonce>; ( CMD
    ) </dev/null 2>&1; printf '\\n%s%s:%s\\n' __LDT_ END_<nonce> "$?"

The echoed line holds `__LDT_ END_…` (quote, space, quote), never `__LDT_END_…`, so only the
shell's own printf can match; the nonce is new for every command. The subshell keeps an `exit 3`
from ending the login shell, and stdin from /dev/null keeps a command from eating what we type.
The password is read from an environment variable, typed once, and replaced by `********` in
every line this module keeps or hands on.
"""

from __future__ import annotations

import codecs
import enum
import os
import re
import secrets
import select
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError

_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clear screen
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles
    r"|\x1b[()*+][0-9A-Za-z]"  # character set selection
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
    r"|[\x00-\x08\x0b-\x1f\x7f]"  # remaining control characters, CR included (keeps \t and \n)
)
# A printk line, wherever it starts (the kernel does not know where the tty's cursor is); an
# unfinished one is taken out too, up to the end of what has arrived.
KERNEL_LINE = re.compile(r"\[ *\d+\.\d{6}\][^\n]*(?:\n|$)")
LOGIN_PROMPT = re.compile(r"(?:^|\n)(?!Last login)(?:[\w.-]+ )?login: *\Z")
PASSWORD_PROMPT = re.compile(r"[Pp]assword: *\Z")
LOGIN_INCORRECT = re.compile(r"Login incorrect|Authentication failure|Permission denied")
SHELL_PROMPT = re.compile(r"[#$%>] *\Z")
MARK = "__LDT_"  # typed as '__LDT_' 'NAME_<nonce>' so the echo never holds MARK + NAME
REDACTED = "********"


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def without_kernel_lines(text: str) -> str:
    return KERNEL_LINE.sub("", text)


def _complete_prefix(raw: str) -> tuple[str, str]:
    """(text safe to clean now, an unfinished escape sequence at the end to keep for later)."""
    i = raw.rfind("\x1b")
    if i == -1 or len(raw) - i > 256:
        return raw, ""
    m = _ANSI.match(raw, i)
    if m is None or m.end() - i == 1:  # a lone ESC: the rest of its sequence is still coming
        return raw[:i], raw[i:]
    return raw, ""


# ── results ──────────────────────────────────────────────────────────────────────────────────


class Verdict(enum.StrEnum):
    """How one in-image command ended; each verdict knows its table word and its JUnit element."""

    PASSED = "passed"
    FAILED = "failed"  # ran, non-zero status
    TIMED_OUT = "timed out"  # no end marker within its timeout: the caller stops the VM
    NOT_RUN = "not run"  # an earlier command hung, or the login failed

    @property
    def ok(self) -> bool:
        return self is Verdict.PASSED

    @property
    def junit_element(self) -> str | None:
        """<failure> (the test said no), <error> (it could not finish), <skipped>, or none."""
        return {Verdict.PASSED: None, Verdict.FAILED: "failure", Verdict.TIMED_OUT: "error",
                Verdict.NOT_RUN: "skipped"}[self]

    @property
    def label(self) -> str:
        return {Verdict.PASSED: "pass", Verdict.FAILED: "FAIL", Verdict.TIMED_OUT: "HANG",
                Verdict.NOT_RUN: "skip"}[self]


@dataclass(frozen=True)
class CommandResult:
    """One command run inside the guest: its status (None when it never finished), its output
    (stdout and stderr as the console showed them, kernel lines and markers taken out, trailing
    newlines dropped as $(…) does)."""

    command: str
    status: int | None
    output: str
    seconds: float
    timeout: float = 0.0

    @property
    def verdict(self) -> Verdict:
        if self.status is None:
            return Verdict.TIMED_OUT if self.seconds > 0 else Verdict.NOT_RUN
        return Verdict.PASSED if self.status == 0 else Verdict.FAILED

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def reason(self) -> str:
        """One line for a table or a JUnit message ('' when it passed)."""
        v = self.verdict
        if v is Verdict.FAILED:
            return f"`{self.command}` exited with status {self.status}"
        if v is Verdict.TIMED_OUT:
            return f"`{self.command}` did not finish within {self.timeout:g}s"
        if v is Verdict.NOT_RUN:
            return f"`{self.command}` was not run"
        return ""

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "status": self.status, "output": self.output,
                "seconds": round(self.seconds, 3), "timeout": self.timeout}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CommandResult:
        return cls(d["command"], d["status"], d["output"], d["seconds"], d.get("timeout", 0.0))


def not_run(command: str) -> CommandResult:
    return CommandResult(command, None, "", 0.0)


# ── login failures ───────────────────────────────────────────────────────────────────────────


class LoginFailure(enum.StrEnum):
    """Why the check got no shell; each says it in one line with what to change."""

    NO_GETTY = "no getty"
    INCORRECT = "login incorrect"
    NO_PASSWORD = "no password"
    NO_SHELL = "no shell"
    NO_CHECK_SHELL = "no check shell"  # an app run by our init: no shell on the check's port
    CLOSED = "console closed"

    def error(self, user: str, password_env: str | None, seconds: float) -> ConsoleLoginError:
        var = f"${password_env}" if password_env else "[check] password_env"
        message, hint = {
            LoginFailure.NO_GETTY: (
                f"the check cannot log in: no login prompt on the serial console within {seconds:g}s",
                "add a getty on the serial console to the image: with systemd, "
                "`systemctl enable serial-getty@ttyS0.service` (or keep console=ttyS0 on the kernel command line); "
                "with busybox init, a line `ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100` in /etc/inittab"),
            LoginFailure.INCORRECT: (
                f"the check cannot log in as {user}: Login incorrect",
                f"check the password in {var} (it is never printed) and that {user} may log in on ttyS0"),
            LoginFailure.NO_PASSWORD: (
                f"the check cannot log in as {user}: the image asks for a password and {var} is not set",
                f"export {password_env or 'LDT_CHECK_PASSWORD'}=… (a CI secret) and name it in [check] password_env"),
            LoginFailure.NO_SHELL: (
                f"the check logged in as {user} but got no shell within {seconds:g}s",
                f"{user}'s login shell must be a POSIX shell (sh, bash, dash, ash)"),
            LoginFailure.NO_CHECK_SHELL: (
                f"the check got no shell on its serial port within {seconds:g}s",
                "our init starts one beside the app when the VM has the check's port; rebuild the image "
                "(doit build_app) so it has the current init"),
            LoginFailure.CLOSED: ("the check cannot log in: the serial console closed (the VM stopped)",
                                  "see the console lines above"),
        }[self]
        return ConsoleLoginError(self, message, hint)


class ConsoleLoginError(UserError):
    def __init__(self, failure: LoginFailure, message: str, hint: str) -> None:
        super().__init__(message, hint)
        self.failure = failure


class Step(enum.StrEnum):
    """A moment of a console session, stamped in ConsoleSession.steps (where a check's seconds go)."""

    LOGIN_PROMPT = "login prompt"  # seen (or already read by the boot check)
    USER_SENT = "user sent"
    PASSWORD_PROMPT = "password prompt"
    PASSWORD_SENT = "password sent"
    SHELL_PROMPT = "shell prompt"  # the login shell's first prompt, recognised
    SETUP_SENT = "setup sent"  # the setup line typed (again, when poked)
    READY = "ready"  # the shell answered the setup line
    COMMAND_SENT = "command sent"
    BEGIN = "begin"  # a command's begin marker
    END = "end"  # its end marker


class ConsoleClosed(Exception):
    """The stream ended (the guest powered off, QEMU exited)."""


@dataclass(frozen=True)
class Login:
    """How to get a shell: the user, and the name of the environment variable holding its
    password (None: the image lets the user in without one)."""

    user: str = "root"
    password_env: str | None = None


# ── the session ──────────────────────────────────────────────────────────────────────────────


class ConsoleSession:
    """A serial console as a shell. `fd` is read and written (not closed: its owner closes it).

    `on_line(line)` gets each complete console line, cleaned and with the password redacted (for
    a console log); `tail()` gives the last `tail_lines` of them. `seen`: console text a boot
    check read before (its login prompt), so the login starts without waiting for a new one."""

    POKE_EVERY = 3.0  # seconds between newlines typed at a silent getty, and between setup lines
    FIRST_POKE = 1.0  # seconds to wait for a login prompt before typing a newline to ask for one
    WINDOW = 4096  # characters a match may reach back before the last search's end (a printk line is < 1 KiB)

    def __init__(self, fd: int, *, on_line: Callable[[str], None] | None = None, tail_lines: int = 40,
                 env: Mapping[str, str] | None = None, seen: str = "") -> None:
        self.fd = fd
        self.on_line = on_line
        self.env = os.environ if env is None else env
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw = ""  # an unfinished escape sequence
        self._text = ""  # cleaned complete lines not yet consumed by a match, kernel lines taken out
        self._partial = ""  # cleaned text after the last newline (kernel lines still in it)
        self._line = ""  # cleaned text after the last newline (for on_line/tail)
        self._lines: deque[str] = deque(maxlen=tail_lines)
        self._secret: str | None = None
        self.ready = False  # logged in, shell set up
        self.broken = False  # a command hung: the shell is busy for good
        self.login_seconds: float | None = None  # from the login prompt to a ready shell (the report's phase)
        self.steps: list[tuple[float, Step]] = []  # (time.monotonic(), step): where the seconds went
        if seen:  # what the boot check already read from this console (its login prompt)
            self._ingest(strip_ansi(_complete_prefix(seen)[0])[-4096:])

    # -- bytes in and out

    def _step(self, step: Step) -> None:
        self.steps.append((time.monotonic(), step))

    def _send(self, text: str) -> None:
        data = text.encode()
        while data:
            _, writable, _ = select.select([], [self.fd], [], 10)
            if not writable:
                raise ConsoleClosed("the console takes no input")
            try:
                n = os.write(self.fd, data)
            except OSError as e:
                raise ConsoleClosed(str(e)) from e
            data = data[n:]

    def _read(self, wait: float) -> bool:
        """Read what arrives within `wait` seconds; False when nothing did."""
        if not select.select([self.fd], [], [], max(0.0, wait))[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError as e:  # a pty whose other side is gone: EIO
            raise ConsoleClosed(str(e)) from e
        if not data:
            raise ConsoleClosed("end of stream")
        ready, self._raw = _complete_prefix(self._raw + self._decoder.decode(data))
        clean = strip_ansi(ready)
        self._ingest(clean)
        self._keep_lines(clean)
        return True

    def _ingest(self, clean: str) -> None:
        """Complete lines go to the text matched against, kernel lines out (each once: a long
        output costs linear time); the unfinished line waits in _partial."""
        *_, last = (self._partial + clean).rpartition("\n")
        done = (self._partial + clean)[: len(self._partial) + len(clean) - len(last)]
        self._text += without_kernel_lines(done)
        self._partial = last

    def _view(self) -> str:
        return self._text + without_kernel_lines(self._partial)

    def _clear(self) -> None:
        self._text = self._partial = ""

    def _keep_lines(self, clean: str) -> None:
        *complete, self._line = (self._line + clean).split("\n")
        self._line = self._line[-4096:]
        for line in complete:
            line = self._redact(line)
            self._lines.append(line)
            if self.on_line is not None:
                self.on_line(line)

    def _redact(self, line: str) -> str:
        return line.replace(self._secret, REDACTED) if self._secret else line

    def tail(self) -> tuple[str, ...]:
        """The last console lines (cleaned, password redacted), the unfinished one included."""
        last = self._redact(self._line)
        return (*self._lines, last) if last.strip() else tuple(self._lines)

    def _expect(self, patterns: Mapping[str, re.Pattern[str]], deadline: float,
                poke: Callable[[], None] | None = None, poke_now: bool = False) -> tuple[str, re.Match[str]] | None:
        """Wait for the first of `patterns` in the cleaned text (kernel lines taken out); the text
        up to the match's end is consumed. `poke()` is called every POKE_EVERY seconds."""
        last_poke = time.monotonic() - (self.POKE_EVERY if poke_now else 0.0)
        searched = 0  # patterns are short: each search starts a window before the last one's end
        while True:
            view = self._view()
            start = max(0, searched - self.WINDOW)
            found = [(m.start(), name, m) for name, p in patterns.items() if (m := p.search(view, start))]
            searched = len(view)
            if found:
                _, name, m = min(found, key=lambda f: f[0])
                self._consume(m.end())
                return name, m
            now = time.monotonic()
            if now >= deadline:
                return None
            if poke is not None and now - last_poke >= self.POKE_EVERY:
                poke()
                last_poke = now
            wait = min(deadline, last_poke + self.POKE_EVERY) - now if poke else deadline - now
            self._read(min(wait, 1.0))

    def _consume(self, end: int) -> None:
        """Drop the text up to position `end` of the view (_text, then _partial without kernel lines)."""
        if end <= len(self._text):
            self._text = self._text[end:]
            return
        end -= len(self._text)
        self._clear()
        kept = pos = 0  # walk the partial line and its view together to find the raw position
        for m in KERNEL_LINE.finditer(self._partial):
            gap = m.start() - pos
            if kept + gap >= end:
                break
            kept += gap
            pos = m.end()
        self._partial = self._partial[pos + (end - kept):]

    # -- logging in

    def login(self, login: Login = Login(), *, timeout: float = 60.0) -> None:
        """Get a shell and set it up (TERM=dumb, a plain prompt, no PROMPT_COMMAND). Raises a
        ConsoleLoginError (one line and a hint) when that cannot be done within `timeout`."""
        start = time.monotonic()
        deadline = start + timeout

        def fail(failure: LoginFailure) -> ConsoleLoginError:
            return failure.error(login.user, login.password_env, round(time.monotonic() - start))

        try:
            # A getty that printed its prompt before we listened prints it again on a newline.
            got = self._expect({"login": LOGIN_PROMPT}, min(deadline, start + self.FIRST_POKE))
            if got is None and self._expect({"login": LOGIN_PROMPT}, deadline, poke=lambda: self._send("\n"),
                                            poke_now=True) is None:
                raise fail(LoginFailure.NO_GETTY)
            prompt_at = time.monotonic()
            self._step(Step.LOGIN_PROMPT)
            self._clear()
            self._send(login.user + "\n")
            self._step(Step.USER_SENT)
            answers = {"password": PASSWORD_PROMPT, "incorrect": LOGIN_INCORRECT, "login": LOGIN_PROMPT,
                       "prompt": SHELL_PROMPT}
            password_sent, retyped = False, 0
            while (got := self._expect(answers, min(deadline, time.monotonic() + 15.0))) is not None:
                what = got[0]
                if what == "incorrect" or (what == "login" and (password_sent or retyped >= 3)):
                    raise fail(LoginFailure.INCORRECT)
                if what == "login":  # a second prompt, for a newline we typed to wake it: type the user again
                    retyped += 1
                    self._send(login.user + "\n")
                    self._step(Step.USER_SENT)
                elif what == "password" and not password_sent:
                    self._step(Step.PASSWORD_PROMPT)
                    password = self.env.get(login.password_env or "")
                    if not password:
                        raise fail(LoginFailure.NO_PASSWORD)
                    self._secret = password
                    self._send(password + "\n")
                    self._step(Step.PASSWORD_SENT)
                    password_sent = True
                else:
                    if what == "prompt":
                        self._step(Step.SHELL_PROMPT)
                    break
            self._setup(deadline, fail, prompt_seen=got is not None and got[0] == "prompt")
            self.login_seconds = time.monotonic() - prompt_at
        except ConsoleClosed as e:
            raise fail(LoginFailure.CLOSED) from e

    def attach(self, *, timeout: float = 30.0) -> None:
        """Take a shell that waits on this stream already (no getty, no login): the one our init
        starts beside an app on the check's own serial port."""
        start = time.monotonic()

        def fail(failure: LoginFailure) -> ConsoleLoginError:
            return (LoginFailure.NO_CHECK_SHELL if failure is LoginFailure.NO_SHELL else failure).error(
                "root", None, round(time.monotonic() - start))

        try:
            self._setup(start + timeout, fail, prompt_seen=True)
        except ConsoleClosed as e:
            raise fail(LoginFailure.CLOSED) from e
        self.login_seconds = time.monotonic() - start

    def _setup(self, deadline: float, fail: Callable[[LoginFailure], ConsoleLoginError], *, prompt_seen: bool) -> None:
        """Type the setup line until the shell answers it (typed ahead of a slow login, it waits
        in the tty's buffer; typed again, it does no harm)."""
        nonce = secrets.token_hex(6)
        # Builtins only: under TCG the first exec of a cold binary (stty -echo) costs a second, and
        # the markers need no echo off (the echo of a line comes before the shell runs it). bash's
        # line editor off: the tty then echoes each line once, not readline's redraws.
        line = ("export TERM=dumb PS1='$ ' PS2=''; unset PROMPT_COMMAND; "
                "[ -n \"${BASH_VERSION-}\" ] && set +o emacs +o vi; "
                f"printf '%s%s\\n' {MARK} READY_{nonce}\n")
        answers = {"ready": re.compile(rf"{MARK}READY_{nonce}\n"), "incorrect": LOGIN_INCORRECT,
                   "login": LOGIN_PROMPT}

        def poke() -> None:
            self._send(line)
            self._step(Step.SETUP_SENT)

        # Wait briefly for the shell's prompt (or a refusal) before typing, then type and keep typing.
        got = None
        if not prompt_seen:
            got = self._expect({"prompt": SHELL_PROMPT, **answers}, min(deadline, time.monotonic() + 5.0))
            if got is not None and got[0] == "prompt":
                self._step(Step.SHELL_PROMPT)
        if got is None or got[0] == "prompt":
            poke()
            got = self._expect(answers, deadline, poke=poke)
        if got is None:
            raise fail(LoginFailure.NO_SHELL)
        if got[0] != "ready":
            raise fail(LoginFailure.INCORRECT)
        self._step(Step.READY)
        self.ready = True
        self._clear()

    # -- commands

    def run(self, command: str, *, timeout: float = 60.0) -> CommandResult:
        """Run one command in a subshell; its status, output and time. A command that does not
        finish within `timeout` gives a TIMED_OUT result and leaves the session broken."""
        if not self.ready or self.broken:
            return not_run(command)
        nonce = secrets.token_hex(6)
        begin, end = f"BEGIN_{nonce}", f"END_{nonce}"
        line = (f"printf '%s%s\\n' {MARK} {begin}; ( {command}\n) </dev/null 2>&1; "
                f"printf '\\n%s%s:%s\\n' {MARK} {end} \"$?\"\n")
        start = time.monotonic()
        deadline = start + timeout
        try:
            self._send(line)
            self._step(Step.COMMAND_SENT)
            got_begin = self._expect({"begin": re.compile(rf"{MARK}{begin}\n")}, deadline)
            if got_begin:
                self._step(Step.BEGIN)
            got_end = got_begin and self._expect({"end": re.compile(rf"\n{MARK}{end}:(\d+)\n")}, deadline)
            if got_end:
                self._step(Step.END)
        except ConsoleClosed:
            got_end = None
        seconds = time.monotonic() - start
        if not got_end:
            self.broken = True
            partial = self._view()
            return CommandResult(command, None, self._redact(partial), seconds, timeout)
        _, m = got_end
        output = m.string[: m.start()].rstrip("\n")  # like $(…): trailing newlines dropped
        return CommandResult(command, int(m.group(1)), self._redact(output), seconds, timeout)

    def run_all(self, commands: Sequence[str], *, timeout: float = 60.0) -> tuple[CommandResult, ...]:
        """Each command in order; after one hangs, the rest are NOT_RUN."""
        return tuple(self.run(c, timeout=timeout) for c in commands)


# ── the [check] table ────────────────────────────────────────────────────────────────────────

# systemctl --failed exits 0 even with failed units: the check prints them and fails when any. It
# passes where systemd is not PID 1 (sd_booted(): /run/systemd/system), so it needs no build-time fact.
SYSTEMD_FAILED_UNITS = ('[ -d /run/systemd/system ] || exit 0; '
                        'failed=$(systemctl --failed --no-legend --plain --no-pager 2>&1); '
                        '[ -z "$failed" ] || { printf "%s\\n" "$failed"; false; }')
DEFAULT_PASSWORD_ENV = "LDT_CHECK_PASSWORD"


@dataclass(frozen=True)
class CheckSettings:
    """recipe.toml's [check]: the commands run inside each booted mode, as whom, how long each may take.

    `run` None means the default: on an image with systemd, no failed units; elsewhere nothing."""

    run: tuple[str, ...] | None = None
    login: str = "root"
    password_env: str = DEFAULT_PASSWORD_ENV
    timeout: int = 60
    login_timeout: int = 60

    SCHEMA = {"run": list, "login": str, "password_env": str, "timeout": int, "login_timeout": int}

    @classmethod
    def from_table(cls, table: Mapping[str, Any],
                   error: Callable[[str, str, str], UserError] | None = None) -> CheckSettings:
        """Validate [check]; `error(key, message, hint)` builds the UserError (recipes.py adds file and line)."""
        def err(key: str, message: str, hint: str) -> UserError:
            return error(key, message, hint) if error else UserError(f"[check] {key}: {message}", hint=f"e.g. {hint}")

        examples = {"run": 'run = ["systemctl is-system-running --wait"]', "login": 'login = "root"',
                    "password_env": 'password_env = "LDT_CHECK_PASSWORD"', "timeout": "timeout = 60",
                    "login_timeout": "login_timeout = 60"}
        for key, value in table.items():
            expected = cls.SCHEMA.get(key)
            if expected is None:
                raise err(key, f"unknown key '{key}'", f"known keys in [check]: {', '.join(cls.SCHEMA)}")
            if not isinstance(value, expected) or (expected is int and (isinstance(value, bool) or value <= 0)):
                raise err(key, f"must be {'a positive integer' if expected is int else expected.__name__}",
                          examples[key])
        run = table.get("run")
        if run is not None and not all(isinstance(c, str) and c.strip() for c in run):
            raise err("run", "must be an array of non-empty strings", examples["run"])
        env = table.get("password_env", DEFAULT_PASSWORD_ENV)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
            raise err("password_env", f"'{env}' is not an environment variable name", examples["password_env"])
        return cls(run=None if run is None else tuple(run), login=table.get("login", "root"), password_env=env,
                   timeout=table.get("timeout", 60), login_timeout=table.get("login_timeout", 60))

    def commands(self, *, systemd: bool) -> tuple[str, ...]:
        """What runs: the recipe's commands, or by default the failed-units check where systemd
        may be init (an OS image, a systemd app: systemd = plan.init is not InitKind.LDT)."""
        if self.run is not None:
            return self.run
        return (SYSTEMD_FAILED_UNITS,) if systemd else ()

    def settings(self) -> dict[str, Any]:
        """As plain data, for Recipe.settings()."""
        return {"run": None if self.run is None else list(self.run), "login": self.login,
                "password_env": self.password_env, "timeout": self.timeout, "login_timeout": self.login_timeout}

    def key(self, *, systemd: bool) -> dict[str, Any]:
        """What a cached result depends on (the password is not: it only opens the door)."""
        return {"run": list(self.commands(systemd=systemd)), "login": self.login, "timeout": self.timeout}

    @property
    def as_login(self) -> Login:
        return Login(self.login, self.password_env)
