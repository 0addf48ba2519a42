"""run(): every subprocess of the pipeline goes through here.

The command is echoed as a copy-pasteable shell line when LDT_VERBOSE is set, and a
failure logs that line before raising, so a user can re-run exactly what failed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

Cmd = Sequence[str | os.PathLike[str] | int]


def verbose() -> bool:
    return os.environ.get("LDT_VERBOSE", "") not in ("", "0")


def log(message: str) -> None:
    print(f"ldt: {message}", file=sys.stderr, flush=True)


def argv(cmd: Cmd) -> list[str]:
    return [os.fspath(a) if not isinstance(a, int) else str(a) for a in cmd]


def shell_line(cmd: Cmd, env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> str:
    """The command as a line a user can paste into a shell."""
    line = shlex.join(argv(cmd))
    if env:
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())) + " " + line
    if cwd:
        line = f"(cd {shlex.quote(os.fspath(cwd))} && {line})"
    return line


def run(
    cmd: Cmd,
    *,
    check: bool = True,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess:
    """Run cmd; `env` holds only the variables added to os.environ (and is shown in the log)."""
    args = argv(cmd)
    line = shell_line(args, env, cwd)
    if verbose():
        log(f"+ {line}")
    full_env = {**os.environ, **env} if env else None
    if capture:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
    try:
        proc = subprocess.run(args, env=full_env, cwd=cwd, input=input, timeout=timeout, check=False, **kwargs)
    except FileNotFoundError as e:
        raise UserError(f"{args[0]} not found", hint="run ./setup.sh to install the host tools") from e
    except subprocess.TimeoutExpired as e:
        raise UserError(f"timed out after {timeout:g}s: {line}") from e
    if check and proc.returncode != 0:
        detail = ""
        if capture and proc.stderr:
            err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
            detail = "\n" + "\n".join("  " + t for t in err.strip().splitlines()[-15:])
        raise UserError(f"command failed with exit status {proc.returncode}: {line}{detail}")
    return proc


@contextlib.contextmanager
def spawn(cmd: Cmd, *, env: Mapping[str, str] | None = None, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """Start cmd for streaming (pipes), logged like run(); the caller waits and checks.

    Leaving the block always reaps it: a process still running then (an exception, Ctrl-C, a
    caller done early) is killed and waited for, and its pipes are closed."""
    args = argv(cmd)
    if verbose():
        log(f"+ {shell_line(args, env)} &")
    full_env = {**os.environ, **env} if env else None
    try:
        proc = subprocess.Popen(args, env=full_env, **kwargs)
    except FileNotFoundError as e:
        raise UserError(f"{args[0]} not found", hint="run ./setup.sh to install the host tools") from e
    try:
        yield proc
    finally:
        reap(proc)


def reap(proc: subprocess.Popen) -> None:
    """Make sure the process is gone and its pipes closed; safe to call twice."""
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"{proc.args[0] if isinstance(proc.args, list) else proc.args} (pid {proc.pid}) "
                "did not die after SIGKILL")
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            with contextlib.suppress(OSError):  # unflushed input for a process that is gone
                stream.close()


def check_exit(proc: subprocess.Popen, cmd: Cmd) -> None:
    if proc.returncode != 0:
        raise UserError(f"command failed with exit status {proc.returncode}: {shell_line(cmd)}")


class Step:
    """Context manager: says what a long step does and how long it took."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> Step:
        self.start = time.monotonic()
        log(f"{self.what}…")
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            log(f"{self.what}: done in {time.monotonic() - self.start:.1f}s")
