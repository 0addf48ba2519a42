"""A Containerfile is a Dockerfile by another name: discovery, parents, keys and the build use it."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from test_docker_unit import OK_LOG, FakeAPI, FakeClient, stream

from pipeline import docker, recipes
from pipeline.builders import external_bases
from pipeline.errors import UserError

RECIPES = Path("/project/recipes")


def add(root: Path, name: str, **files: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for fname, text in files.items():
        (d / ("recipe.toml" if fname == "toml" else fname)).write_text(text)
    return d


def test_a_containerfile_recipe_loads_with_its_parents(tmp_path):
    add(tmp_path, "base", toml='[bootstrap]\nsuite = "bookworm"\n')
    d = add(tmp_path, "app", Containerfile="ARG BASE=ldt/base\nFROM $BASE\nFROM debian:bookworm AS extra\n")
    r = recipes.load(d)
    assert r.build_file == "Containerfile"
    assert r.dockerfile == d / "Containerfile"
    assert r.parents == ("base",)
    assert external_bases(r) == ["debian:bookworm"]
    assert set(recipes.discover(tmp_path)) == {"base", "app"}


def test_a_dockerfile_recipe_is_unchanged(tmp_path):
    d = add(tmp_path, "app", Dockerfile="FROM scratch\n")
    r = recipes.load(d)
    assert r.build_file == "Dockerfile" and r.dockerfile == d / "Dockerfile"


def test_both_build_files_is_one_error_naming_both(tmp_path):
    d = add(tmp_path, "app", Dockerfile="FROM scratch\n", Containerfile="FROM scratch\n")
    with pytest.raises(UserError) as info:
        recipes.load(d)
    assert "Dockerfile" in info.value.message and "Containerfile" in info.value.message
    assert "\n" not in info.value.message and info.value.hint


def test_a_containerfile_and_a_bootstrap_table_is_an_error_naming_the_containerfile(tmp_path):
    d = add(tmp_path, "base", Containerfile="FROM scratch\n", toml='[bootstrap]\nsuite = "bookworm"\n')
    with pytest.raises(UserError) as info:
        recipes.load(d)
    assert "Containerfile" in info.value.message and "[bootstrap]" in info.value.message


def test_unknown_parent_of_a_containerfile_names_the_containerfile(tmp_path):
    add(tmp_path, "app", Containerfile="FROM ldt/nope\n")
    with pytest.raises(UserError) as info:
        recipes.discover(tmp_path)
    assert info.value.message.startswith(f"{tmp_path / 'app' / 'Containerfile'}: FROM ldt/nope")


def test_context_files_keep_the_containerfile_even_when_dockerignored(tmp_path):
    d = add(tmp_path, "app", Containerfile="FROM scratch\n", **{".dockerignore": "Containerfile\n*.log\n",
                                                                 "a.log": "", "data.txt": ""})
    assert docker.build_file_name(d) == "Containerfile"
    assert docker.context_files(d) == [".dockerignore", "Containerfile", "data.txt"]


def test_build_sends_the_containerfile_and_names_it(tmp_path):
    d = add(tmp_path, "app", Containerfile="FROM ldt/debian-bookworm\n", toml="[vm]\ncpus = 1\n", **{"x.txt": "x"})
    c = FakeClient(FakeAPI(stream(*OK_LOG) + [{"aux": {"ID": "sha256:5f"}}]))
    image = docker.build(c, d, "ldt/app:k", buildargs={}, platform="linux/amd64", recipe="app",
                         known_recipes=[], echo=lambda line: None)
    assert image == "sha256:5f"
    assert c.api.build_kwargs["dockerfile"] == "Containerfile"
    assert c.api.context_members == ["Containerfile", "x.txt"]


def test_build_of_a_dockerfile_names_the_dockerfile(tmp_path):
    d = add(tmp_path, "app", Dockerfile="FROM ldt/debian-bookworm\n")
    c = FakeClient(FakeAPI(stream(*OK_LOG) + [{"aux": {"ID": "sha256:5f"}}]))
    docker.build(c, d, "ldt/app:k", buildargs={}, platform="linux/amd64", recipe="app", known_recipes=[],
                 echo=lambda line: None)
    assert c.api.build_kwargs["dockerfile"] == "Dockerfile"


def test_the_uploaded_context_is_a_valid_tar_with_the_containerfile(tmp_path):
    """docker-py's tar() with dockerfile=(name, None) uploads the folder as is (no generated files)."""
    from docker.utils.build import tar

    d = add(tmp_path, "app", Containerfile="FROM scratch\n", **{".dockerignore": "Containerfile\n"})
    with tar(str(d), exclude=docker.ignore_patterns(d), dockerfile=("Containerfile", None)) as f, \
            tarfile.open(fileobj=f) as t:
        assert sorted(t.getnames()) == [".dockerignore", "Containerfile"]


def test_build_tgz_command_takes_a_containerfile_folder(tmp_path, monkeypatch, capsys):
    from pipeline import cli, stages

    calls = []
    monkeypatch.setenv("LDT_ROOT", str(tmp_path / "project"))
    monkeypatch.setattr(stages, "materialize", lambda p, r, stage: calls.append((stage, r)))
    d = add(tmp_path, "app", Containerfile="FROM scratch\n")
    assert cli.build_tgz_main([str(d)]) == 0
    (stage, r), = calls
    assert stage is stages.STAGE["tgz"] and r.build_file == "Containerfile"
    assert capsys.readouterr().out.startswith("rootfs tgz: ")


def test_build_tgz_command_refuses_a_folder_with_both(tmp_path):
    from pipeline import cli

    d = add(tmp_path, "app", Containerfile="FROM scratch\n", Dockerfile="FROM scratch\n")
    with pytest.raises(UserError, match="both a Dockerfile and a Containerfile"):
        cli.build_tgz_main([str(d)])
    with pytest.raises(UserError, match="no Dockerfile"):
        cli.build_tgz_main([str(tmp_path)])
