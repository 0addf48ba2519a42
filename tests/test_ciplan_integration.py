"""The CI plan run for real: its jobs one by one, in plan order, each in a fresh project with an
empty cache (a new CI runner), all sharing one registry through LDT_REMOTE. Each recipe is built
exactly once, in its own job; every other job pulls it. The Debian base is in the registry before
(pushed by a runner whose store already holds it, as a fleet's first run leaves it)."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import BOOTSTRAP_TOML, doit, make_project, require_docker
from registry import serve

from pipeline.ciplan import DOIT, plan
from pipeline.recipes import discover

pytestmark = pytest.mark.integration

NOT_BOOTABLE = "[boot]\nbootable = false\n"  # tgz stages only: the fleet's shape, not its boots
RECIPES = {
    "debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
    "ci-a": {"Dockerfile": "FROM ldt/debian-bookworm\nRUN echo a > /a\n", "recipe.toml": NOT_BOOTABLE},
    "ci-b": {"Dockerfile": "FROM ldt/ci-a\nRUN echo b > /b\n", "recipe.toml": NOT_BOOTABLE},
    "ci-c": {"Dockerfile": "FROM ldt/ci-a AS a\nFROM ldt/ci-b\nCOPY --from=a /a /c\n", "recipe.toml": NOT_BOOTABLE},
}
BUILT = re.compile(r"^ldt: (\S+): docker build ", re.M)
BOOTSTRAPPED = re.compile(r"^ldt: bootstrap ", re.M)


@pytest.fixture
def no_images_left():
    """The engine is shared: the ldt/ci-* images these runners made go when the test ends."""
    yield
    from pipeline import docker

    client = docker.client()
    for image in client.images.list(filters={"reference": "ldt/ci-*"}):
        for tag in image.tags:
            client.images.remove(tag, noprune=False)


def test_plan_jobs_one_by_one_build_each_recipe_once(tmp_path, no_images_left):
    require_docker()
    with serve(tmp_path / "registry") as reg:
        env = {"LDT_REMOTE": reg.url, "LDT_REMOTE_PUSH": "1"}
        warm = make_project(tmp_path / "warm", {"debian-bookworm": RECIPES["debian-bookworm"]})
        doit("build_tgz:debian-bookworm", cwd=warm, env=env)

        jobs = plan(discover(make_project(tmp_path / "plan", RECIPES, seed_store=False) / "recipes"))
        assert [j.recipe for j in jobs] == ["debian-bookworm", "ci-a", "ci-b", "ci-c"]  # nothing to publish
        built: dict[str, list[str]] = {}
        for job in jobs:
            runner = make_project(tmp_path / job.id, RECIPES, seed_store=False)  # a new runner: empty cache
            assert not (runner / "cache").exists()
            text = ""
            for command in job.commands:
                argv = shlex.split(command)
                assert argv[0] == DOIT
                out = doit(*argv[1:], cwd=runner, env=env)
                text += out.stdout + out.stderr
            assert not BOOTSTRAPPED.search(text), text[-3000:]
            for name in BUILT.findall(text):
                built.setdefault(name, []).append(job.recipe)
            if job.recipe != "debian-bookworm":
                assert re.search(r"^ldt: tgz:\w+ pulled from ", text, re.M), text[-3000:]  # parents: from the registry
        assert built == {"ci-a": ["ci-a"], "ci-b": ["ci-b"], "ci-c": ["ci-c"]}, built
