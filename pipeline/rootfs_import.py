"""Importing root filesystems from outside recipes/ into the store: the stage commands' tgz files
and folders become tgz entries keyed by their content, so the later stages treat them like any
recipe's tgz."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pipeline import userns
from pipeline.artifacts import EPOCH, Artifact
from pipeline.builders import source_date_epoch
from pipeline.cache import hash_file, tree_manifest
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.recipes import Recipe
from pipeline.run import run
from pipeline.stages import STAGE, head, store_entry
from pipeline.tgz import compressor_cmd


def adhoc_recipe(path: Path, prefix: str) -> Recipe:
    """A recipe with default settings standing for a file or folder outside recipes/."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.name.lower().removesuffix(".tgz").removesuffix(".tar.gz"))
    return Recipe(name=f"{prefix}-{stem.strip('-.') or 'input'}", dir=path.parent)


def import_tgz(p: Project, tgz: Path, r: Recipe) -> None:
    """Put a rootfs tgz from anywhere into the store (keyed by its bytes) and point r at it."""
    if not tgz.is_file():
        raise UserError(f"{tgz}: no such file", hint="give the path of a rootfs .tgz (e.g. from docker export | gzip)")

    def build(work: Path, key: str) -> None:
        (work / EPOCH).write_text(f"{int(tgz.stat().st_mtime)}\n")
        # a copy, never a hard link: entries are read-only and must not change with the user's file
        run(["cp", "--reflink=auto", tgz, work / Artifact.TGZ])

    stage = STAGE["tgz"]
    store_entry(p, r, stage, {**head(stage), "file_xxh3": hash_file(tgz)}, build)


def import_tree(p: Project, tree: Path, r: Recipe) -> None:
    """A root filesystem folder (as mmdebstrap leaves it) becomes a cached tgz keyed by its content."""
    if not (tree / "boot").is_dir():
        raise UserError(f"{tree}: no boot/ folder with a kernel", hint="give a root filesystem tree, e.g. made by "
                        "`mmdebstrap --include=linux-image-amd64,systemd-sysv bookworm DIR`")
    ns = userns.probe(tree)  # a tree made rootless is read inside the user namespace that made it
    content = {"tree": tree_manifest(tree, [str(f.relative_to(tree)) for f in sorted(tree.rglob("*"))])} \
        if ns is userns.Mapping.NONE else {"tree_stat": userns.stat_manifest(tree, ns)}

    def build(work: Path, key: str) -> None:
        (work / EPOCH).write_text(f"{source_date_epoch()}\n")
        tar = ["tar", "-C", tree, "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "-cf", "-", "."]
        with open(work / Artifact.TGZ, "wb") as out:
            run(ns.wrap(["sh", "-c", f"{shlex.join(map(str, tar))} | {shlex.join(compressor_cmd())}"]), stdout=out)

    stage = STAGE["tgz"]
    store_entry(p, r, stage, {**head(stage), **content}, build)
