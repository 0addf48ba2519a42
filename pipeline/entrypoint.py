"""The wrapper every console script runs in (cli.py's commands, debian-install): a UserError is one
line and exit 2, Ctrl-C exit 130, SIGTERM exit 143, never a traceback for an expected failure."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from pipeline.errors import UserError


class Terminated(SystemExit):
    """SIGTERM (a CI job's timeout, `kill`, systemd stopping a unit) as an exception, so every
    `with` block unwinds: no QEMU or helper outlives the process (run.spawn reaps on the way out)."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """From now on SIGTERM unwinds the main thread (console scripts, and doit through dodo.py)."""
    signal.signal(signal.SIGTERM, _terminated)


def entry_point(main: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    """A console script: one clear line on a user error (exit 2), 130 on Ctrl-C, 143 on SIGTERM
    (after its children are reaped)."""

    def wrapper() -> None:
        exit_cleanly_on_sigterm()
        try:
            sys.exit(main(None))
        except UserError as e:
            print(e.render(), file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)

    wrapper.__doc__ = main.__doc__
    return wrapper
