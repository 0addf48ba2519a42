"""Shared fixtures. Integration fixtures build through the real pipeline (filled in as stages land)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def hello_tgz() -> Path:
    """The rootfs tgz of recipes/hello (LDT_HELLO_TGZ overrides, for developing image stages)."""
    override = os.environ.get("LDT_HELLO_TGZ")
    if override:
        return Path(override)
    pytest.skip("hello tgz fixture not wired yet")
