"""The stage table: what each stage reads goes into its key, nothing else does; the task dicts
doit gets follow from the table; the guest scripts are shellcheck-clean."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import graph, secureboot, stages, virt
from pipeline.app import AppSettings
from pipeline.artifacts import EPOCH, Artifact
from pipeline.cache import key_of
from pipeline.console import CheckSettings
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.qemu import Mode
from pipeline.recipes import Bootstrap, Recipe

ROOT = Path(__file__).resolve().parent.parent

# A value different from the default for every setting of a recipe (Recipe.settings() keys).
OTHER = {
    "build_args": ("build_args", (("X", "1"),)),
    "platform": ("platform", "linux/arm64"),
    "bootstrap": ("bootstrap", Bootstrap(suite="trixie")),
    "rootfs": ("rootfs", "/mnt"),
    "kernel": ("kernel", "6.1.0-99-amd64"),
    "initrd": ("initrd", False),
    "cmdline": ("cmdline", "quiet"),
    "headroom_mib": ("headroom_mib", 512),
    "size_mib": ("size_mib", 4096),
    "qcow2": ("qcow2", True),
    "memory": ("memory", "2G"),
    "cpus": ("cpus", 4),
    "boot_marker": ("boot_marker", "Welcome"),
    "bootable": ("bootable", False),
    "check": ("check", False),
    "boot_timeout": ("boot_timeout", 9),
    "http": ("http", "/health"),
    "kernel_from": ("kernel_from", "kern"),
    "secure_boot": ("secure_boot", True),
    "verity": ("verity", True),
    "checks": ("checks", CheckSettings(run=("true",))),
    "app": ("app", AppSettings(env=(("LOG", "debug"),))),
}


@pytest.fixture(scope="session")
def sb_keys(tmp_path_factory) -> Path:
    """Secure Boot keys for the signed stages' keys (their certificates' fingerprints)."""
    directory = tmp_path_factory.mktemp("sb") / "keys"
    secureboot.ensure_keys(env={}, directory=directory)
    return directory


@pytest.fixture(autouse=True)
def _keys_here(sb_keys, monkeypatch) -> None:
    monkeypatch.setenv("LDT_SB_DIR", str(sb_keys))
    for role in secureboot.Role:
        monkeypatch.delenv(role.env_key, raising=False)
        monkeypatch.delenv(role.env_cert, raising=False)


@pytest.fixture
def project(tmp_path) -> tuple[Project, Recipe]:
    """A bootstrap recipe (no engine needed for its tgz key) with an entry for every stage, and a
    recipe `kern` pointing at the same entries (a kernel_from for it)."""
    r = Recipe(name="base", dir=tmp_path / "recipes" / "base", bootstrap=Bootstrap())
    kern = Recipe(name="kern", dir=tmp_path / "recipes" / "kern", bootstrap=Bootstrap())
    p = Project(tmp_path, extra=(r, kern))
    for s in stages.STAGES:
        with p.store.build(s.name, f"key-{s.name}", {"stage": s.name}) as work:
            for a in s.makes:
                (work / a).write_bytes(b'{"app": null, "kernels": ["6.1.0-1-amd64"]}' if a is Artifact.APP else b"x")
            if s.name == "tgz":
                (work / EPOCH).write_text("1700000000\n")
        for a in s.makes:
            for name in ("base", "kern"):
                p.store.point(name, a, p.store.entry(s.name, f"key-{s.name}") / a)
    return p, r


def test_every_setting_is_covered_here():
    assert set(OTHER) == set(Recipe(name="x", dir=Path("/x")).settings())


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
@pytest.mark.parametrize("setting", OTHER)
def test_a_stage_key_changes_with_exactly_the_settings_it_reads(project, stage, setting):
    p, r = project
    field, value = OTHER[setting]
    before = key_of(stages.manifest(p, r, stage))
    changed = dataclasses.replace(r, **{field: value})
    if not stage.applies(changed):
        return  # the setting takes the stage away (fast_boot without an initrd): it has no key to compare
    after = key_of(stages.manifest(Project(p.root, extra=(changed, *p.extra[1:])), changed, stage))
    assert (after != before) == (setting in stage.reads)


@pytest.mark.parametrize("stage", [s for s in stages.STAGES if s.needs], ids=lambda s: s.name)
def test_a_stage_key_changes_with_the_entries_it_needs(project, stage):
    p, r = project
    before = key_of(stages.manifest(p, r, stage))
    maker = stages.MAKER[stage.needs[0]]
    with p.store.build(maker.name, "another", {"stage": maker.name}) as work:
        for a in maker.makes:
            (work / a).write_bytes(b"y")
    for a in maker.makes:
        p.store.point(r.name, a, p.store.entry(maker.name, "another") / a)
    assert key_of(stages.manifest(p, r, stage)) != before


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_a_stage_key_changes_with_its_version(project, stage):
    p, r = project
    newer = dataclasses.replace(stage, version=stage.version + 1)
    assert key_of(stages.manifest(p, r, newer)) != key_of(stages.manifest(p, r, stage))


def test_the_table_is_consistent():
    assert len(stages.STAGE) == len(stages.STAGES)
    for s in stages.STAGES:
        assert s.makes, s.name
        for a in s.needs:  # made by an earlier stage
            assert stages.STAGES.index(stages.MAKER[a]) < stages.STAGES.index(s), (s.name, a)
        assert set(s.reads) <= set(OTHER)
    assert set(stages.MAKER) == set(Artifact)  # every artifact has one maker
    for mode in Mode:  # every boot mode boots what a stage makes
        assert all(a in stages.MAKER for a in mode.needs(initrd=True))


def test_up_to_date_follows_the_pointers(project):
    p, r = project
    ext4 = stages.STAGE["ext4"]
    assert not stages.up_to_date(p, r, ext4)  # the fixture's entry is not the one of the manifest's key
    key = key_of(stages.manifest(p, r, ext4))
    with p.store.build("ext4", key, {}) as work:
        (work / Artifact.EXT4).write_bytes(b"z")
    p.store.point(r.name, Artifact.EXT4, p.store.entry("ext4", key) / Artifact.EXT4)
    assert stages.up_to_date(p, r, ext4)
    changed = dataclasses.replace(r, headroom_mib=999)
    assert not stages.up_to_date(Project(p.root, extra=(changed,)), changed, ext4)


def test_task_dicts_come_from_the_table(project):
    p, r = project
    qcow = dataclasses.replace(r, qcow2=True)
    tasks = list(graph.stage_tasks(p, {"base": qcow}, "build_syslinux_bios"))
    assert tasks[0] == {"name": None, "doc": stages.STAGE["bios"].doc}
    (t,) = tasks[1:]
    pointer = lambda a: str(p.store.pointer("base", a))  # noqa: E731
    assert [a[1][2] for a in t["actions"]] == ["bios", "bios_qcow2"]
    assert t["targets"] == [pointer(Artifact.BIOS_IMG), pointer(Artifact.BIOS_QCOW2)]
    assert t["file_dep"] == sorted(pointer(a) for a in (Artifact.KERNEL, Artifact.INITRD, Artifact.EXT4, Artifact.APP))
    no_initrd = dataclasses.replace(r, initrd=False)
    (t,) = list(graph.stage_tasks(p, {"base": no_initrd}, "build_syslinux_bios"))[1:]
    assert pointer(Artifact.INITRD) not in t["file_dep"]
    assert list(graph.stage_tasks(p, {"base": dataclasses.replace(r, bootable=False)}, "build_rootfs"))[1:] == []


def test_missing_input_names_the_task_that_makes_it(tmp_path):
    r = Recipe(name="app", dir=tmp_path)
    with pytest.raises(UserError) as info:
        stages.current(Project(tmp_path, extra=(r,)), r, (Artifact.KERNEL,))
    assert info.value.message == "recipe 'app' has no vmlinuz yet" and info.value.hint == "run `doit extract_boot:app`"


GUEST_SCRIPTS = sorted((ROOT / "pipeline" / "guest").glob("*.sh"))


@pytest.mark.parametrize("script", GUEST_SCRIPTS, ids=lambda p: p.name)
def test_guest_scripts_are_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed by ./setup.sh"
    proc = subprocess.run([shellcheck, "-s", "sh", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_virt_init_uses_the_literals_virt_py_expects():
    script = virt.init_script()
    assert f"echo \"{virt.ERROR_TAG} $*\"" in script
    assert f". /{virt.CONF}" in script
    assert f"msize={virt.MSIZE}," in script
    assert f"{virt.MOUNT_TAG} $R/work" in script
    assert f"PATH={virt.GUEST_PATH}\n" in script


def test_a_recipe_from_outside_recipes_does_not_read_recipes(tmp_path):
    """run-tgz FILE.tgz and friends work beside an unrelated broken recipe.toml."""
    (tmp_path / "recipes" / "bad").mkdir(parents=True)
    (tmp_path / "recipes" / "bad" / "recipe.toml").write_text("[nonsense\n")
    r = Recipe(name="tgz-x", dir=tmp_path)
    p = Project(tmp_path, extra=(r,))
    assert p.recipe("tgz-x") is r
    with pytest.raises(UserError):
        p.recipes  # noqa: B018 - reading recipes/ is what fails


def test_virt_on_an_app_whose_kernel_recipe_has_no_initrd_is_one_line(project, tmp_path):
    """fast_boot takes an app-on-our-initrd's kernel recipe's initrd (virt's init runs on it)."""
    import json

    from pipeline import builders

    p, r = project
    app_r = dataclasses.replace(r, kernel_from="kern")
    p = Project(p.root, extra=(app_r, *p.extra[1:]))
    with p.store.build("app", "key-ldt-app", {"stage": "app"}) as work:
        (work / Artifact.APP).write_text(json.dumps({"app": None, "init": "ldt", "kernels": []}))
    p.store.point("base", Artifact.APP, p.store.entry("app", "key-ldt-app") / Artifact.APP)
    assert builders.our_initrd(p, app_r, builders.kernel_recipe(p, app_r))
    p.store.pointer("kern", Artifact.INITRD).unlink()
    (tmp_path / "work").mkdir()
    b = stages.Build(p, app_r, "k", tmp_path / "work", {Artifact.VMLINUX: tmp_path / "vmlinux",
                                                         Artifact.INITRD: tmp_path / "ours"}, None)
    with pytest.raises(UserError) as info:
        builders.fast_boot(b)
    assert "kernel recipe 'kern', which has none" in info.value.message
    assert info.value.hint == "set [boot] initrd = true in recipes/kern/recipe.toml"


def test_chain_is_every_stage_an_artifact_needs_in_table_order():
    r = Recipe(name="x", dir=Path("/x"))
    assert [s.name for s in stages.chain(r, Mode.TGZ.needs(initrd=True))] == ["tgz", "app", "boot", "vmlinux", "ext4"]
    assert [s.name for s in stages.chain(r, (Artifact.UEFI_QCOW2,))] == ["tgz", "app", "boot", "ext4", "uefi",
                                                                        "uefi_qcow2"]
    for mode in Mode:  # the CLI runs these to boot a file: each mode's needs are all made
        made = {a for s in stages.chain(r, mode.needs(initrd=True)) for a in s.makes}
        assert set(mode.needs(initrd=True)) <= made


def test_an_unsigned_uefi_disk_keeps_its_key(project):
    """secure_boot came after uefi entries were made: off, it is not in the key (nor the keys'
    fingerprints), so an unsigned disk keeps its key and, seeded by it, its bytes."""
    p, r = project
    m = stages.manifest(p, r, stages.STAGE["uefi"])
    assert m["settings"] == {"cmdline": ""} and "secure_boot" not in m
    assert set(m["needs"]) == {"boot", "ext4", "app"}
    assert not stages.STAGE["sb_vars"].applies(r)


def test_a_signed_uefi_disk_is_keyed_by_the_certificates_never_the_keys(project, sb_keys):
    p, r = project
    signed = dataclasses.replace(r, secure_boot=True)
    m = stages.manifest(Project(p.root, extra=(signed,)), signed, stages.STAGE["uefi"])
    keys = secureboot.KeySet.locate({}, sb_keys)
    assert m["settings"]["secure_boot"] is True
    assert m["secure_boot"] == {str(pair.role): secureboot.fingerprint(pair.cert) for pair in keys.pairs}
    assert set(m["secure_boot"]) == {"PK", "KEK", "db"}
    assert m["needs"]["sb_vars"] == "key-sb_vars"  # the firmware it boots on is an input too
    text = json.dumps(m)
    assert str(sb_keys) not in text  # no path of a key, no content of one
    for pair in keys.pairs:
        assert pair.key.read_text().splitlines()[1] not in text
    v = stages.manifest(p, signed, stages.STAGE["sb_vars"])
    assert v["keys"] == m["secure_boot"] and "template" in v and "settings" in v and v["settings"] == {}


def test_a_signed_build_without_keys_is_one_line(project, tmp_path, monkeypatch):
    p, r = project
    monkeypatch.setenv("LDT_SB_DIR", str(tmp_path / "none"))
    signed = dataclasses.replace(r, secure_boot=True)
    with pytest.raises(UserError) as info:
        stages.manifest(Project(p.root, extra=(signed,)), signed, stages.STAGE["uefi"])
    assert "not found" in info.value.message
    assert not stages.up_to_date(Project(p.root, extra=(signed,)), signed, stages.STAGE["uefi"])


def test_verity_off_stays_out_of_every_key_and_on_moves_only_its_stages(project):
    """verity came after entries were made: off, no manifest mentions it (every disk keeps its key
    and bytes); on, the ext4, boot and uefi keys move, with the initrd scripts' hashes in boot's."""
    p, r = project
    on = dataclasses.replace(r, verity=True)
    p_on = Project(p.root, extra=(on,))
    for s in stages.STAGES:
        before = stages.manifest(p, r, s)
        assert "verity" not in json.dumps(before), s.name
        moved = key_of(stages.manifest(p_on, on, s)) != key_of(before)
        assert moved == (s.name in ("ext4", "boot", "uefi")), s.name
    boot = stages.manifest(p_on, on, stages.STAGE["boot"])
    assert set(boot["verity"]) == {"local-top", "local-bottom"}


def test_the_graph_loads_no_module_only_a_build_or_a_moving_entry_needs():
    """What a no-op doit imports (dodo.py: graph, and through it stages, builders, cache, remote,
    publish): the keys are computed, nothing is built, packed, restored or pushed."""
    import sys

    code = "import sys, pipeline.graph; print(' '.join(m for m in sys.modules if m.startswith('pipeline.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert "pipeline.builders" in loaded and "pipeline.remote" in loaded  # the keys' modules, and the remote's
    build_only = {f"pipeline.{m}" for m in ("packs", "packed", "seeds", "regblocks", "disk", "ext4", "rootfs", "tgz",
                                            "reroot", "verity", "kernel", "vm", "report", "reggc")}
    assert loaded & build_only == set()
