"""ci_plan: the real recipes of a throwaway project as a GitHub Actions or GitLab CI pipeline:
one job per recipe after its parents' jobs, every recipe once, a publish job last, valid YAML."""

from __future__ import annotations

import pytest
from conftest import BOOTSTRAP_TOML, make_project

from pipeline.ciplan import DOIT, PUBLISH_JOB, CiFormat, ci_plan, job_id, plan, recipe_tasks
from pipeline.recipes import discover

yaml = pytest.importorskip("yaml", reason="pyyaml is a test dependency: pip install -e .[test]")

RECIPES = {
    "debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
    "hello": {"Dockerfile": "FROM ldt/debian-bookworm\nRUN true\n"},
    "hello.child": {"Dockerfile": "FROM ldt/hello\n"},
    "multi": {"Dockerfile": "FROM ldt/hello AS a\nFROM ldt/debian-bookworm\nCOPY --from=a /x /x\n"},
    "virtlike": {"Dockerfile": "FROM ldt/debian-bookworm\n", "recipe.toml": "[boot]\ncheck = false\n"},
    "app": {"Dockerfile": "FROM busybox\nCMD [\"true\"]\n", "recipe.toml": '[boot]\nkernel_from = "hello"\n'},
}


@pytest.fixture
def recipes(tmp_path):
    return discover(make_project(tmp_path / "p", RECIPES, seed_store=False) / "recipes")


def test_plan_shape(recipes):
    jobs = plan(recipes)
    ids = [j.id for j in jobs]
    assert sorted(j.recipe for j in jobs if j.recipe) == sorted(RECIPES)  # every recipe once
    assert len(ids) == len(set(ids)) == len(RECIPES) + 1 and ids[-1] == PUBLISH_JOB
    position = {i: n for n, i in enumerate(ids)}
    by_id = {j.id: j for j in jobs}
    for j in jobs:
        assert all(position[n] < position[j.id] for n in j.needs), j  # parents before children
        assert j.depth == 1 + max((by_id[n].depth for n in j.needs), default=-1)
    assert by_id[job_id("hello.child")].needs == (job_id("hello"),)
    assert set(by_id[job_id("multi")].needs) == {job_id("hello"), job_id("debian-bookworm")}
    assert by_id[job_id("app")].needs == (job_id("hello"),)  # kernel_from is a need too
    assert by_id[job_id("debian-bookworm")].needs == ()
    assert set(by_id[PUBLISH_JOB].needs) == set(ids[:-1])
    assert job_id("hello.child") == "recipe-hello_child"


def test_job_commands(recipes):
    base = recipes["debian-bookworm"]
    assert recipe_tasks(base) == ("build_tgz:debian-bookworm",)  # not bootable: no disks, no check
    hello = recipe_tasks(recipes["hello"])
    assert hello[0] == "build_tgz:hello" and hello[-1] == "check_boot:hello"
    assert {"build_syslinux_bios:hello", "build_efistub:hello"} <= set(hello)
    assert "check_boot:virtlike" not in recipe_tasks(recipes["virtlike"])
    by_id = {j.id: j for j in plan(recipes)}
    assert by_id[job_id("hello")].commands == (f"{DOIT} {' '.join(hello)}",) and by_id[job_id("hello")].reports
    assert not by_id[job_id("virtlike")].reports
    publish = by_id[PUBLISH_JOB].commands
    assert f'{DOIT} publish:hello --tag "$LDT_TAG"' in publish
    assert not any("publish:debian-bookworm" in c for c in publish)


def test_github_yaml_parses_back(recipes):
    text = ci_plan(recipes, "github")
    doc = yaml.safe_load(text)
    jobs = doc["jobs"]
    assert list(jobs) == [j.id for j in plan(recipes)]
    hello = jobs[job_id("hello")]
    assert hello["needs"] == [job_id("debian-bookworm")] and hello["name"] == "hello"
    runs = [s["run"] for s in hello["steps"] if "run" in s]
    assert runs[0] == "./setup.sh" and runs[1].startswith(f"{DOIT} build_tgz:hello ")
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in hello["steps"])
    assert doc["env"]["LDT_REMOTE"] == "${{ vars.LDT_REMOTE }}"
    assert "pull_request" in doc["env"]["LDT_REMOTE_PUSH"]
    assert jobs[PUBLISH_JOB]["if"] == "github.event_name == 'push'"
    assert "needs" not in jobs[job_id("debian-bookworm")]
    assert doc[True] == {"push": None, "pull_request": None}  # `on:` (YAML 1.1 reads the key as true)


def test_gitlab_yaml_parses_back(recipes):
    doc = yaml.safe_load(ci_plan(recipes, CiFormat.GITLAB))
    stages = doc["stages"]
    ids = [j.id for j in plan(recipes)]
    assert [k for k in doc if k.startswith("recipe-") or k == PUBLISH_JOB] == ids
    for j in plan(recipes):
        job = doc[j.id]
        assert job["needs"] == list(j.needs)
        for n in j.needs:  # a need sits in an earlier stage (older GitLab runs stages in order)
            assert stages.index(doc[n]["stage"]) < stages.index(job["stage"])
        assert job["script"] == list(j.commands)
    assert doc["default"]["before_script"] == ["./setup.sh"]
    assert doc[job_id("hello")]["artifacts"]["reports"]["junit"] == "cache/reports/check_boot.xml"
    assert doc[PUBLISH_JOB]["stage"] == "publish" == stages[-1]


def test_formats():
    assert CiFormat("gitlab").path == ".gitlab-ci.yml" and CiFormat.GITHUB.path == ".github/workflows/ldt.yml"
    with pytest.raises(ValueError):
        CiFormat("jenkins")
    assert "publish" not in ci_plan({}, "github").split("jobs:")[1]


def test_a_kernel_from_loop_is_one_error(tmp_path):
    from pipeline.errors import UserError

    loop = {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
            "a": {"Dockerfile": "FROM ldt/debian-bookworm\n", "recipe.toml": '[boot]\nkernel_from = "b"\n'},
            "b": {"Dockerfile": "FROM ldt/a\n"}}
    recipes = discover(make_project(tmp_path / "p", loop, seed_store=False) / "recipes")
    with pytest.raises(UserError, match="a -> b -> a"):
        plan(recipes)
