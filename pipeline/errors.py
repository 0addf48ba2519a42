"""User-facing failures: one clear line plus a hint, never a traceback."""

from __future__ import annotations

import sys


class UserError(Exception):
    """An expected failure the user can fix (daemon down, bad recipe.toml, no kernel…)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        line = f"error: {self.message}"
        if self.hint:
            line += f"\n  hint: {self.hint}"
        return line


def die(message: str, hint: str | None = None) -> UserError:
    """Raise a UserError; typed as returning one so `raise die(...)` reads naturally too."""
    raise UserError(message, hint)


def report(exc: UserError) -> None:
    print(exc.render(), file=sys.stderr)
