"""The table of everything the store holds: one row per kind of entry, and one runner for the
recipe stages. Every row's entries come through the store's one path (cache.Store.obtain).

    STAGES   name        task                 needs (made by)                 makes
             tgz         build_tgz            (Dockerfile, parents' tgz)      rootfs.tgz (+ image-config.json)
             app         build_app            rootfs.tgz (tgz)                app.json, app.tar
             boot        extract_boot         rootfs.tgz, app.json            vmlinuz, initrd.img, os-release,
                                  (a kernel_from recipe's files)              modules.tar ([disk] verity: the
                                                                              initrd opens the root through it)
             vmlinux     extract_boot         vmlinuz (boot)                  vmlinux (what tgz mode boots)
             ext4        build_rootfs         rootfs.tgz, app.tar, modules.tar  rootfs.ext4
                                                                  (+ rootfs.verity, verity.json: [disk] verity)
             bios        build_syslinux_bios  vmlinuz, initrd.img, ext4, app.json  bios.img
             bios_qcow2  build_syslinux_bios  bios.img (bios)                 bios.qcow2      ([disk] qcow2)
             sb_vars     sb_vars              (the Secure Boot keys' certificates)  sb-vars.fd ([boot] secure_boot)
             uefi        build_efistub        vmlinuz, initrd.img, os-release, rootfs.ext4, app.json   uefi.img
                                              (sb-vars.fd: signed, the certificates on the ESP)
                                              ([disk] verity: the hash tree as p3, the root hash on the command line)
             uefi_qcow2  build_efistub        uefi.img (uefi)                 uefi.qcow2      ([disk] qcow2)
             fast_boot   fast_boot            vmlinux, initrd.img             fast.kernel, fast.initrd (virt's)

A stage's key is the hash of its manifest(): its name and version, the recipe settings it
reads, the keys of the entries it needs, its stamped epoch and its own other inputs. That
one manifest is both the store key and doit's up-to-date check (StageUptodate), so the two
cannot drift. The runner reads top to bottom:

    inputs -> manifest -> key -> (store hit? point at it : build atomically, then point) -> outputs

The other rows (OTHER_ROWS) are entries made from a recipe's entries, not doit stages:

    ROWS     name           made by (builder)          from (needs)                store_gc keeps it while
             check          vm.check_one (a boot)      the entries a mode boots    they are live (Keep.NEEDS)
             virt_snapshot  resume.prepare (a VM save) kernel, initrd, rootfs,     every file it was made from is
                                                       qemu, firmware files        unchanged (Keep.FILES)
             published      publish.pull_published     an image in a registry      it is its image's newest pull
                                                                                   (Keep.NEWEST)

A check entry is stored only when the boot passed (only_passes); a virt snapshot is keyed by
this machine's paths, so it is never shared (shared=False); a published image is pulled by its
builder (the registry's own verified image pull), keyed by its digest. The recipe stages are
kept while a recipe points at them (Keep.POINTED). Every row, these three included, takes
the one path, Store.obtain(): its builder is what obtain() calls on a miss.

Stage functions take typed values (the Project, the Recipe) and raise UserError; graph.py
adapts them to doit actions and cli.py to console scripts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import builders
from pipeline.artifacts import EPOCH, Artifact
from pipeline.build import Build
from pipeline.cache import Keep, Row, Source
from pipeline.entries import hash_file, key_of
from pipeline.errors import UserError
from pipeline.project import Project
from pipeline.recipes import Recipe
from pipeline.run import log

A = Artifact


def _always(r: Recipe) -> bool:
    return True


def _bootable(r: Recipe) -> bool:
    return r.bootable


@dataclass(frozen=True)
class Stage:
    name: str  # the store folder cache/store/<name>/, and "stage" in the manifest
    task: str  # the doit task; a disk stage and its qcow2 conversion share one
    version: int  # bump when the builder's output changes: every key of the stage changes
    doc: str
    needs: tuple[Artifact, ...]  # files of the recipe's earlier stages (which stage makes each: the table)
    makes: tuple[Artifact, ...]  # the first one is the stage's primary output
    reads: tuple[str, ...]  # the Recipe settings (Recipe.settings() keys) that go into the key
    build: Callable[[Build], None]
    applies: Callable[[Recipe], bool] = _always  # which recipes have this stage
    stamped: bool = False  # the files it writes carry the tgz entry's epoch (reproducible images)
    inputs: Callable[[Project, Recipe], dict[str, Any]] | None = None  # other inputs: context, parents
    sources: Callable[[Project, Recipe], list[str]] | None = None  # files doit watches besides the needs
    prepare: Callable[[Project, Recipe], None] | None = field(default=None)  # before the key (engine state)
    after: Callable[[Project, Recipe, Path], None] | None = field(default=None)  # once the entry is current

    def needs_for(self, r: Recipe) -> tuple[Artifact, ...]:
        return tuple(a for a in self.needs if wanted(a, r))

    @property
    def row(self) -> Row:
        """The stage as a row of the store's table: kept while a recipe points at it."""
        return Row(self.name, self.version, self.doc, needs=tuple(dict.fromkeys(MAKER[a].name for a in self.needs)),
                   reads=self.reads, keep=Keep.POINTED, builder=f"builders.{self.build.__name__}")

    def makes_for(self, r: Recipe) -> tuple[Artifact, ...]:
        return tuple(a for a in self.makes if wanted(a, r))


def wanted(a: Artifact, r: Recipe) -> bool:
    """INITRD is the one artifact a recipe may go without ([boot] initrd = false); SB_VARS, the
    firmware a signed disk boots on, only a recipe with [boot] secure_boot has."""
    if a is A.INITRD:
        return r.initrd
    return a is not A.SB_VARS or r.secure_boot


def _has_qcow2(r: Recipe) -> bool:
    return r.bootable and r.qcow2


def _signed(r: Recipe) -> bool:
    return r.bootable and r.secure_boot


def _has_fast_boot(r: Recipe) -> bool:
    return r.bootable and r.initrd


STAGES: tuple[Stage, ...] = (
    Stage("tgz", "build_tgz", 2, "Dockerfile (or [bootstrap] via mmdebstrap) -> cached rootfs tgz",
          needs=(), makes=(A.TGZ,), reads=("build_args", "platform", "bootstrap", "rootfs"), build=builders.tgz,
          inputs=builders.tgz_inputs, sources=builders.tgz_sources, prepare=builders.tgz_prepare,
          after=builders.tgz_after),
    Stage("app", "build_app", 1, "The image's ENTRYPOINT/CMD, ENV, WORKDIR, USER resolved against its rootfs",
          needs=(A.TGZ,), makes=(A.APP, A.APP_FILES), reads=("app",), build=builders.app, applies=_bootable,
          stamped=True, inputs=builders.app_inputs),
    Stage("boot", "extract_boot", 3, "Kernel + initrd (+ os-release) out of the rootfs tgz, or kernel_from's",
          needs=(A.TGZ, A.APP), makes=(A.KERNEL, A.INITRD, A.OS_RELEASE, A.MODULES),
          reads=("kernel", "initrd", "kernel_from", "verity"), build=builders.boot, applies=_bootable,
          inputs=builders.boot_key_inputs, sources=builders.boot_sources),
    Stage("vmlinux", "extract_boot", 1, "The kernel tgz mode boots: uncompressed (PVH), or the vmlinuz as is",
          needs=(A.KERNEL,), makes=(A.VMLINUX,), reads=(), build=builders.vmlinux, applies=_bootable),
    Stage("ext4", "build_rootfs", 3, "ext4 root filesystem image of the tgz (rootless, reproducible)",
          needs=(A.TGZ, A.APP_FILES, A.MODULES), makes=(A.EXT4,), reads=("headroom_mib", "size_mib", "verity"),
          build=builders.ext4, applies=_bootable, stamped=True),
    Stage("bios", "build_syslinux_bios", 4,
          "Raw MBR disk: Syslinux + kernel/initrd on FAT, the ext4 root as partition 2",
          needs=(A.KERNEL, A.INITRD, A.EXT4, A.APP), makes=(A.BIOS_IMG,), reads=("cmdline",), build=builders.bios,
          applies=_bootable, stamped=True),
    Stage("bios_qcow2", "build_syslinux_bios", 1, "The BIOS disk as compressed qcow2",
          needs=(A.BIOS_IMG,), makes=(A.BIOS_QCOW2,), reads=(), build=builders.qcow2, applies=_has_qcow2),
    Stage("sb_vars", "sb_vars", 1, "OVMF variables with your Secure Boot keys (PK, KEK, db) enrolled, enforcing",
          needs=(), makes=(A.SB_VARS,), reads=(), build=builders.sb_vars, applies=_signed,
          inputs=builders.sb_vars_inputs, prepare=builders.sb_prepare),
    Stage("uefi", "build_efistub", 4,
          "Raw GPT disk: ESP with a unified kernel image (systemd EFI stub), the ext4 root",
          needs=(A.KERNEL, A.INITRD, A.OS_RELEASE, A.EXT4, A.APP, A.SB_VARS), makes=(A.UEFI_IMG,),
          reads=("cmdline", "secure_boot", "verity"), build=builders.uefi, applies=_bootable, stamped=True,
          inputs=builders.sb_fingerprints, prepare=builders.sb_prepare),
    Stage("uefi_qcow2", "build_efistub", 1, "The UEFI disk as compressed qcow2",
          needs=(A.UEFI_IMG,), makes=(A.UEFI_QCOW2,), reads=(), build=builders.qcow2, applies=_has_qcow2),
    Stage("fast_boot", "fast_boot", 2, "virt's boot files: the kernel uncompressed, the initrd slimmed",
          needs=(A.VMLINUX, A.INITRD), makes=(A.FAST_KERNEL, A.FAST_INITRD), reads=(), build=builders.fast_boot,
          applies=_has_fast_boot),
)  # fmt: skip

STAGE = {s.name: s for s in STAGES}
MAKER = {a: s for s in STAGES for a in s.makes}  # which stage makes each artifact
TASKS = tuple(dict.fromkeys(s.task for s in STAGES))  # doit tasks, in table order

CHECK = Row("check", 4, "A passed boot of one mode: result.json (seconds, accel, what passed it)",
            needs=("vmlinux", "boot", "ext4", "app", "bios", "uefi"), reads=("boot_marker", "http", "cmdline"),
            only_passes=True, keep=Keep.NEEDS, builder="vm.check_one")
VIRT_SNAPSHOT = Row("virt_snapshot", 2, "virt's saved post-boot VM: vm.ram, vm.state, vm.initrd, vm.json",
                    needs=("fast_boot", "ext4"), shared=False, writable=("vm.ram",), keep=Keep.FILES,
                    builder="resume.prepare")
PUBLISHED = Row("published", 1, "An image pulled by reference (oci://…), every byte checked; keyed by its digest",
                shared=False, keep=Keep.NEWEST, builder="publish.pull_published")
OTHER_ROWS: tuple[Row, ...] = (CHECK, VIRT_SNAPSHOT, PUBLISHED)
ROWS: tuple[Row, ...] = (*(s.row for s in STAGES), *OTHER_ROWS)  # every kind of entry the store holds
ROW = {r.name: r for r in ROWS}


def task_stages(task: str) -> tuple[Stage, ...]:
    return tuple(s for s in STAGES if s.task == task)


def chain(r: Recipe, artifacts: tuple[Artifact, ...]) -> tuple[Stage, ...]:
    """The stages that make `artifacts` and everything they need, in table order (an order they
    can run in): what the CLI runs to boot a file in one mode or build one disk."""
    found: set[str] = set()
    todo = [MAKER[a] for a in artifacts if wanted(a, r)]
    while todo:
        s = todo.pop()
        if s.name not in found:
            found.add(s.name)
            todo += [MAKER[a] for a in s.needs_for(r)]
    return tuple(s for s in STAGES if s.name in found)


# -- the runner ---------------------------------------------------------------------------------


def missing(r: Recipe, a: Artifact) -> UserError:
    maker = MAKER[a]
    return UserError(f"recipe '{r.name}' has no {a} yet", hint=f"run `doit {maker.task}:{r.name}`")


def entry_of(p: Project, r: Recipe, stage: Stage) -> Path:
    """The finished entry the recipe's pointer to the stage's primary output leads to."""
    entry = p.store.current(r.name, stage.makes[0])
    if entry is None:
        raise missing(r, stage.makes[0])
    return entry


def current(p: Project, r: Recipe, artifacts: tuple[Artifact, ...]) -> dict[Artifact, Path]:
    """The recipe's current files, each read from the entry of the stage that makes it (so the
    kernel and the initrd always come from the same boot entry); an absent INITRD is left out."""
    out = {}
    for a in artifacts:
        f = entry_of(p, r, MAKER[a]) / a
        if f.exists():
            out[a] = f
        elif a is not A.INITRD:
            raise missing(r, a)
    return out


def needs_of(files: dict[Artifact, Path]) -> dict[str, str]:
    """{row: key} of the entries holding `files` (each a file in a finished entry, as current()
    gives them): the "needs" of a row made from them (a boot pass), which store_gc follows."""
    return {MAKER[a].name: f.parent.name for a, f in files.items()}


def tgz_epoch(entry: Path) -> int:
    """The timestamp of every file the image stages write: fixed per tgz entry, so the same tgz
    gives byte-identical images."""
    f = entry / EPOCH
    if f.is_file():
        return int(f.read_text())
    return int((entry / "manifest.json").stat().st_mtime)  # entries made before the epoch file


def head(stage: Stage) -> dict[str, Any]:
    """What every manifest of a stage starts with."""
    return stage.row.head()


# Settings added after entries were made by the stages that read them: at this default they stay
# out of the key, so those entries keep theirs (and their bytes: a key seeds a disk's UUIDs).
LATER_SETTINGS: dict[str, Any] = {"secure_boot": False, "verity": False}


def keyed(settings: dict[str, Any], reads: tuple[str, ...]) -> dict[str, Any]:
    """The settings that go into a stage's key: those it reads, but a later one at its default."""
    return {k: settings[k] for k in reads if k not in LATER_SETTINGS or settings[k] != LATER_SETTINGS[k]}


def manifest(p: Project, r: Recipe, stage: Stage) -> dict[str, Any]:
    """Every input of one stage for one recipe: its store key, and doit's up-to-date check."""
    m = {**head(stage), "settings": keyed(r.settings(), stage.reads)}
    makers = dict.fromkeys(MAKER[a] for a in stage.needs_for(r))
    if makers:
        m["needs"] = {s.name: entry_of(p, r, s).name for s in makers}
    if stage.stamped:
        m["epoch"] = tgz_epoch(entry_of(p, r, STAGE["tgz"]))
    if stage.inputs is not None:
        m.update(stage.inputs(p, r))
    return m


def stored(p: Project, stage: Stage, m: dict[str, Any], build: Callable[[Path, str], None], *, who: str,
           quiet: bool = False) -> Path:
    """The entry of manifest m (which starts with head(stage)), by the store's one path: a local
    hit, a pull from the shared store, or built atomically in a work dir (and shared). The CLI's
    imports and virt's files come this way too."""
    got = p.store.obtain(stage.row, m, build)
    assert got.entry is not None  # a stage is not only_passes: a build that returns is stored
    if got.source is Source.LOCAL and not quiet:
        log(f"{who}: {', '.join(stage.makes)} restored from the store ({got.key[:12]}), nothing built")
    return got.entry


def store_entry(p: Project, r: Recipe, stage: Stage, m: dict[str, Any], build: Callable[[Path, str], None]) -> Path:
    """stored(), then the recipe's pointers lead to the entry's files."""
    entry = stored(p, stage, m, build, who=r.name)
    for a in stage.makes:
        if (entry / a).exists():
            p.store.point(r.name, a, entry / a)
    return entry


def materialize(p: Project, r: Recipe, stage: Stage) -> Path:
    """Bring one stage of one recipe up to date; returns its entry."""
    if not stage.applies(r):
        raise UserError(f"recipe '{r.name}' has no {stage.name} stage",
                        hint="set [boot] bootable = true in its recipe.toml" if not r.bootable else None)
    if stage.prepare is not None:
        stage.prepare(p, r)
    m = manifest(p, r, stage)
    inputs = current(p, r, stage.needs_for(r))
    epoch = m.get("epoch")

    def build(work: Path, key: str) -> None:
        stage.build(Build(p, r, key, work, inputs, epoch))

    entry = store_entry(p, r, stage, m, build)
    if stage.after is not None:
        stage.after(p, r, entry)
    return entry


def up_to_date(p: Project, r: Recipe, stage: Stage) -> bool:
    """The recipe's pointers lead to the entry of the key the stage would have now."""
    try:
        key = key_of(manifest(p, r, stage))
    except UserError:
        return False  # an input is missing: not up to date, and running the task says why
    entry = p.store.entry(stage.name, key)
    return all(p.store.current(r.name, a) == entry for a in stage.makes_for(r))


def fast_boot_files(p: Project, kernel: Path, initrd: Path) -> tuple[Path, Path]:
    """virt's boot files for a kernel and initrd given as files (no recipe): a fast_boot entry
    keyed by their content."""
    stage = STAGE["fast_boot"]
    m = {**head(stage), "files": {"kernel": hash_file(kernel), "initrd": hash_file(initrd)}}
    entry = stored(p, stage, m, lambda work, key: builders.fast_boot_into(kernel, initrd, work), who="virt",
                   quiet=True)
    return entry / A.FAST_KERNEL, entry / A.FAST_INITRD
