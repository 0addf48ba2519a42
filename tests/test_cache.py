"""Content keys, the content-hash store, and the doit checkers of pipeline/cache.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import cache, docker, entries, stages
from pipeline.artifacts import Artifact
from pipeline.cache import MANIFEST, Store, XXHashChecker, key_of, tree_manifest
from pipeline.errors import UserError
from pipeline.project import Project, store_from_env

# -- key_of ---------------------------------------------------------------------------------------------


def test_key_of_ignores_dict_insertion_order():
    a = {"stage": "tgz", "version": 1, "build_args": {"A": "1", "B": "2"}, "parents": {"x": "k1", "y": "k2"}}
    b = {"parents": {"y": "k2", "x": "k1"}, "build_args": {"B": "2", "A": "1"}, "version": 1, "stage": "tgz"}
    assert key_of(a) == key_of(b)
    assert len(key_of(a)) == 32  # xxh3-128, hex


@pytest.mark.parametrize("change", [
    lambda m: m.update(version=2),
    lambda m: m["build_args"].update(A="2"),
    lambda m: m["build_args"].update(C=""),
    lambda m: m["parents"].update(x="k3"),
    lambda m: m.update(hostname="other"),
    lambda m: m["context"].append({"path": "b", "mode": "0o100644", "xxh3": "0"}),
])
def test_key_of_changes_with_any_input(change):
    def manifest():
        return {"stage": "tgz", "version": 1, "hostname": "h", "build_args": {"A": "1"}, "parents": {"x": "k1"},
                "context": [{"path": "a", "mode": "0o100644", "xxh3": "f"}]}
    m = manifest()
    change(m)
    assert key_of(m) != key_of(manifest())


# -- tree_manifest (pyfakefs) ----------------------------------------------------------------------------

@pytest.fixture
def ctx(fs):
    ctx = Path("/ctx")
    fs.create_file(ctx / "Dockerfile", contents="FROM ldt/base\nCOPY files /files\n")
    fs.create_file(ctx / "files" / "run.sh", contents="#!/bin/sh\necho hi\n", st_mode=0o100644)
    fs.create_file(ctx / "files" / "data.txt", contents="data\n")
    os.symlink("files/run.sh", ctx / "link")
    return ctx


def paths(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def manifest_of(root: Path):
    return tree_manifest(root, paths(root))


def test_tree_manifest_records_path_mode_hash_and_link_target(ctx):
    m = manifest_of(ctx)
    assert [e["path"] for e in m] == ["Dockerfile", "files/data.txt", "files/run.sh", "link"]
    by_path = {e["path"]: e for e in m}
    assert by_path["link"] == {"path": "link", "mode": oct(os.lstat(ctx / "link").st_mode), "target": "files/run.sh"}
    assert by_path["files/run.sh"]["xxh3"] == cache.hash_file(ctx / "files" / "run.sh")
    assert by_path["files/run.sh"]["mode"] == "0o100644"


def test_tree_manifest_is_sorted_whatever_the_order_given(ctx):
    assert tree_manifest(ctx, reversed(paths(ctx))) == manifest_of(ctx)


def _rename(root):
    os.rename(root / "files" / "data.txt", root / "files" / "data2.txt")


def _chmod_x(root):
    os.chmod(root / "files" / "run.sh", 0o755)


def _retarget(root):
    os.unlink(root / "link")
    os.symlink("files/data.txt", root / "link")


def _edit_same_size(root):
    (root / "files" / "data.txt").write_text("DATA\n")


def _new_file(root):
    (root / "files" / "new").write_text("")


@pytest.mark.parametrize("change", [_rename, _chmod_x, _retarget, _edit_same_size, _new_file])
def test_tree_manifest_key_changes_with_every_input(ctx, change):
    before = key_of({"context": manifest_of(ctx)})
    change(ctx)
    assert key_of({"context": manifest_of(ctx)}) != before


def test_tree_manifest_key_ignores_mtime_and_rewrites_of_the_same_bytes(ctx):
    before = key_of({"context": manifest_of(ctx)})
    for p in paths(ctx):
        os.utime(ctx / p, (1, 1), follow_symlinks=False)
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text())  # "touch" by rewriting
    assert key_of({"context": manifest_of(ctx)}) == before


# -- stages.tgz_manifest: the real key of build_tgz (real disk: the Docker SDK walks the context) ------------


class FakeImages:
    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids

    def get(self, ref):
        from docker.errors import ImageNotFound

        if ref not in self.ids:
            raise ImageNotFound(ref)
        return SimpleNamespace(id=self.ids[ref])


def tgz_project(root: Path) -> Path:
    (root / "recipes" / "base").mkdir(parents=True)
    (root / "recipes" / "base" / "recipe.toml").write_text('[bootstrap]\nsuite = "bookworm"\n')
    app = root / "recipes" / "app"
    (app / "files").mkdir(parents=True)
    (app / "Dockerfile").write_text("ARG V\nFROM ldt/base\nFROM debian:bookworm AS other\nCOPY files /files\n")
    (app / "files" / "run.sh").write_text("echo hi\n")
    (app / "files" / "data.txt").write_text("data\n")
    os.symlink("files/run.sh", app / "link")
    (app / ".dockerignore").write_text("# not sent to the engine\nrecipe.toml\nignored.txt\n")
    (app / "ignored.txt").write_text("x\n")
    (app / "recipe.toml").write_text('[build]\nargs = { V = "1" }\n\n[vm]\nmemory = "1G"\n')
    store = Store(root / "cache")
    for k in ("parentkey1", "parentkey2"):
        with store.build("tgz", k, {"k": k}) as w:
            (w / Artifact.TGZ).write_bytes(k.encode())
    store.point("base", Artifact.TGZ, store.entry("tgz", "parentkey1") / Artifact.TGZ)
    return root


def tgz_manifest(root: Path, name: str = "app") -> dict:
    p = Project(root)
    return stages.manifest(p, p.recipe(name), stages.STAGE["tgz"])


def tgz_key(root: Path, client) -> str:
    return key_of(tgz_manifest(root))


@pytest.fixture
def project(tmp_path):
    return tgz_project(tmp_path / "project")


@pytest.fixture
def client(monkeypatch):
    fake = SimpleNamespace(images=FakeImages({"debian:bookworm": "sha256:base1"}))
    monkeypatch.setattr(docker, "client", lambda: fake)  # the engine's image ids, without an engine
    return fake


def test_tgz_manifest_contents(project, client):
    m = tgz_manifest(project)
    assert m["stage"] == "tgz" and m["version"] == stages.STAGE["tgz"].version and m["hostname"] == "app"
    assert [e["path"] for e in m["context"]] == [".dockerignore", "Dockerfile", "files/data.txt", "files/run.sh",
                                                 "link"]
    assert m["settings"]["build_args"] == {"V": "1"}
    assert m["parents"] == {"base": "parentkey1"}
    assert m["bases"] == {"debian:bookworm": "sha256:base1"}
    assert tgz_manifest(project, "base")["settings"]["bootstrap"]["suite"] == "bookworm"


def _app(root: Path) -> Path:
    return root / "recipes" / "app"


KEY_CHANGES = {
    "dockerfile bytes": lambda root, c: (_app(root) / "Dockerfile").write_text(
        (_app(root) / "Dockerfile").read_text() + "RUN true\n"),
    "file bytes": lambda root, c: (_app(root) / "files" / "data.txt").write_text("DATA\n"),
    "rename": lambda root, c: os.rename(_app(root) / "files" / "data.txt", _app(root) / "files" / "data1.txt"),
    "chmod +x": lambda root, c: os.chmod(_app(root) / "files" / "run.sh", 0o755),
    "symlink target": lambda root, c: (os.unlink(_app(root) / "link"),
                                       os.symlink("files/data.txt", _app(root) / "link")),
    "new file": lambda root, c: (_app(root) / "files" / "more").write_text(""),
    "build arg": lambda root, c: (_app(root) / "recipe.toml").write_text('[build]\nargs = { V = "2" }\n'),
    "parent key": lambda root, c: Store(root / "cache").point(
        "base", Artifact.TGZ, Store(root / "cache").entry("tgz", "parentkey2") / Artifact.TGZ),
    "base image id": lambda root, c: c.images.ids.update({"debian:bookworm": "sha256:base2"}),
}


@pytest.mark.parametrize("change", KEY_CHANGES.values(), ids=KEY_CHANGES.keys())
def test_tgz_key_changes_with_every_input(project, client, change):
    before = tgz_key(project, client)
    change(project, client)
    assert tgz_key(project, client) != before


def test_tgz_key_changes_with_stage_version(project, client, monkeypatch):
    before = tgz_key(project, client)
    tgz = stages.STAGE["tgz"]
    monkeypatch.setitem(stages.STAGE, "tgz", dataclasses.replace(tgz, version=tgz.version + 1))
    assert tgz_key(project, client) != before


KEY_KEEPS = {
    "touch every file": lambda root: [os.utime(p, (1, 1), follow_symlinks=False) for p in _app(root).rglob("*")],
    "rewrite same bytes": lambda root: (_app(root) / "Dockerfile").write_bytes(
        (_app(root) / "Dockerfile").read_bytes()),
    "dockerignored file": lambda root: (_app(root) / "ignored.txt").write_text("changed\n"),
    "settings of later stages": lambda root: (_app(root) / "recipe.toml").write_text(
        '[build]\nargs = { V = "1" }\n\n[vm]\nmemory = "4G"\ncpus = 8\n'),
}


@pytest.mark.parametrize("change", KEY_KEEPS.values(), ids=KEY_KEEPS.keys())
def test_tgz_key_ignores_everything_else(project, client, change):
    before = tgz_key(project, client)
    change(project)
    assert tgz_key(project, client) == before


def test_tgz_key_does_not_depend_on_where_the_project_lives(project, client, tmp_path):
    moved = tmp_path / "elsewhere" / "p"
    shutil.copytree(project, moved, symlinks=True)
    assert tgz_key(moved, client) == tgz_key(project, client)


# -- Store (pyfakefs) ------------------------------------------------------------------------------------

@pytest.fixture
def store(fs, monkeypatch):
    # pyfakefs's lseek knows no SEEK_DATA: every byte of its files is data
    monkeypatch.setattr(entries, "data_extents", lambda fd, size: iter([(0, size)]))
    return Store(Path("/cache"))  # made under pyfakefs: a module-level Path would be the real class


def build(store: Store, key: str, data: bytes = b"tgz", manifest: dict | None = None) -> Path:
    with store.build("tgz", key, manifest or {"key": key}) as work:
        (work / "rootfs.tgz").write_bytes(data)
    return store.entry("tgz", key)


def work_dirs(store: Store) -> list[Path]:
    return list(store.tmp.iterdir()) if store.tmp.is_dir() else []


def test_successful_build_stores_artifact_and_sorted_manifest(store):
    manifest = {"z": 1, "a": {"y": 2, "b": [3]}, "m": "x"}
    with store.build("tgz", "k1", manifest) as work:
        assert work.is_dir() and not list(work.iterdir())
        assert store.lookup("tgz", "k1") is None  # not visible before the block ends
        (work / "rootfs.tgz").write_bytes(b"data")
        assert not (work / MANIFEST).exists()  # the manifest comes last
    entry = store.lookup("tgz", "k1")
    assert entry == store.root / "store" / "tgz" / "k1"
    assert (entry / "rootfs.tgz").read_bytes() == b"data"
    text = (entry / MANIFEST).read_text()
    files = {"rootfs.tgz": {"size": 4, "sha256": hashlib.sha256(b"data").hexdigest()}}
    assert json.loads(text) == {**manifest, "files": files}
    assert text == json.dumps({**manifest, "files": files}, sort_keys=True, indent=1) + "\n"
    assert text.index('"a"') < text.index('"m"') < text.index('"z"') and text.index('"b"') < text.index('"y"')
    assert work_dirs(store) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), UserError("bad")])
def test_exception_inside_build_stores_nothing(store, exc):
    with pytest.raises(type(exc)):
        with store.build("tgz", "k1", {"k": 1}) as work:
            (work / "rootfs.tgz").write_bytes(b"half")
            raise exc
    assert store.lookup("tgz", "k1") is None
    assert not store.entry("tgz", "k1").exists()
    assert work_dirs(store) == []


def test_a_killed_build_is_never_taken_for_an_artifact(store):
    # What kill -9 leaves behind: a full work dir (manifest included) that was never renamed.
    left = store.tmp / f"tgz-k1-{12345}-{67890}"
    (left / "rootfs.tgz").parent.mkdir(parents=True)
    (left / "rootfs.tgz").write_bytes(b"half")
    (left / MANIFEST).write_text("{}\n")
    # ... and an entry folder without a manifest (e.g. a copy interrupted by hand)
    store.entry("tgz", "k2").mkdir(parents=True)
    (store.entry("tgz", "k2") / "rootfs.tgz").write_bytes(b"half")
    assert store.lookup("tgz", "k1") is None
    assert store.lookup("tgz", "k2") is None
    # the next build of k1 is a normal one, and the leftover is not mistaken for it
    build(store, "k1", b"full")
    assert (store.lookup("tgz", "k1") / "rootfs.tgz").read_bytes() == b"full"


def test_rename_failure_stores_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path / "cache")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.os, "rename", crash)
    with pytest.raises(UserError) as info:  # one line naming the stage and the folder, no traceback
        build(store, "k1")
    assert info.value.message.startswith(f"tgz: no space left on the disk holding {store.root}")
    monkeypatch.undo()
    assert store.lookup("tgz", "k1") is None
    assert not store.entry("tgz", "k1").exists()
    assert work_dirs(store) == []


def test_concurrent_build_of_the_same_key_keeps_the_first(store):
    with store.build("tgz", "k1", {"k": 1}) as work:
        (work / "rootfs.tgz").write_bytes(b"second")
        build(store, "k1", b"first")  # another process finishes first
    assert (store.lookup("tgz", "k1") / "rootfs.tgz").read_bytes() == b"first"
    assert work_dirs(store) == []


def test_point_is_a_relative_symlink_and_current_follows_it(store):
    e1, e2 = build(store, "k1", b"one"), build(store, "k2", b"two")
    link = store.point("hello", "rootfs.tgz", e1 / "rootfs.tgz")
    assert link == store.pointer("hello", "rootfs.tgz") == store.root / "recipes" / "hello" / "rootfs.tgz"
    assert link.is_symlink()
    assert os.readlink(link) == "../../store/tgz/k1/rootfs.tgz"
    assert store.current("hello", "rootfs.tgz") == e1
    assert store.current_key("hello", "rootfs.tgz") == "k1"
    assert link.read_bytes() == b"one"
    store.point("hello", "rootfs.tgz", e2 / "rootfs.tgz")
    assert store.current_key("hello", "rootfs.tgz") == "k2"
    assert link.read_bytes() == b"two"
    assert sorted(p.name for p in link.parent.iterdir()) == ["rootfs.tgz"]  # no temporary link left


def test_point_replaces_the_link_atomically(tmp_path, monkeypatch):
    store = Store(tmp_path / "cache")
    e1, e2 = build(store, "k1"), build(store, "k2")
    store.point("hello", "rootfs.tgz", e1 / "rootfs.tgz")
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        assert store.current_key("hello", "rootfs.tgz") == "k1"  # the old link is intact until the replace
        raise OSError("crash right before the rename")

    monkeypatch.setattr(cache.os, "replace", spy)
    with pytest.raises(OSError):
        store.point("hello", "rootfs.tgz", e2 / "rootfs.tgz")
    assert calls and calls[0][1] == store.pointer("hello", "rootfs.tgz")
    assert store.current_key("hello", "rootfs.tgz") == "k1"
    monkeypatch.setattr(cache.os, "replace", real_replace)
    store.point("hello", "rootfs.tgz", e2 / "rootfs.tgz")  # a leftover temporary link does not get in the way
    assert store.current_key("hello", "rootfs.tgz") == "k2"


def test_pointers_survive_moving_the_cache(tmp_path):
    store = Store(tmp_path / "a" / "cache")
    store.point("hello", "rootfs.tgz", build(store, "k1") / "rootfs.tgz")
    shutil.copytree(store.root, tmp_path / "b" / "cache", symlinks=True)
    moved = Store(tmp_path / "b" / "cache")
    assert moved.current("hello", "rootfs.tgz") == moved.entry("tgz", "k1").resolve()


def test_no_pointer_and_dangling_pointer(store):
    assert store.current("hello", "rootfs.tgz") is None
    with pytest.raises(UserError) as info:
        store.current_key("hello", "rootfs.tgz")
    assert "hello" in info.value.message and info.value.hint
    e1 = build(store, "k1")
    store.point("hello", "rootfs.tgz", e1 / "rootfs.tgz")
    shutil.rmtree(e1)
    assert store.current("hello", "rootfs.tgz") is None
    with pytest.raises(UserError):
        store.current_key("hello", "rootfs.tgz")


def test_pointer_at_an_unfinished_entry_is_not_current(store):
    d = store.entry("tgz", "k1")
    d.mkdir(parents=True)
    (d / "rootfs.tgz").write_bytes(b"half")
    store.point("hello", "rootfs.tgz", d / "rootfs.tgz")
    assert store.current("hello", "rootfs.tgz") is None


def test_gc_removes_unreferenced_entries_and_work_dirs(store):
    e1, e2, e3 = build(store, "k1"), build(store, "k2"), build(store, "k3")
    store.point("hello", "rootfs.tgz", e1 / "rootfs.tgz")
    (store.tmp / "tgz-k9-999999999-2").mkdir(parents=True)  # its builder (pid 999999999) is gone
    (store.tmp / "stray-file").write_text("")
    removed = store.gc(keep=[e3])
    assert set(removed) == {e2, store.tmp / "tgz-k9-999999999-2", store.tmp / "stray-file"}
    assert e1.is_dir() and store.lookup("tgz", "k1") == e1
    assert e3.is_dir()
    assert not e2.exists()
    assert work_dirs(store) == []
    assert store.current_key("hello", "rootfs.tgz") == "k1"


def _indirect_root(tmp_path: Path, monkeypatch, kind: str) -> Path:
    """The same cache/ folder reached through a relative path, or through a symlinked folder."""
    (tmp_path / "real").mkdir()
    if kind == "relative":
        monkeypatch.chdir(tmp_path / "real")
        return Path("cache")
    (tmp_path / "via").symlink_to(tmp_path / "real")
    return tmp_path / "via" / "cache"


@pytest.mark.parametrize("kind", ["relative", "symlinked"])
def test_gc_through_an_indirect_store_root_keeps_referenced_entries(tmp_path, monkeypatch, kind):
    store = Store(_indirect_root(tmp_path, monkeypatch, kind))
    e1 = build(store, "k1")
    build(store, "k2")
    store.point("hello", "rootfs.tgz", e1 / "rootfs.tgz")
    store.gc()
    assert store.lookup("tgz", "k1") is not None, "gc removed the entry hello/rootfs.tgz points at"
    assert store.lookup("tgz", "k2") is None


@pytest.mark.parametrize("kind", ["relative", "symlinked"])
def test_listing_through_an_indirect_store_root_shows_the_pointer(tmp_path, monkeypatch, kind):
    store = Store(_indirect_root(tmp_path, monkeypatch, kind))
    store.point("hello", "rootfs.tgz", build(store, "k1") / "rootfs.tgz")
    (line,) = [ln for ln in store.listing().splitlines() if ln.startswith("tgz")]
    assert "hello/rootfs.tgz" in line


def test_listing_shows_who_points_where(store):
    e1 = build(store, "aaaa1111", b"x" * 2048)
    build(store, "bbbb2222")
    store.point("hello", "rootfs.tgz", e1 / "rootfs.tgz")
    store.point("other", "rootfs.tgz", e1 / "rootfs.tgz")
    (store.tmp / "tgz-k9-1-2").mkdir(parents=True)
    lines = store.listing().splitlines()
    (a,) = [ln for ln in lines if "aaaa1111" in ln]
    (b,) = [ln for ln in lines if "bbbb2222" in ln]
    assert a.startswith("tgz") and "hello/rootfs.tgz" in a and "other/rootfs.tgz" in a
    assert "(unreferenced)" in b and " local " in b
    assert lines[-1].startswith("2 local entries") and "1 unfinished work dirs" in lines[-1]


# -- XXHashChecker ---------------------------------------------------------------------------------------


@pytest.fixture
def dep(fs):
    p = Path("/src/file.txt")
    fs.create_file(p, contents="hello\n")
    os.utime(p, (1000, 1000))
    return p


def no_hashing(monkeypatch):
    def boom(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(cache, "hash_file", boom)


def state_of(p: Path):
    return XXHashChecker().get_state(str(p), None)


def test_checker_state_is_mtime_size_hash(dep):
    assert state_of(dep) == (1000, 6, cache.hash_file(dep))


def test_checker_unchanged_mtime_is_not_modified_without_hashing(dep, monkeypatch):
    state = state_of(dep)
    no_hashing(monkeypatch)
    assert XXHashChecker().check_modified(str(dep), os.stat(dep), state) is False
    assert XXHashChecker().get_state(str(dep), state) is None  # unchanged: doit keeps the old state


def test_checker_changed_size_is_modified(dep, monkeypatch):
    state = state_of(dep)
    dep.write_text("hello world\n")
    os.utime(dep, (2000, 2000))
    no_hashing(monkeypatch)  # the size alone decides
    assert XXHashChecker().check_modified(str(dep), os.stat(dep), state) is True


def test_checker_touched_file_is_not_modified(dep):
    state = state_of(dep)
    os.utime(dep, (2000, 2000))
    assert XXHashChecker().check_modified(str(dep), os.stat(dep), state) is False
    assert XXHashChecker().get_state(str(dep), state) == (2000, 6, state[2])  # new mtime saved, no rehash next time


def test_checker_same_size_other_bytes_is_modified(dep):
    state = state_of(dep)
    dep.write_text("HELLO\n")
    os.utime(dep, (2000, 2000))
    assert XXHashChecker().check_modified(str(dep), os.stat(dep), state) is True


def test_checker_reads_a_store_files_sha256_from_its_manifest_and_hashes_no_byte(tmp_path, monkeypatch):
    """A pointer leads into a store entry: its file is identified by its record, not hashed
    (a stage's file_deps are whole disks); another entry's file of the same size is another id."""
    store = Store(tmp_path / "cache")
    ids = []
    for key, data in (("a" * 32, b"disk one"), ("b" * 32, b"disk two")):
        with store.build("ext4", key, {"stage": "ext4"}) as work:
            (work / "rootfs.ext4").write_bytes(data)
        link = tmp_path / f"pointer-{key[0]}"
        link.symlink_to(store.entry("ext4", key) / "rootfs.ext4")
        no_hashing(monkeypatch)
        ids.append(state_of(link)[2])
        monkeypatch.undo()
    assert ids == [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in (b"disk one", b"disk two")]
    other = tmp_path / "elsewhere.txt"
    other.write_bytes(b"disk one")
    assert state_of(other)[2] == cache.hash_file(other)  # not in a store: hashed


# -- the checker, through doit itself ---------------------------------------------------------------------------


def test_doit_with_the_checker(tmp_path):
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    src = tmp_path / "src.txt"
    src.write_text("one\n")
    os.utime(src, (1000, 1000))
    ran: list[str] = []

    def action():
        ran.append("x")

    def task_t():
        return {"actions": [action], "file_dep": [str(src)]}

    dodo = {"task_t": task_t, "DOIT_CONFIG": {"check_file_uptodate": XXHashChecker, "backend": "json",
                                              "dep_file": str(tmp_path / "doit.db"), "verbosity": 0}}

    def run() -> int:
        before = len(ran)
        assert DoitMain(ModuleTaskLoader(dodo)).run([]) == 0
        return len(ran) - before

    assert run() == 1
    assert run() == 0
    os.utime(src, (2000, 2000))  # touched only
    assert run() == 0
    src.write_text("two\n")  # same size, other bytes
    os.utime(src, (3000, 3000))
    assert run() == 1
    assert run() == 0


def test_gc_keeps_the_work_dir_of_a_running_build(store):
    import subprocess

    with subprocess.Popen(["sleep", "30"]) as builder:
        try:
            live = store.tmp / f"tgz-k9-{builder.pid}-7"
            live.mkdir(parents=True)
            removed = store.gc()
            assert live not in removed and live.is_dir()
        finally:
            builder.kill()


# -- integrity ---------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int = 0) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_stored_entries_are_read_only_and_record_their_files(tmp_path):
    store = Store(tmp_path / "cache")
    entry = build(store, "k1", b"abc")
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o555
    assert stat.S_IMODE(os.stat(entry / "rootfs.tgz").st_mode) == 0o444
    files = json.loads((entry / MANIFEST).read_text())["files"]
    assert files == {"rootfs.tgz": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}
    assert cache.verify(entry) is None and cache.verify(entry, deep=True) is None


def test_a_changed_entry_is_found_evicted_and_named(tmp_path, capsys):
    store = Store(tmp_path / "cache")
    entry = build(store, "k1", b"abcdef")
    flip_byte(entry / "rootfs.tgz", 2)  # same size, newer mtime: rehashed
    assert "sha256" in cache.verify(entry)
    assert store.lookup("tgz", "k1") is None
    assert not entry.exists()
    assert "store entry tgz/k1 has a changed rootfs.tgz" in capsys.readouterr().err


def test_a_flip_with_the_old_mtime_is_found_by_a_deep_check(tmp_path):
    store = Store(tmp_path / "cache")
    entry = build(store, "k1", b"abcdef")
    st = os.stat(entry / "rootfs.tgz")
    flip_byte(entry / "rootfs.tgz")
    os.utime(entry / "rootfs.tgz", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.verify(entry) is None  # the quick check trusts size and mtime, like doit's checker
    assert "sha256" in cache.verify(entry, deep=True)


@pytest.mark.parametrize("damage", ["truncate", "remove", "no record"])
def test_size_loss_and_old_entries_are_found(tmp_path, damage):
    store = Store(tmp_path / "cache")
    entry = build(store, "k1", b"abcdef")
    os.chmod(entry, 0o755)
    if damage == "truncate":
        os.chmod(entry / "rootfs.tgz", 0o644)
        os.truncate(entry / "rootfs.tgz", 2)
    elif damage == "remove":
        (entry / "rootfs.tgz").unlink()
    else:
        m = json.loads((entry / MANIFEST).read_text())
        del m["files"]
        os.chmod(entry / MANIFEST, 0o644)
        (entry / MANIFEST).write_text(json.dumps(m))
    assert cache.verify(entry) is not None
    assert store.lookup("tgz", "k1") is None


def test_current_does_not_lead_to_a_changed_entry(tmp_path):
    store = Store(tmp_path / "cache")
    entry = build(store, "k1", b"abcdef")
    store.point("hello", "rootfs.tgz", entry / "rootfs.tgz")
    flip_byte(entry / "rootfs.tgz")
    assert store.current("hello", "rootfs.tgz") is None


def test_a_body_that_writes_the_manifest_keeps_its_records_only_for_the_same_inputs(tmp_path):
    store = Store(tmp_path / "cache")
    files = {"rootfs.tgz": {"size": 2, "sha256": hashlib.sha256(b"ab").hexdigest()}}
    with store.build("tgz", "k1", {"in": (1, 2)}) as work:  # a pulled entry: files + manifest.json
        (work / "rootfs.tgz").write_bytes(b"ab")
        (work / MANIFEST).write_text(json.dumps({"in": [1, 2], "files": files}))
    assert json.loads((store.entry("tgz", "k1") / MANIFEST).read_text())["files"] == files
    with pytest.raises(UserError, match="does not match the inputs"):
        with store.build("tgz", "k2", {"in": 3}) as work:
            (work / "rootfs.tgz").write_bytes(b"ab")
            (work / MANIFEST).write_text(json.dumps({"in": 4, "files": files}))
    assert store.lookup("tgz", "k2") is None and work_dirs(store) == []


def test_absent_stores_nothing(tmp_path):
    store = Store(tmp_path / "cache")
    with store.build("tgz", "k1", {}) as work:
        (work / "rootfs.tgz").write_bytes(b"half")
        raise cache.Absent
    assert store.lookup("tgz", "k1") is None and work_dirs(store) == []


@pytest.mark.parametrize("how", ["oserror", "tool"])
def test_a_full_disk_is_one_line_and_stores_nothing(tmp_path, how):
    store = Store(tmp_path / "cache")
    with pytest.raises(UserError) as info:
        with store.build("ext4", "k1", {}) as work:
            (work / "rootfs.ext4").write_bytes(b"x" * 5000)
            if how == "oserror":
                raise OSError(28, "No space left on device")
            raise UserError("command failed with exit status 1: mkfs.ext4 …\n  No space left on device")
    message = info.value.render()
    assert message.startswith(f"error: ext4: no space left on the disk holding {store.root} (the stage had "
                              "written 4.9K when it filled")
    assert "store_gc" in info.value.hint and "Traceback" not in message
    assert store.lookup("ext4", "k1") is None and work_dirs(store) == []


def test_gc_removes_read_only_entries(tmp_path):
    store = Store(tmp_path / "cache")
    entry = build(store, "k1")
    assert store.gc() == [entry] and not entry.exists()


def test_from_env_reads_the_remote_and_push_switch(tmp_path):
    s = store_from_env(tmp_path, {"LDT_REMOTE": "oci://127.0.0.1:5000/ldt", "LDT_REMOTE_PUSH": "0"})
    assert str(s.remote) == "oci://127.0.0.1:5000/ldt" and s.remote.push is False
    assert store_from_env(tmp_path, {}).remote is None
    assert store_from_env(tmp_path, {"LDT_REMOTE": "oci://127.0.0.1:5000/ldt"}).remote.push is True
