"""build_tgz end to end: the real Docker engine, real doit runs, throwaway projects seeded from the store.

The bootstrap base (debian-bookworm) is a store hit in every throwaway project, so each build here is
a tiny RUN step on top of it plus an export. Images of these projects are tagged ldt/ldtt-fnd-*
and removed at the end of the module.
"""

from __future__ import annotations

import contextlib
import re
import tarfile
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, doit, make_project, require_docker

from pipeline.cache import Store

pytestmark = pytest.mark.integration

PREFIX = "ldtt-fnd-"  # unique to this module: other test modules may build ldtt-* images at the same time
PARENT, CHILD = f"{PREFIX}parent", f"{PREFIX}child"


def client():
    from pipeline import docker

    return docker.client()


@pytest.fixture(scope="module", autouse=True)
def remove_test_images():
    yield
    with contextlib.suppress(Exception):
        c = client()
        from docker.errors import APIError

        for image in c.images.list(filters={"reference": f"ldt/{PREFIX}*"}):
            for t in image.tags:
                if t.startswith(f"ldt/{PREFIX}"):
                    with contextlib.suppress(APIError):
                        c.images.remove(t)


def image_id(ref: str) -> str | None:
    from pipeline import docker

    return docker.image_id(client(), ref)


def read_tgz(path: Path, wanted: tuple[str, ...] = ()) -> tuple[set[str], dict[str, bytes]]:
    """Member names (without ./) and the contents of the wanted regular files."""
    names, contents = set(), {}
    with tarfile.open(path, "r|gz") as tf:
        for ti in tf:
            name = ti.name.removeprefix("./")
            names.add(name)
            if name in wanted and ti.isreg():
                contents[name] = tf.extractfile(ti).read()
    return names, contents


def ran(proc, name: str) -> bool:
    return bool(re.search(rf"^\.\s+build_tgz:{re.escape(name)}$", proc.stdout, re.MULTILINE))


def skipped(proc, name: str) -> bool:
    return bool(re.search(rf"^--\s+build_tgz:{re.escape(name)}$", proc.stdout, re.MULTILINE))


def position(proc, name: str) -> int:
    m = re.search(rf"^\.\s+build_tgz:{re.escape(name)}$", proc.stdout, re.MULTILINE)
    assert m, f"build_tgz:{name} did not run:\n{proc.stdout}"
    return m.start()


def output(proc) -> str:
    return proc.stdout + proc.stderr


def store_state(root: Path) -> list[str]:
    """Every store entry and unfinished work dir of a project."""
    cache = root / "cache"
    entries = sorted(str(p.relative_to(cache)) for p in cache.glob("store/*/*"))
    work = sorted(str(p.relative_to(cache)) for p in cache.glob("tmp/*"))
    return entries + work


def pointer_target(root: Path, name: str) -> str:
    return str((root / "cache" / "recipes" / name / "rootfs.tgz").readlink())


# -- (1) the repository's own hello recipe ----------------------------------------------------------------


def test_hello_tgz_is_a_bootable_tree(hello_tgz):
    names, contents = read_tgz(hello_tgz, ("etc/hostname", "etc/hosts"))
    assert any(re.fullmatch(r"boot/vmlinuz-.+", n) for n in names), "no kernel in /boot"
    assert contents["etc/hostname"] == b"hello\n"
    assert ".dockerenv" not in names
    assert "etc/resolv.conf" not in names
    assert contents["etc/hosts"].strip(), "etc/hosts is empty"


def test_hello_image_is_the_current_entry(built_hello):
    """ldt/hello:latest is the current entry's image; an entry restored from a store seeded elsewhere
    reaches the engine when a FROM or suco needs it (ensure_image), and latest is never stale."""
    from pipeline import builders
    from pipeline.project import Project

    key = Store(built_hello / "cache").current_key("hello", "rootfs.tgz")
    latest = image_id("ldt/hello:latest")
    assert latest is None or latest == image_id(f"ldt/hello:{key}")
    assert builders.ensure_image(Project(built_hello), None, "hello") == f"ldt/hello:{key}"
    assert image_id("ldt/hello:latest") == image_id(f"ldt/hello:{key}") is not None


# -- (2) a chain of recipes in a throwaway project -----------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """debian-bookworm <- ldtt-fnd-parent <- ldtt-fnd-child, built once: (project root, first doit run)."""
    require_docker()
    root = make_project(tmp_path_factory.mktemp("chain"), {
        "debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
        PARENT: {"Dockerfile": "FROM ldt/debian-bookworm\nRUN echo parent > /parent\n"},
        CHILD: {"Dockerfile": f"FROM ldt/{PARENT}\nRUN echo child > /child\n"},
    })
    first = doit(f"build_tgz:{CHILD}", cwd=root)
    return root, first


def test_chain_builds_parents_first(chain):
    root, first = chain
    assert position(first, "debian-bookworm") < position(first, PARENT) < position(first, CHILD)
    names, contents = read_tgz(root / "cache" / "recipes" / CHILD / "rootfs.tgz", ("parent", "child", "etc/hostname"))
    assert contents["parent"] == b"parent\n"
    assert contents["child"] == b"child\n"
    assert contents["etc/hostname"] == f"{CHILD}\n".encode()
    assert image_id(f"ldt/{CHILD}:latest") is not None


def test_bootstrap_base_is_a_store_hit(chain):
    _, first = chain
    assert "debian-bookworm: rootfs.tgz restored from the store" in first.stderr
    assert "bootstrap" not in output(first).lower(), "mmdebstrap ran although the store holds debian-bookworm"
    assert "mmdebstrap" not in output(first)


def test_second_run_is_a_no_op(chain):
    root, _ = chain
    before = store_state(root)
    again = doit(f"build_tgz:{CHILD}", cwd=root)
    for name in ("debian-bookworm", PARENT, CHILD):
        assert skipped(again, name), f"build_tgz:{name} ran again:\n{again.stdout}"
    assert "Step 1/" not in output(again)
    assert store_state(root) == before


def test_edits_rebuild_exactly_what_changed(chain):
    root, _ = chain
    child_df = root / "recipes" / CHILD / "Dockerfile"
    parent_df = root / "recipes" / PARENT / "Dockerfile"
    child_text, parent_text = child_df.read_text(), parent_df.read_text()
    first_child, first_parent = pointer_target(root, CHILD), pointer_target(root, PARENT)

    # the child's Dockerfile changes: only the child builds
    child_df.write_text(child_text + "RUN echo edited > /edited\n")
    proc = doit(f"build_tgz:{CHILD}", cwd=root)
    assert skipped(proc, PARENT) and ran(proc, CHILD), proc.stdout
    assert "Step 1/" in output(proc)
    edited_child = pointer_target(root, CHILD)
    assert edited_child != first_child
    names, _ = read_tgz(root / "cache" / "recipes" / CHILD / "rootfs.tgz")
    assert {"edited", "child", "parent"} <= names

    # the edit is reverted: the child comes back from the store, no docker build
    child_df.write_text(child_text)
    proc = doit(f"build_tgz:{CHILD}", cwd=root)
    assert ran(proc, CHILD) and skipped(proc, PARENT), proc.stdout
    assert f"{CHILD}: rootfs.tgz restored from the store" in proc.stderr
    assert "Step 1/" not in output(proc)
    assert pointer_target(root, CHILD) == first_child
    assert image_id(f"ldt/{CHILD}:latest") == image_id(f"ldt/{CHILD}:{Path(first_child).parent.name}")

    # the parent changes: parent, then child
    parent_df.write_text(parent_text + "RUN echo parent2 > /parent2\n")
    proc = doit(f"build_tgz:{CHILD}", cwd=root)
    assert skipped(proc, "debian-bookworm")
    assert position(proc, PARENT) < position(proc, CHILD)
    assert pointer_target(root, PARENT) != first_parent
    assert pointer_target(root, CHILD) not in (first_child, edited_child)
    names, _ = read_tgz(root / "cache" / "recipes" / CHILD / "rootfs.tgz")
    assert {"parent2", "child"} <= names

    # and reverted: both come back from the store
    parent_df.write_text(parent_text)
    proc = doit(f"build_tgz:{CHILD}", cwd=root)
    assert position(proc, PARENT) < position(proc, CHILD)
    assert f"{PARENT}: rootfs.tgz restored from the store" in proc.stderr
    assert f"{CHILD}: rootfs.tgz restored from the store" in proc.stderr
    assert "Step 1/" not in output(proc)
    assert (pointer_target(root, PARENT), pointer_target(root, CHILD)) == (first_parent, first_child)


# -- (3) error paths: one clear message, non-zero exit, nothing stored -------------------------------------------


def error_project(tmp_path: Path, name: str, dockerfile: str) -> Path:
    require_docker()
    return make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
                                         name: {"Dockerfile": dockerfile}})


def assert_clean_failure(proc, root: Path, before: list[str], name: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in output(proc)
    assert store_state(root) == before, "a failed build left something in the store"
    assert not (root / "cache" / "recipes" / name / "rootfs.tgz").exists()


def test_failing_run_names_the_step(tmp_path):
    name = f"{PREFIX}fail"
    root = error_project(tmp_path, name, "FROM ldt/debian-bookworm\nRUN echo boom && false\n")
    before = store_state(root)
    proc = doit(f"build_tgz:{name}", cwd=root, check=False)
    assert_clean_failure(proc, root, before, name)
    out = output(proc)  # doit reports a failed task on stdout
    assert f"error: recipe '{name}': step `RUN echo boom && false` failed" in out
    assert "returned a non-zero code: 1" in out
    assert f"hint: fix recipes/{name}/Dockerfile" in out


def test_unpullable_base_image_names_the_bootstrap_recipe(tmp_path):
    if image_id("debian:bookworm") is not None:
        pytest.skip("debian:bookworm is a local image here: it would not need a pull")
    name = f"{PREFIX}registry"
    root = error_project(tmp_path, name, "FROM debian:bookworm\nRUN true\n")
    before = store_state(root)
    proc = doit(f"build_tgz:{name}", cwd=root, check=False)
    assert_clean_failure(proc, root, before, name)
    out = output(proc)
    assert f"error: recipe '{name}': base image debian:bookworm is neither local nor pullable" in out
    assert re.search(r"hint: .*FROM ldt/debian-bookworm", out), out


def test_unknown_recipe_in_from_fails_at_list_time(tmp_path):
    name = f"{PREFIX}orphan"
    root = error_project(tmp_path, name, "FROM ldt/nope\nRUN true\n")
    before = store_state(root)
    for args in (["list"], [f"build_tgz:{name}"]):
        proc = doit(*args, cwd=root, check=False)
        assert_clean_failure(proc, root, before, name)
        errors = [ln for ln in output(proc).splitlines() if ln.startswith("error:")]
        assert errors == [f"error: {root / 'recipes' / name / 'Dockerfile'}: FROM ldt/nope names no recipe"]
        hints = [ln for ln in output(proc).splitlines() if "known recipes:" in ln]
        assert len(hints) == 1 and f"known recipes: debian-bookworm, {name}" in hints[0]


def test_unknown_task_is_doits_own_error(tmp_path):
    root = error_project(tmp_path, f"{PREFIX}ok", "FROM ldt/debian-bookworm\n")
    before = store_state(root)
    proc = doit("build_tgz:nope", cwd=root, check=False)
    assert_clean_failure(proc, root, before, "nope")
    assert "build_tgz:nope" in proc.stderr
    assert "ERROR" in proc.stderr
