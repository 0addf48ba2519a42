"""Saying a thing once: a note shown to a user is remembered as a stamp file in a folder (the
project's cache/notices/), so a tool used like sudo stays quiet on every later run."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path


def first_time(seen: Path, text: str) -> bool:
    """True the first time `text` is asked about in folder `seen` (then it is remembered); a
    folder that cannot be written only means the note is shown again next time."""
    stamp = seen / hashlib.sha256(text.encode()).hexdigest()[:16]
    if stamp.exists():
        return False
    with contextlib.suppress(OSError):
        seen.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    return True
