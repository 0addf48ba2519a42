"""Benchmark of the tgz stage, printed as ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_tgz.py            (needs the Docker engine; builds recipes first)

1. no-op `doit` with 10 recipes, all up to date    target < 0.5 s    baseline: bare `doit` on an empty dodo.py
2. export + filter + compress of ldt/hello           target <= 1.25x  baseline: docker export | gzip -1 > file
3. restore after a revert                           vs a rebuild of the same recipe after an edit
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import BOOTSTRAP_TOML, doit, make_project  # noqa: E402

DOIT = [sys.executable, "-m", "doit"]


def timed(cmd: list[str], cwd: Path, repeat: int = 5) -> float:
    """Median wall time of a command."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name: str, value: float, baseline: float, unit: str = "s", target: str = "") -> None:
    print(f"{name:<46} {value:8.3f}{unit}  baseline {baseline:8.3f}{unit}  ratio {value / baseline:6.2f}x  {target}")


def bench_noop(tmp: Path) -> None:
    recipes = {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}}
    for i in range(9):
        recipes[f"ldtb-r{i}"] = {"Dockerfile": f"FROM ldt/debian-bookworm\nRUN echo {i} > /bench\n"}
    proj = make_project(tmp / "noop", recipes)
    doit(cwd=proj)  # build everything once
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "dodo.py").write_text("def task_nothing():\n    return {'actions': None}\n")
    base = timed(DOIT, empty)
    ours = timed(DOIT, proj)
    row("no-op doit, 10 recipes up to date", ours, base, target="(target < 0.5 s absolute)")


def bench_export(tmp: Path) -> None:
    from pipeline import docker
    from pipeline.tgz import Fixups, write_tgz

    c = docker.client()
    image = "ldt/hello:latest"
    raw = tmp / "raw.tgz"
    cid = subprocess.run(["docker", "create", image, "/bin/true"], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        t = time.perf_counter()
        subprocess.run(f"docker export {cid} | gzip -1 > {raw}", shell=True, check=True)
        base = time.perf_counter() - t
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    t = time.perf_counter()
    with docker.exported(c, image) as chunks:
        write_tgz(chunks, tmp / "ours.tgz", Fixups("hello"), "export hello")
    ours = time.perf_counter() - t
    row("export+compress ldt/hello", ours, base, target="(target <= 1.25x)")
    print(f"{'':<46} sizes: ours {os.path.getsize(tmp / 'ours.tgz') / 2**20:.0f} MiB, "
          f"raw {raw.stat().st_size / 2**20:.0f} MiB")


def bench_restore(tmp: Path) -> None:
    recipes = {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
               "ldtb-restore": {"Dockerfile": "FROM ldt/debian-bookworm\nRUN echo one > /v\n"}}
    proj = make_project(tmp / "restore", recipes)
    dockerfile = proj / "recipes" / "ldtb-restore" / "Dockerfile"
    doit("build_tgz:ldtb-restore", cwd=proj)
    original = dockerfile.read_text()
    dockerfile.write_text(original.replace("one", "two"))
    t = time.perf_counter()
    doit("build_tgz:ldtb-restore", cwd=proj)
    build = time.perf_counter() - t
    dockerfile.write_text(original)
    t = time.perf_counter()
    out = doit("build_tgz:ldtb-restore", cwd=proj)
    restore = time.perf_counter() - t
    assert "restored from the store" in out.stderr + out.stdout
    row("restore after revert (vs rebuild after edit)", restore, build)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ldt-bench-"))
    try:
        doit("build_tgz:hello")  # the repository's own recipes, as baselines' inputs
        bench_noop(tmp)
        bench_export(tmp)
        bench_restore(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run("docker images --format '{{.Repository}}:{{.Tag}}' | grep '^ldt/ldtb-' | xargs -r docker rmi",
                       shell=True, capture_output=True)


if __name__ == "__main__":
    main()
