"""A project: a folder with recipes/ and the store in cache/ (shared through $LDT_REMOTE)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline import recipes as recipes_mod
from pipeline.cache import Store
from pipeline.recipes import Recipe
from pipeline.remote import RegistryStore


def store_from_env(cache_dir: Path, env: Mapping[str, str] = os.environ) -> Store:
    """The store in cache_dir, shared through LDT_REMOTE (pull only with LDT_REMOTE_PUSH=0)."""
    return Store(cache_dir, RegistryStore.from_env(env))


@dataclass(frozen=True)
class Project:
    root: Path
    extra: tuple[Recipe, ...] = ()  # recipes from outside recipes/ (the stage commands' files and folders)

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @functools.cached_property
    def registry(self) -> RegistryStore | None:
        """The registry a fleet shares ($LDT_REMOTE): the store's remote, and where images are published."""
        return RegistryStore.from_env()

    @functools.cached_property
    def store(self) -> Store:
        """cache/, shared through $LDT_REMOTE when that is set."""
        return Store(self.root / "cache", self.registry)

    @functools.cached_property
    def recipes(self) -> dict[str, Recipe]:
        """Every recipe under recipes/ (validated together: FROM edges, cycles) and the extra ones."""
        return {**recipes_mod.discover(self.recipes_dir), **{r.name: r for r in self.extra}}

    def recipe(self, name: str) -> Recipe:
        """A recipe by name: an extra one without reading recipes/, else from recipes/."""
        for r in self.extra:
            if r.name == name:
                return r
        return recipes_mod.get(self.recipes, name)
