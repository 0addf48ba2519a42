"""The stages of the graph. Each reads top to bottom:

    inputs -> manifest -> key -> (store hit? point at it : build atomically, then point) -> outputs

Stage functions take plain strings (the project root and a recipe name) so doit can run
them as `(function, [args])` actions, pickled into worker processes under `doit -n N`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from pipeline import recipes as recipes_mod
from pipeline.cache import Store, key_of, tree_manifest
from pipeline.errors import UserError
from pipeline.recipes import Recipe
from pipeline.run import log

# Bump a stage's version when its code changes what it produces: every key of that stage changes.
VERSIONS = {"tgz": 1}
TGZ = "rootfs.tgz"


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def store(self) -> Store:
        return Store(self.root / "cache")

    @functools.cached_property
    def recipes(self) -> dict[str, Recipe]:
        return recipes_mod.discover(self.recipes_dir)

    def recipe(self, name: str) -> Recipe:
        return recipes_mod.get(self.recipes, name)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """doit action wrapper: a UserError becomes one line plus hint, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as e:
            return TaskFailed(e.render())
        except KeyboardInterrupt:
            return TaskFailed("interrupted; nothing was stored")

    return wrapper


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- build_tgz --------------------------------------------------------------------------------


def tgz_manifest(p: Project, r: Recipe, client=None) -> dict[str, Any]:
    """Every input of a recipe's rootfs tgz."""
    m: dict[str, Any] = {"stage": "tgz", "version": VERSIONS["tgz"], "hostname": r.name, "platform": r.platform}
    if r.bootstrap is not None:
        m["bootstrap"] = r.settings()["bootstrap"]
        return m
    from pipeline import docker

    m["context"] = tree_manifest(r.dir, docker.context_files(r.dir))
    m["build_args"] = dict(r.build_args)
    m["parents"] = {parent: p.store.current_key(parent, TGZ) for parent in r.parents}
    m["bases"] = {ref: docker.image_id(client, ref) for ref in external_bases(r)} if client else {}
    return m


def external_bases(r: Recipe) -> list[str]:
    """FROM images that are not recipe images (e.g. debian:bookworm from a registry)."""
    refs = recipes_mod.from_images(r.dockerfile.read_text(), dict(r.build_args))
    return [ref for ref in refs if recipes_mod.recipe_of_image(ref) is None]


@user_errors
def build_tgz(root: str, name: str) -> None:
    """The recipe's rootfs tgz: mmdebstrap for a bootstrap recipe, docker build + export otherwise."""
    p = Project(Path(root))
    r = p.recipe(name)
    store = p.store
    client = None
    bootstraps = [n for n, x in p.recipes.items() if x.bootstrap is not None]
    if r.bootstrap is None:
        from pipeline import docker

        client = docker.client()
        for ref in external_bases(r):
            docker.ensure_base(client, ref, r.name, bootstraps)
        for parent in r.parents:  # the engine must hold the parent's current image
            ensure_image(p, client, parent)
    manifest = tgz_manifest(p, r, client)
    key = key_of(manifest)
    entry = store.lookup("tgz", key)
    if entry is not None:
        log(f"{name}: rootfs.tgz restored from the store ({key[:12]}), nothing built")
    else:
        with store.build("tgz", key, manifest) as work:
            if r.bootstrap is not None:
                from pipeline.tgz import bootstrap

                epoch = os.environ.get("SOURCE_DATE_EPOCH")
                bootstrap(r.bootstrap, work / TGZ, r.name, int(epoch) if epoch else None)
            else:
                _docker_tgz(client, r, key, work, bootstraps)
        entry = store.entry("tgz", key)
    store.point(name, TGZ, entry / TGZ)
    ensure_image(p, client, name)


def _docker_tgz(client, r: Recipe, key: str, work: Path, bootstraps: list[str]) -> None:
    from pipeline import docker
    from pipeline.tgz import Fixups, write_tgz

    log(f"{r.name}: docker build {r.dir}")
    image = docker.build(client, r.dir, f"{r.image}:{key}", buildargs=dict(r.build_args), platform=r.platform,
                         recipe=r.name, known_recipes=bootstraps, echo=_echo)
    (work / "image-config.json").write_text(json.dumps(docker.image_config(client, image), sort_keys=True))
    with docker.exported(client, image) as chunks:
        write_tgz(chunks, work / TGZ, Fixups(hostname=r.name), f"export {r.name}")


def ensure_image(p: Project, client, name: str) -> str:
    """Make ldt/<name>:latest the image of the recipe's current tgz entry (import it if gone)."""
    from pipeline import docker

    if client is None:
        client = docker.client()
    entry = p.store.current(name, TGZ)
    if entry is None:
        raise UserError(f"recipe '{name}' has no rootfs.tgz yet", hint=f"run `doit build_tgz:{name}`")
    r = p.recipe(name)
    keyed = f"{r.image}:{entry.name}"
    if docker.image_id(client, keyed) is None:
        cfg_file = entry / "image-config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        log(f"{name}: importing {entry / TGZ} into the engine as {keyed}")
        docker.import_tgz(client, entry / TGZ, keyed, docker.config_changes(cfg))
    docker.tag(client, keyed, f"{r.image}:latest")
    return keyed


# -- graph helpers used by dodo.py -------------------------------------------------------------


def recipes_or_exit(p: Project) -> dict[str, Recipe]:
    """Recipes for dodo.py: a bad recipe is one line and exit status 2, not a traceback."""
    try:
        return p.recipes
    except UserError as e:
        print(e.render(), file=sys.stderr)
        raise SystemExit(2) from None


def recipe_files(r: Recipe) -> list[str]:
    """Every file in the recipe folder (a superset of the build context: cheap to list, never misses one)."""
    return sorted(str(f) for f in r.dir.rglob("*") if f.is_file() or f.is_symlink())


def tgz_inputs(r: Recipe) -> dict[str, Any]:
    """The non-file inputs of build_tgz, for doit's uptodate digest."""
    inputs: dict[str, Any] = {"version": VERSIONS["tgz"], "settings": r.settings()["build_args"],
                              "platform": r.platform, "bootstrap": r.settings()["bootstrap"],
                              "files": [str(f.relative_to(r.dir)) for f in map(Path, recipe_files(r))]}
    if r.bootstrap is None and external_bases(r):
        inputs["bases"] = functools.partial(_base_ids, external_bases(r))  # asks the engine only when checked
    return inputs


def _base_ids(refs: list[str]) -> dict[str, str | None]:
    from pipeline import docker

    try:
        c = docker.client()
    except UserError:
        return {ref: None for ref in refs}
    return {ref: docker.image_id(c, ref) for ref in refs}


@user_errors
def show_store(root: str) -> None:
    print(Project(Path(root)).store.listing())


@user_errors
def store_gc(root: str) -> None:
    removed = Project(Path(root)).store.gc()
    for e in removed:
        print(f"removed {e}")
    print(f"{len(removed)} removed")
