"""The build graph: turns recipes/ into doit tasks. All logic lives in pipeline/.

`doit list` shows every task. One per stage of pipeline/stages.py's table (build_tgz,
build_app, extract_boot, build_rootfs, build_syslinux_bios, build_efistub, fast_boot), a run
task per boot mode (run_tgz, run_bios, run_uefi), check_boot, publish, and the store's own
(store, store_gc, store_push, store_verify): pipeline/graph.py makes them all.
"""

from pathlib import Path

from pipeline import graph
from pipeline.cache import XXHashChecker
from pipeline.entrypoint import exit_cleanly_on_sigterm
from pipeline.project import Project
from pipeline.recipes import DEFAULT_RECIPE

ROOT = Path(__file__).resolve().parent
exit_cleanly_on_sigterm()  # a killed doit (CI timeout) still stops the VMs and builds it started
P = Project(ROOT)
RECIPES = graph.recipes_or_exit(P)
P.store.root.mkdir(exist_ok=True)  # doit keeps its state file in cache/

DOIT_CONFIG = {
    # the main job: every recipe's tgz, then the boot matrix of the default recipe
    "default_tasks": ["build_tgz"] + ([f"check_boot:{DEFAULT_RECIPE}"] if DEFAULT_RECIPE in RECIPES else []),
    "check_file_uptodate": XXHashChecker,
    "dep_file": str(ROOT / "cache" / "doit.db"),
    "backend": "json",
    "verbosity": 2,
    "action_string_formatting": "new",
}

globals().update(graph.task_creators(P, RECIPES))
