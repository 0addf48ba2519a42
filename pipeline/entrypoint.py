"""The wrapper every console script runs in (cli.py's commands, debian-install): a UserError is one
line and exit 2, Ctrl-C exit 130, never a traceback for an expected failure."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from pipeline.errors import UserError


def entry_point(main: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    """A console script: one clear line on a user error (exit 2), 130 on Ctrl-C."""

    def wrapper() -> None:
        try:
            sys.exit(main(None))
        except UserError as e:
            print(e.render(), file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)

    wrapper.__doc__ = main.__doc__
    return wrapper
