"""The doit edge: task dicts made from the stage table, and the actions doit runs.

Actions are `(module_level_function, [root, recipe name, …])`: picklable for `doit -n N`. Each
looks the names up once and turns a UserError into doit's TaskFailed (one line and a hint),
the only place that conversion happens for the graph. The modules only actions use (vm, report,
ciplan, reggc, secureboot) are imported inside them, when they run: a no-op `doit` (every task
up to date) does not load them.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from pipeline import publish, stages
from pipeline.cache import human
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.qemu import Mode
from pipeline.recipes import Recipe


def doit_edge(func: Callable[..., Any]) -> Callable[..., Any]:
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


def recipes_or_exit(p: Project) -> dict[str, Recipe]:
    """Recipes for dodo.py: a bad recipe is one line and exit status 2, not a traceback."""
    try:
        return p.recipes
    except UserError as e:
        print(e.render(), file=sys.stderr)
        raise SystemExit(2) from None


# -- actions ------------------------------------------------------------------------------------


@doit_edge
def build_action(root: str, name: str, stage: str) -> None:
    p = Project(Path(root))
    stages.materialize(p, p.recipe(name), stages.STAGE[stage])


@doit_edge
def run_action(root: str, name: str, mode: str, memory: str = "", cpus: int = 0, cmdline: str = "",
               forward: str = "", net: bool = True, persist: str = "", accel: str = "") -> TaskFailed | None:
    """doit passes the task's params (RUN_PARAMS) by these names."""
    from pipeline import vm
    p = Project(Path(root))
    options = vm.RunOptions(memory=memory, cpus=cpus, cmdline=cmdline, forward=forward, net=net, persist=persist,
                            accel=accel)
    r = p.recipe(name)
    status = vm.run_recipe(p, r, Mode(mode), options)
    if status != 0 and vm.runs_app(p, r):
        raise SystemExit(status)  # doit exits with the app's status, like `docker run` (its db is saved)
    return TaskFailed(f"qemu exited with status {status}") if status != 0 else None


@doit_edge
def check_action(root: str, name: str, junit: str = "") -> None:
    """doit passes the task's param (CHECK_PARAMS) by this name: the JUnit file's path (the HTML
    page beside it); default cache/reports/check_boot.xml."""
    from pipeline import report, vm
    p = Project(Path(root))
    paths = report.ReportPaths.beside(Path(junit).resolve()) if junit else report.ReportPaths.default(p.store.root)
    vm.check_boot(p, p.recipe(name), reports=paths)


@doit_edge
def ci_plan_action(root: str, format: str = "github", output: str = "") -> None:  # noqa: A002 (doit's param name)
    """doit passes the task's params (CI_PLAN_PARAMS) by these names."""
    from pipeline import ciplan

    try:
        fmt = ciplan.CiFormat(format)
    except ValueError:
        raise UserError(f"--format {format}: no such CI", hint="--format github or --format gitlab") from None
    text = ciplan.ci_plan(Project(Path(root)).recipes, fmt)
    if output:
        Path(output).write_text(text)
        print(f"wrote {output} (commit it as {fmt.path})", file=sys.stderr)
    else:
        sys.stdout.write(text)


@doit_edge
def store_action(root: str) -> None:
    from pipeline import reggc
    p = Project(Path(root))
    rows = [r.name for r in stages.ROWS if r.shared]
    print(p.store.listing(rows))
    if p.registry is not None:
        print(reggc.footprint_line(p.registry.remote, rows))


@doit_edge
def sb_keys_action(root: str) -> None:
    """The Secure Boot keys, made if missing (per-user folder or LDT_SB_* files): where they are and
    the db certificate's fingerprint, never a private key."""
    from pipeline import secureboot as sb
    print(sb.summary(sb.ensure_keys()))


@doit_edge
def store_gc_action(root: str, max_size: str = "", remote: bool = False, keep_days: int = 30) -> None:
    """doit passes the task's params (GC_PARAMS) by these names."""
    from pipeline import reggc
    from pipeline.packed import parse_size
    p = Project(Path(root))
    if remote:
        if p.registry is None:
            raise UserError("store_gc --remote needs a registry", hint="set LDT_REMOTE=oci://HOST[:PORT]/PREFIX")
        done = reggc.collect(p.registry.remote, [r.name for r in stages.ROWS if r.shared], list(p.recipes), keep_days)
        print("\n".join(reggc.collected_lines(p.registry.remote, done, keep_days)))
        return
    store = p.store
    done = store.collect(stages.ROWS, max_size=parse_size(max_size) if max_size else None)
    packed = set(done.packed)
    for e in done.removed:
        print(f"{'packed' if e in packed else 'removed'} {e}")
    for d in done.budget.dropped:
        print(f"dropped packed {d.row}/{d.key} (packed {time.strftime('%Y-%m-%d %H:%M', time.localtime(d.packed_at))})")
    print(f"{len(done.removed)} removed ({len(done.packed)} of them kept packed"
          + (f", {len(done.kept)} left plain: packing failed" if done.kept else "") + "); "
          f"{len(done.budget.dropped)} packed entries dropped past --max-size, {done.budget.packs_deleted} unused "
          f"packs deleted, {done.budget.packs_compacted} compacted ({human(done.budget.bytes_freed)} freed)")
    _remove_leftover_containers()


def _remove_leftover_containers() -> None:
    """Containers a killed run left behind (kill -9 mid-export); without an engine, nothing to do."""
    from pipeline import docker

    try:
        client = docker.client()
    except UserError:
        return
    for name in docker.remove_leftovers(client):
        print(f"removed leftover container {name}")


@doit_edge
def store_verify_action(root: str) -> None:
    store = Project(Path(root)).store
    count = len(store.entries())
    bad = store.verify_all()
    for entry, problem in bad:
        print(f"{entry.parent.name}/{entry.name}: {problem}; removed")
    print(f"{count} entries rehashed, {len(bad)} damaged and removed (the next run makes them again)")


@doit_edge
def store_push_action(root: str) -> None:
    pushed = Project(Path(root)).store.push_all(stages.ROWS)
    print(f"{pushed} entries pushed")


# -- task dicts ---------------------------------------------------------------------------------


class StageUptodate:
    """doit uptodate object: the task is up to date when, for each of its stages, the recipe's
    pointers lead to the entry whose key the stage's manifest gives now (stages.up_to_date).
    The store is the one record: no second list of inputs for doit to keep in step."""

    def __init__(self, p: Project, r: Recipe, task_stages: tuple[stages.Stage, ...]) -> None:
        self.p, self.r, self.stages = p, r, task_stages

    def __call__(self, task, values) -> bool:
        return all(stages.up_to_date(self.p, self.r, s) for s in self.stages)

    def __repr__(self) -> str:
        return f"StageUptodate({self.r.name}: {', '.join(s.name for s in self.stages)})"


def stage_tasks(p: Project, recipes: dict[str, Recipe], task: str) -> Iterator[dict[str, Any]]:
    """The group entry, then one subtask per recipe that has the task's stages."""
    group = stages.task_stages(task)
    yield {"name": None, "doc": group[0].doc}
    for r in recipes.values():
        own = tuple(s for s in group if s.applies(r))
        if not own:
            continue
        made = {a for s in own for a in s.makes_for(r)}
        needed = {a for s in own for a in s.needs_for(r)} - made
        sources = [f for s in own if s.sources for f in s.sources(p, r)]
        yield {
            "name": r.name,
            "doc": f"{group[0].doc} ({r.name})",
            "actions": [(build_action, [str(p.root), r.name, s.name]) for s in own],
            "file_dep": sorted({*sources, *(str(p.store.pointer(r.name, a)) for a in needed)}),
            "targets": [str(p.store.pointer(r.name, a)) for s in own for a in s.makes_for(r)],
            "uptodate": [StageUptodate(p, r, own)],
            "clean": True,
        }


RUN_PARAMS = [
    {"name": "memory", "long": "memory", "default": "", "help": "guest memory, e.g. 2G (default: recipe.toml)"},
    {"name": "cpus", "long": "cpus", "type": int, "default": 0, "help": "guest CPUs (default: recipe.toml)"},
    {"name": "cmdline", "long": "cmdline", "default": "", "help": "extra kernel command line (run_tgz only)"},
    {"name": "forward", "long": "forward", "default": "", "help": "host port forwards HOST:GUEST[,HOST:GUEST]"},
    {"name": "net", "long": "net", "inverse": "no-net", "type": bool, "default": True,
     "help": "user-mode networking (--no-net: none)"},
    {"name": "persist", "long": "persist", "default": "",
     "help": "keep changes in this disk file (a copy made on first use) instead of a throwaway snapshot"},
    {"name": "accel", "long": "accel", "default": "", "help": "kvm, tcg or auto (default: $LDT_ACCEL or auto)"},
]


def run_tasks(p: Project, recipes: dict[str, Recipe], mode: Mode) -> Iterator[dict[str, Any]]:
    yield {"name": None, "doc": mode.doc}
    for r in recipes.values():
        if not r.bootable:
            continue
        yield {
            "name": r.name,
            "doc": f"boot {r.name} ({mode}) on this terminal",
            "actions": [(run_action, [str(p.root), r.name, str(mode)])],
            "file_dep": [str(p.store.pointer(r.name, a)) for a in mode.needs(initrd=r.initrd)],
            "params": RUN_PARAMS,
            "uptodate": [False],
            "verbosity": 2,
        }


@doit_edge
def publish_action(root: str, name: str, tag: str = "latest") -> None:
    p = Project(Path(root))
    publish.publish(p, p.recipe(name), tag)


PUBLISH_DOC = "Push a recipe's disks, kernel, initrd and tgz to $LDT_REMOTE as one OCI artifact (--tag NAME)"


def publish_tasks(p: Project, recipes: dict[str, Recipe]) -> Iterator[dict[str, Any]]:
    yield {"name": None, "doc": PUBLISH_DOC}
    for r in recipes.values():
        if not r.bootable:
            continue
        files = [a for a in publish.PUBLISHED if stages.wanted(a, r)
                 and (r.qcow2 or a not in (publish.A.BIOS_QCOW2, publish.A.UEFI_QCOW2))]
        yield {
            "name": r.name,
            "doc": f"publish {r.name}'s images",
            "actions": [(publish_action, [str(p.root), r.name])],
            "file_dep": [str(p.store.pointer(r.name, a)) for a in files],
            "params": [{"name": "tag", "long": "tag", "default": "latest",
                        "help": "the moving tag besides the content tag (default: latest)"}],
            "uptodate": [False],
            "verbosity": 2,
        }


CHECK_DOC = ("Boot matrix: each mode headless to the boot marker, then recipe.toml's [check] commands inside; "
             "a table, JUnit XML and HTML in cache/reports/ (--junit PATH); passes cached per image and commands")
CHECK_PARAMS = [
    {"name": "junit", "long": "junit", "default": "",
     "help": "write the JUnit XML here (the HTML page beside it, .html); default cache/reports/check_boot.xml"},
]


def check_tasks(p: Project, recipes: dict[str, Recipe]) -> Iterator[dict[str, Any]]:
    yield {"name": None, "doc": CHECK_DOC}
    for r in recipes.values():
        if not (r.bootable and r.check):
            continue
        needs = dict.fromkeys(a for mode in Mode for a in mode.needs(initrd=r.initrd))
        yield {
            "name": r.name,
            "doc": f"boot {r.name} in every mode to its marker",
            "actions": [(check_action, [str(p.root), r.name])],
            "file_dep": [str(p.store.pointer(r.name, a)) for a in needs],
            "params": CHECK_PARAMS,
            "uptodate": [False],
            "verbosity": 2,
        }


CI_PLAN_DOC = ("Print a CI pipeline (--format github|gitlab; --output FILE): one job per recipe after its FROM "
               "parents' jobs, sharing the store through LDT_REMOTE, then a publish job")
CI_PLAN_PARAMS = [
    {"name": "format", "long": "format", "default": "github", "choices": (("github", ""), ("gitlab", "")),
     "help": "github (.github/workflows/ldt.yml) or gitlab (.gitlab-ci.yml)"},
    {"name": "output", "long": "output", "default": "", "help": "write the YAML to this file instead of stdout"},
]


def ci_plan_task(p: Project) -> dict[str, Any]:
    return {"actions": [(ci_plan_action, [str(p.root)])], "params": CI_PLAN_PARAMS, "uptodate": [False],
            "verbosity": 2}


GC_PARAMS = [
    {"name": "max_size", "long": "max-size", "default": "",
     "help": "drop packed entries, oldest first, while the store (plain entries + packs) is over SIZE "
             "(e.g. 20G); default: keep every packed entry"},
    {"name": "remote", "long": "remote", "type": bool, "default": False,
     "help": "collect the registry ($LDT_REMOTE) instead: entries older than --keep-days that no published "
             "image names, then the packs no entry names (docs/store.md)"},
    {"name": "keep_days", "long": "keep-days", "type": int, "default": 30,
     "help": "with --remote: keep entries the gc first saw less than N days ago"},
]


def _store_task(action: Callable[[str], Any], p: Project) -> dict[str, Any]:
    task = {"actions": [(action, [str(p.root)])], "uptodate": [False], "verbosity": 2}
    if action is store_gc_action:
        task["params"] = GC_PARAMS
    return task


def task_creators(p: Project, recipes: dict[str, Recipe]) -> dict[str, Callable[[], Any]]:
    """Every task_* of dodo.py: the stage tasks from the table, a run task per Mode, check_boot,
    store and store_gc."""

    def creator(make: Callable[[], Any], doc: str) -> Callable[[], Any]:
        def task() -> Any:
            return make()

        task.__doc__ = doc
        return task

    out: dict[str, Callable[[], Any]] = {}
    for task in stages.TASKS:
        out[f"task_{task}"] = creator(functools.partial(stage_tasks, p, recipes, task), stages.task_stages(task)[0].doc)
    for mode in Mode:
        out[f"task_{mode.run_task}"] = creator(functools.partial(run_tasks, p, recipes, mode), mode.doc)
    out["task_check_boot"] = creator(functools.partial(check_tasks, p, recipes), CHECK_DOC)
    out["task_publish"] = creator(functools.partial(publish_tasks, p, recipes), PUBLISH_DOC)
    out["task_ci_plan"] = creator(functools.partial(ci_plan_task, p), CI_PLAN_DOC)
    store_tasks = {
        "store": (store_action, "Show the content-hash store: entries, sizes, which recipe points where (and with "
                                "$LDT_REMOTE: local, remote or both), packed entries, logical and stored bytes"),
        "store_gc": (store_gc_action, "Pack store entries the table says are not live (no recipe points at them "
                                      "or at what they were made from) into blocks a revert restores, remove "
                                      "unfinished work dirs and containers a killed run left; --max-size SIZE "
                                      "drops the oldest packed entries past SIZE"),
        "store_verify": (store_verify_action, "Rehash every store entry against its manifest.json; remove the "
                                              "damaged ones"),
        "sb_keys": (sb_keys_action, "Make the Secure Boot keys (PK, KEK, db) if missing; show where they are and the "
                                    "db certificate's fingerprint (never a private key)"),
        "store_push": (store_push_action, "Push every local store entry $LDT_REMOTE lacks (e.g. after the registry "
                                          "was down)"),
    }
    for name, (action, doc) in store_tasks.items():
        out[f"task_{name}"] = creator(functools.partial(_store_task, action, p), doc)
    return out
