"""The build graph: turns recipes/ into doit tasks. All logic lives in pipeline/."""

from pathlib import Path

from pipeline import stages
from pipeline.cache import XXHashChecker, inputs_changed
from pipeline.stages import TGZ, Project

ROOT = Path(__file__).resolve().parent
P = Project(ROOT)
RECIPES = stages.recipes_or_exit(P)
STORE = P.store
STORE.root.mkdir(exist_ok=True)  # doit keeps its state file in cache/

DOIT_CONFIG = {
    "default_tasks": [f"build_tgz:{name}" for name in RECIPES],
    "check_file_uptodate": XXHashChecker,
    "dep_file": str(ROOT / "cache" / "doit.db"),
    "backend": "json",
    "verbosity": 2,
    "action_string_formatting": "new",
}


def task_build_tgz():
    """Dockerfile (or [bootstrap] via mmdebstrap) -> cached rootfs tgz"""
    yield {"name": None, "doc": task_build_tgz.__doc__}
    for r in RECIPES.values():
        yield {
            "name": r.name,
            "doc": f"rootfs tgz of recipes/{r.name}",
            "actions": [(stages.build_tgz, [str(ROOT), r.name])],
            "file_dep": stages.recipe_files(r) + [str(STORE.pointer(p, TGZ)) for p in r.parents],
            "targets": [str(STORE.pointer(r.name, TGZ))],
            "uptodate": [inputs_changed(stages.tgz_inputs(r))],
            "clean": True,
        }


def task_store():
    """Show the content-hash store: entries, sizes, which recipe points where"""
    return {"actions": [(stages.show_store, [str(ROOT)])], "uptodate": [False], "verbosity": 2}


def task_store_gc():
    """Remove store entries no recipe points at, and unfinished work dirs"""
    return {"actions": [(stages.store_gc, [str(ROOT)])], "uptodate": [False], "verbosity": 2}
