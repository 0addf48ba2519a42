"""Every kind of store entry is a row of the table, and every row takes the one path
(Store.obtain); `doit store_gc` keeps what the rows' Keep rules say is live: a recipe's boot
passes, its virt snapshot and the newest pull of a published image survive it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import doit, make_project

from pipeline import resume, stages, vm
from pipeline.artifacts import Artifact
from pipeline.cache import Keep, Row, Source, Store, live_entries
from pipeline.entries import MANIFEST, key_of

A = Artifact


def test_every_row_has_its_own_folder_and_the_others_keep_todays_names():
    names = [r.name for r in stages.ROWS]
    assert len(names) == len(set(names))
    assert [r.name for r in stages.ROWS[: len(stages.STAGES)]] == [s.name for s in stages.STAGES]
    # resume.STAGE names its entries in messages and tests: the row's folder
    assert stages.VIRT_SNAPSHOT.name == resume.STAGE
    assert stages.CHECK.only_passes and not stages.VIRT_SNAPSHOT.shared
    assert all(r.keep is Keep.POINTED for r in stages.ROWS[: len(stages.STAGES)])
    for r in stages.ROWS:
        assert set(r.needs) <= set(stages.ROW), r.name


# -- the one path -------------------------------------------------------------------------------------


class FakeShared:
    """entries.Shared in memory: {(row, key): {file: bytes}} plus the manifest.json text."""

    def __init__(self, push: bool = True) -> None:
        self.entries: dict[tuple[str, str], dict[str, bytes]] = {}
        self.push, self.pulls, self.pushes = push, [], []

    def pull_entry(self, row: str, key: str, work: Path, *, blocks: object = None, seeds: object = ()) -> bool:
        self.pulls.append((row, key))
        files = self.entries.get((row, key))
        if files is None:
            return False
        for name, data in files.items():
            (work / name).write_bytes(data)
        return True

    def push_entry(self, row: str, key: str, entry: Path, *, tmp_dir: Path, blocks: object = None) -> bool:
        self.pushes.append((row, key))
        if (row, key) in self.entries:
            return False
        self.entries[(row, key)] = {p.name: p.read_bytes() for p in entry.iterdir()}
        return True

    def keys(self, row: str) -> list[str]:
        return sorted(k for r, k in self.entries if r == row)

    def __str__(self) -> str:
        return "fake://registry"


SHARED = Row("thing", 1, "a shared row")
PASSES = Row("pass", 1, "a row that stores passes only", only_passes=True)
LOCAL = Row("mine", 1, "a row never shared", shared=False)


def test_obtain_builds_once_then_finds_the_local_entry(tmp_path):
    store = Store(tmp_path / "cache")
    m = {**SHARED.head(), "x": 1}
    calls = []

    def build(work: Path, key: str) -> str:
        calls.append(key)
        (work / "out").write_text("made")
        return "built it"

    first = store.obtain(SHARED, m, build)
    assert first.source is Source.BUILT and first.result == "built it" and first.key == key_of(m)
    assert (first.entry / "out").read_text() == "made"
    again = store.obtain(SHARED, m, build)
    assert again.source is Source.LOCAL and again.entry == first.entry and calls == [key_of(m)]


def test_obtain_pulls_before_it_builds_and_pushes_what_it_built(tmp_path):
    shared = FakeShared()
    a = Store(tmp_path / "a" / "cache", shared)
    m = {**SHARED.head(), "x": 2}
    a.obtain(SHARED, m, lambda work, key: (work / "out").write_text("from a"))
    assert shared.keys("thing") == [key_of(m)]
    b = Store(tmp_path / "b" / "cache", shared)
    got = b.obtain(SHARED, m, lambda work, key: pytest.fail("built although the registry had it"))
    assert got.source is Source.REMOTE and (got.entry / "out").read_text() == "from a"


def test_a_row_that_is_not_shared_never_asks_the_registry(tmp_path):
    shared = FakeShared()
    store = Store(tmp_path / "cache", shared)
    store.obtain(LOCAL, {**LOCAL.head()}, lambda work, key: (work / "vm.ram").write_bytes(b"\0" * 10))
    store.obtain(LOCAL, {**LOCAL.head()}, lambda work, key: pytest.fail("built twice"))
    assert shared.pulls == [] and shared.pushes == []


def test_gc_removes_the_locks_nobody_holds(tmp_path):
    import fcntl

    store = Store(tmp_path / "cache")
    store.obtain(SHARED, {**SHARED.head(), "x": 3}, lambda work, key: (work / "out").write_text("x"))
    (free,) = (store.root / "locks").iterdir()
    held = store.root / "locks" / "thing-being-made.lock"
    with open(held, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        store.gc(stages.ROWS)
        assert held.exists() and not free.exists()


def test_needs_of_names_the_row_and_key_of_each_file(tmp_path):
    store = Store(tmp_path / "cache")
    files = {A.UEFI_IMG: store.entry("uefi", "u1") / A.UEFI_IMG, A.APP: store.entry("app", "a1") / A.APP}
    assert stages.needs_of(files) == {"uefi": "u1", "app": "a1"}


def test_store_only_on_success(tmp_path):
    shared = FakeShared()
    store = Store(tmp_path / "cache", shared)
    m = {**PASSES.head(), "mode": "uefi"}

    def boot(ok: bool):
        def build(work: Path, key: str) -> dict:
            (work / "result.json").write_text(json.dumps({"ok": ok}))
            return {"ok": ok, "reason": "" if ok else "no marker"}
        return build

    failed = store.obtain(PASSES, m, boot(False), passed=lambda res: res["ok"])
    assert failed.entry is None and failed.source is Source.BUILT and failed.result["reason"] == "no marker"
    assert store.lookup(PASSES.name, key_of(m)) is None and shared.pushes == [] and store.entries() == []
    passed = store.obtain(PASSES, m, boot(True), passed=lambda res: res["ok"])
    assert passed.entry is not None and shared.keys("pass") == [key_of(m)]
    cached = store.obtain(PASSES, m, boot(False), passed=lambda res: res["ok"])
    assert cached.source is Source.LOCAL and cached.result is None


# -- what store_gc keeps ------------------------------------------------------------------------------


def entry(store: Store, row: str, key: str, manifest: dict, files: dict[str, bytes]) -> Path:
    with store.build(row, key, manifest) as work:
        for name, data in files.items():
            (work / name).write_bytes(data)
    return store.entry(row, key)


def hello_store(tmp_path: Path) -> tuple[Store, dict[str, Path]]:
    """hello's entries as the stages leave them (pointed at), plus a boot pass per mode, a virt
    snapshot, two pulls of a published image and the garbage beside them."""
    store = Store(tmp_path / "cache")
    e: dict[str, Path] = {}
    for row, artifact in (("tgz", A.TGZ), ("app", A.APP), ("boot", A.KERNEL), ("vmlinux", A.VMLINUX),
                          ("ext4", A.EXT4), ("bios", A.BIOS_IMG), ("uefi", A.UEFI_IMG), ("fast_boot", A.FAST_KERNEL)):
        e[row] = entry(store, row, f"{row}-now", {"stage": row}, {artifact: row.encode()})
        store.point("hello", artifact, e[row] / artifact)
    e["old_ext4"] = entry(store, "ext4", "ext4-old", {"stage": "ext4"}, {A.EXT4: b"old"})
    # boot passes: today's shape (vm.check_one: "booted" keys) and the row's ("needs": {row: key})
    e["check_tgz"] = entry(store, "check", "c-tgz", {"stage": "check", "version": 2, "mode": "tgz",
                                                      "booted": ["vmlinux-now", "boot-now", "ext4-now", "app-now"]},
                           {"result.json": b"{}"})
    e["check_uefi"] = entry(store, "check", "c-uefi", {"stage": "check", "version": 3, "mode": "uefi",
                                                        "needs": {"uefi": "uefi-now", "app": "app-now"}},
                            {"result.json": b"{}"})
    e["check_old"] = entry(store, "check", "c-old", {"stage": "check", "version": 2, "mode": "tgz",
                                                      "booted": ["vmlinux-now", "boot-now", "ext4-old", "app-now"]},
                           {"result.json": b"{}"})
    # virt snapshots: inputs identified by resume.identity() (path:size:mtime)
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_bytes(b"qemu")

    def snapshot(key: str, rootfs: Path) -> Path:
        inputs = {"kernel": resume.identity(e["fast_boot"] / A.FAST_KERNEL), "initrd": resume.identity(qemu),
                  "rootfs": resume.identity(rootfs), "qemu": resume.identity(qemu), "bios": None}
        return entry(store, "virt_snapshot", key, {"stage": "virt_snapshot", "version": 2, "inputs": inputs},
                     {"vm.ram": b"\0" * 4096, "vm.state": b"state"})

    e["snapshot"] = snapshot("s-now", e["ext4"] / A.EXT4)
    e["snapshot_old"] = snapshot("s-old", e["old_ext4"] / A.EXT4)
    outside = tmp_path / "my.ext4"
    outside.write_bytes(b"mine")
    e["snapshot_outside"] = snapshot("s-outside", outside)
    e["snapshot_changed"] = snapshot("s-changed", outside)
    with open(e["snapshot_changed"] / MANIFEST) as f:  # made from a file that has changed since
        m = json.load(f)
    os.chmod(e["snapshot_changed"], 0o755)
    os.chmod(e["snapshot_changed"] / MANIFEST, 0o644)
    m["inputs"]["rootfs"] = m["inputs"]["rootfs"].rsplit(":", 2)[0] + ":3:1"
    (e["snapshot_changed"] / MANIFEST).write_text(json.dumps(m))
    os.chmod(e["snapshot_changed"] / MANIFEST, 0o444)
    # pulled images: the newest pull of each image stays
    e["pulled_old"] = entry(store, "published", "d1", {"stage": "published", "image": "ldt/hello", "digest": "d1"},
                            {"uefi.img": b"1"})
    os.utime(e["pulled_old"] / MANIFEST, ns=(1, 1))
    e["pulled"] = entry(store, "published", "d2", {"stage": "published", "version": 1, "image": "ldt/hello",
                                                   "digest": "d2"}, {"uefi.img": b"2"})
    e["pulled_other"] = entry(store, "published", "d3", {"stage": "published", "image": "ldt/web", "digest": "d3"},
                              {"uefi.img": b"3"})
    e["stray"] = entry(store, "nosuchrow", "x", {"stage": "nosuchrow"}, {"f": b"x"})
    return store, e


LIVE = ("tgz", "app", "boot", "vmlinux", "ext4", "bios", "uefi", "fast_boot", "check_tgz", "check_uefi", "snapshot",
        "snapshot_outside", "pulled", "pulled_other")
DEAD = ("old_ext4", "check_old", "snapshot_old", "snapshot_changed", "pulled_old", "stray")


def test_store_gc_keeps_boot_passes_virt_snapshots_and_pulled_images(tmp_path):
    store, e = hello_store(tmp_path)
    assert set(LIVE) | set(DEAD) == set(e)
    removed = store.gc(stages.ROWS)
    assert {e[n] for n in DEAD} == set(removed)
    for n in LIVE:
        assert store.lookup(e[n].parent.name, e[n].name) is not None, f"store_gc removed {n}"


def test_without_the_table_only_pointed_entries_are_live(tmp_path):
    store, e = hello_store(tmp_path)
    live = live_entries(store.manifests(), set(store.pointers().values()), (), store.store)
    assert live == {e[n] for n in ("tgz", "app", "boot", "vmlinux", "ext4", "bios", "uefi", "fast_boot")}


def test_a_pass_of_a_pass_follows_it(tmp_path):
    """NEEDS is a fixed point: an entry made from a live non-pointed entry is live too."""
    store = Store(tmp_path / "cache")
    base = entry(store, "tgz", "t", {"stage": "tgz"}, {A.TGZ: b"t"})
    store.point("r", A.TGZ, base / A.TGZ)
    rows = (*stages.ROWS, Row("pass2", 1, "made from a check", keep=Keep.NEEDS))
    first = entry(store, "check", "c1", {"stage": "check", "needs": {"tgz": "t"}}, {"result.json": b"{}"})
    second = entry(store, "pass2", "p2", {"stage": "pass2", "needs": {"check": "c1"}}, {"r": b"{}"})
    assert store.gc(rows) == [] and first.is_dir() and second.is_dir()
    store.point("r", A.TGZ, entry(store, "tgz", "t2", {"stage": "tgz"}, {A.TGZ: b"t2"}) / A.TGZ)
    assert set(store.gc(rows)) == {base, first, second}


def test_doit_store_gc_keeps_them(tmp_path):
    project = make_project(tmp_path / "p", {}, seed_store=False)
    store, e = hello_store(project)
    out = doit("store_gc", cwd=project, env={"DOCKER_HOST": "unix:///nonexistent"}).stdout
    assert f"{len(DEAD)} removed" in out, out
    for n in LIVE:
        assert e[n].is_dir(), f"doit store_gc removed {n}"
    for n in DEAD:
        assert not e[n].exists(), n


def test_a_boot_pass_is_stored_once_and_survives_store_gc(tmp_path, monkeypatch):
    """vm.check_one through the store: a failed boot stores nothing, a pass is stored and then
    cached, and store_gc keeps it while the disk it booted is the recipe's (no QEMU: check_os faked)."""
    from pipeline.project import Project
    from pipeline.qemu import Accel, Mode
    from pipeline.recipes import Recipe

    monkeypatch.delenv("LDT_REMOTE", raising=False)
    p = Project(tmp_path)
    r = Recipe(name="hello", dir=tmp_path / "recipes" / "hello")
    store = p.store
    store.point("hello", A.APP, entry(store, "app", "a1", {"stage": "app"}, {A.APP: b'{"app": null}'}) / A.APP)
    store.point("hello", A.BIOS_IMG, entry(store, "bios", "b1", {"stage": "bios"}, {A.BIOS_IMG: b"disk"}) / A.BIOS_IMG)
    boots: list[bool] = []
    outcome = {"ok": False}

    def check_os(r, mode, b, accel, marker):
        boots.append(outcome["ok"])
        return vm.CheckResult(mode, outcome["ok"], 2.0, cached=False, reason="" if outcome["ok"] else "no marker")

    monkeypatch.setattr(vm, "check_os", check_os)
    failed = vm.check_one(p, r, Mode.BIOS, Accel.TCG)
    assert not failed.ok and store.entries() == [store.entry("app", "a1"), store.entry("bios", "b1")]
    outcome["ok"] = True
    assert vm.check_one(p, r, Mode.BIOS, Accel.TCG).ok
    cached = vm.check_one(p, r, Mode.BIOS, Accel.TCG)
    assert cached.ok and cached.cached and boots == [False, True]
    (passed,) = (store.store / "check").iterdir()
    assert store.gc(stages.ROWS) == [] and passed.is_dir()
    store.point("hello", A.BIOS_IMG, entry(store, "bios", "b2", {"stage": "bios"}, {A.BIOS_IMG: b"new"}) / A.BIOS_IMG)
    assert set(store.gc(stages.ROWS)) == {store.entry("bios", "b1"), passed}
