"""A project: a folder with recipes/ and the store in cache/."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from pipeline import recipes as recipes_mod
from pipeline.cache import Store
from pipeline.recipes import Recipe


@dataclass(frozen=True)
class Project:
    root: Path
    extra: tuple[Recipe, ...] = ()  # recipes from outside recipes/ (the stage commands' files and folders)

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @functools.cached_property
    def store(self) -> Store:
        """cache/, shared through $LDT_REMOTE when that is set."""
        return Store.from_env(self.root / "cache")

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
