"""A revert through real doit: build_tgz of a tiny recipe, an edit, store_gc packs the first
revision, the revert restores it from packed blocks (no docker build), byte for byte."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, doit, make_project, require_docker

from pipeline.cache import Store
from pipeline.entries import MANIFEST, file_record

pytestmark = pytest.mark.integration

NAME = "ldtt-pk-rev"  # unique to this module


@pytest.fixture(scope="module", autouse=True)
def remove_test_images():
    yield
    with contextlib.suppress(Exception):
        from docker.errors import APIError

        from pipeline import docker

        c = docker.client()
        for image in c.images.list(filters={"reference": f"ldt/{NAME}*"}):
            for t in image.tags:
                with contextlib.suppress(APIError):
                    c.images.remove(t)


def dockerfile(line: str) -> str:
    return f"FROM ldt/debian-bookworm\nRUN echo {line} > /rev\n"


def sha256(path: Path) -> str:
    return file_record(path)["sha256"]


def test_a_revert_restores_the_packed_tgz_without_a_build(tmp_path):
    require_docker()
    root = make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
                                         NAME: {"Dockerfile": dockerfile("one")}})
    recipe = root / "recipes" / NAME / "Dockerfile"
    store = Store(root / "cache")
    doit(f"build_tgz:{NAME}", cwd=root)
    for e in set(store.entries()) - set(store.pointers().values()):
        store.evict(e)  # the seeded entries this project does not use: nothing to pack but ours
    first = store.current(NAME, "rootfs.tgz")
    records = json.loads((first / MANIFEST).read_text())["files"]

    recipe.write_text(dockerfile("two"))
    doit(f"build_tgz:{NAME}", cwd=root)
    second = store.current(NAME, "rootfs.tgz")
    assert second != first

    gc = doit("store_gc", cwd=root).stdout
    assert f"packed {first}" in gc and "1 removed (1 of them kept packed)" in gc, gc
    assert not first.exists() and store.packed.has("tgz", first.name)
    listing = doit("store", cwd=root).stdout
    summary = next(ln for ln in listing.splitlines() if ln.startswith("logical "))
    assert "1 packed entries" in summary and "ratio" in summary, listing
    fp = store.footprint()
    tgz = records["rootfs.tgz"]["size"]
    # packs share nothing with plain entries: the packed revision costs its tar's blocks, zstd'd,
    # about what its tgz takes (not twice)
    assert fp.packs < tgz * 1.5, (fp, tgz)
    assert fp.logical > fp.plain + tgz - (1 << 20) and fp.ratio > 1, fp  # logical: apparent sizes

    recipe.write_text(dockerfile("one"))  # the revert
    proc = doit(f"build_tgz:{NAME}", cwd=root)
    out = proc.stdout + proc.stderr
    assert "restored from packed blocks" in out and "docker build" not in out, out
    again = store.current(NAME, "rootfs.tgz")
    assert again == first
    for name, rec in records.items():
        assert sha256(again / name) == rec["sha256"] and (again / name).stat().st_size == rec["size"]
    assert not store.packed.has("tgz", first.name)
