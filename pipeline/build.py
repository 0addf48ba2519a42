"""What a stage's builder gets (Build): its own module so that the table (stages.py) and the
builders (builders.py) both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import Artifact
from pipeline.project import Project
from pipeline.recipes import Recipe


@dataclass(frozen=True)
class Build:
    """What a builder gets: the recipe, its key, an empty work dir to fill with `makes`, and the
    files it needs (each in the finished entry of the stage that made it)."""

    project: Project
    recipe: Recipe
    key: str
    work: Path
    inputs: dict[Artifact, Path]
    epoch: int | None

    def input(self, a: Artifact) -> Path | None:
        return self.inputs.get(a)

    def out(self, a: Artifact) -> Path:
        return self.work / a
