"""Watching a VM's serial console until a line of its own shows: pipeline/headless.py's watch()
(kept under this name for the tests that import it from here)."""

from pipeline.headless import Watched, watch

__all__ = ["Watched", "watch"]
