"""The stages of the graph. Each reads top to bottom:

    inputs -> manifest -> key -> (store hit? point at it : build atomically, then point) -> outputs

Stage functions take plain strings (the project root and a recipe name) so doit can run
them as `(function, [args])` actions, pickled into worker processes under `doit -n N`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from pipeline import recipes as recipes_mod
from pipeline.cache import Store, key_of, tree_manifest
from pipeline.errors import UserError
from pipeline.recipes import Recipe
from pipeline.run import log, run

# Bump a stage's version when its code changes what it produces: every key of that stage changes.
VERSIONS = {"tgz": 1, "boot": 1, "ext4": 1, "bios": 1, "uefi": 1, "qcow2": 1, "check": 1}
TGZ = "rootfs.tgz"
KERNEL, INITRD, OS_RELEASE = "vmlinuz", "initrd.img", "os-release"
EXT4 = "rootfs.ext4"
BIOS_IMG, UEFI_IMG = "bios.img", "uefi.img"
EPOCH = "epoch"  # in a tgz entry: the time every later image stage stamps into its files
MiB = 1 << 20


@dataclass(frozen=True)
class Project:
    root: Path
    extra: tuple[Recipe, ...] = ()  # recipes from outside recipes/ (the stage commands' files and folders)

    @property
    def recipes_dir(self) -> Path:
        return self.root / "recipes"

    @property
    def store(self) -> Store:
        return Store(self.root / "cache")

    @functools.cached_property
    def recipes(self) -> dict[str, Recipe]:
        return {**recipes_mod.discover(self.recipes_dir), **{r.name: r for r in self.extra}}

    def recipe(self, name: str) -> Recipe:
        return recipes_mod.get(self.recipes, name)


def as_project(root: str | Project) -> Project:
    """doit actions pass the root as a string (picklable); the stage commands pass a Project."""
    return root if isinstance(root, Project) else Project(Path(root))


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """doit action wrapper: a UserError becomes one line plus hint, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as e:
            return TaskFailed(e.render())
        except KeyboardInterrupt:
            return TaskFailed("interrupted; nothing was stored")

    return wrapper


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- build_tgz --------------------------------------------------------------------------------


def tgz_manifest(p: Project, r: Recipe, client=None) -> dict[str, Any]:
    """Every input of a recipe's rootfs tgz."""
    m: dict[str, Any] = {"stage": "tgz", "version": VERSIONS["tgz"], "hostname": r.name, "platform": r.platform}
    if r.bootstrap is not None:
        m["bootstrap"] = r.settings()["bootstrap"]
        return m
    from pipeline import docker

    m["context"] = tree_manifest(r.dir, docker.context_files(r.dir))
    m["build_args"] = dict(r.build_args)
    if r.rootfs:  # [build] rootfs (only when set: other recipes' keys stay as they were)
        m["rootfs"] = r.rootfs
    m["parents"] = {parent: p.store.current_key(parent, TGZ) for parent in r.parents}
    m["bases"] = {ref: docker.image_id(client, ref) for ref in external_bases(r)} if client else {}
    return m


def external_bases(r: Recipe) -> list[str]:
    """FROM images that are not recipe images (e.g. debian:bookworm from a registry)."""
    refs = recipes_mod.from_images(r.dockerfile.read_text(), dict(r.build_args))
    return [ref for ref in refs if recipes_mod.recipe_of_image(ref) is None]


@user_errors
def build_tgz(root: str | Project, name: str) -> None:
    """The recipe's rootfs tgz: mmdebstrap for a bootstrap recipe, docker build + export otherwise."""
    p = as_project(root)
    r = p.recipe(name)
    client = None
    bootstraps = [n for n, x in p.recipes.items() if x.bootstrap is not None]
    if r.bootstrap is None:
        from pipeline import docker

        client = docker.client()
        for ref in external_bases(r):
            docker.ensure_base(client, ref, r.name, bootstraps)
        for parent in r.parents:  # the engine must hold the parent's current image
            ensure_image(p, client, parent)

    def build(work: Path, key: str) -> None:
        (work / EPOCH).write_text(f"{source_date_epoch()}\n")
        if r.bootstrap is not None:
            from pipeline.tgz import bootstrap

            epoch = os.environ.get("SOURCE_DATE_EPOCH")
            bootstrap(r.bootstrap, work / TGZ, r.name, int(epoch) if epoch else None)
        else:
            _docker_tgz(client, r, key, work, bootstraps)

    _stage(p, name, "tgz", tgz_manifest(p, r, client), (TGZ,), build)
    ensure_image(p, client, name)


def _docker_tgz(client, r: Recipe, key: str, work: Path, bootstraps: list[str]) -> None:
    from pipeline import docker
    from pipeline.reroot import reroot_filter
    from pipeline.tgz import Fixups, filter_tar, write_tgz

    log(f"{r.name}: docker build {r.dir}")
    # [build] rootfs: the built image is only the builder; the tgz is its folder, re-rooted, and ensure_image
    # imports that tgz as ldt/<name> (so FROM ldt/<name> builds on the tree, not on the builder)
    ref = f"{r.image}:builder-{key}" if r.rootfs else f"{r.image}:{key}"
    image = docker.build(client, r.dir, ref, buildargs=dict(r.build_args), platform=r.platform,
                         recipe=r.name, known_recipes=bootstraps, echo=_echo)
    if not r.rootfs:  # the builder's ENV, CMD… are not the tree's
        (work / "image-config.json").write_text(json.dumps(docker.image_config(client, image), sort_keys=True))
    with docker.exported(client, image) as chunks:
        write_tgz(chunks, work / TGZ, Fixups(hostname=r.name), f"export {r.name}",
                  reroot_filter(r.rootfs) if r.rootfs else filter_tar)


def ensure_image(p: Project, client, name: str) -> str:
    """Make ldt/<name>:latest the image of the recipe's current tgz entry (import it if gone)."""
    from pipeline import docker

    if client is None:
        client = docker.client()
    entry = p.store.current(name, TGZ)
    if entry is None:
        raise UserError(f"recipe '{name}' has no rootfs.tgz yet", hint=f"run `doit build_tgz:{name}`")
    r = p.recipe(name)
    keyed = f"{r.image}:{entry.name}"
    if docker.image_id(client, keyed) is None:
        cfg_file = entry / "image-config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        log(f"{name}: importing {entry / TGZ} into the engine as {keyed}")
        docker.import_tgz(client, entry / TGZ, keyed, docker.config_changes(cfg))
    docker.tag(client, keyed, f"{r.image}:latest")
    return keyed


# -- boot artifacts: extract_boot, build_rootfs, build_syslinux_bios, build_efistub -------------


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set, else now (recorded once per tgz entry)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return int(epoch) if epoch else int(time.time())


def tgz_epoch(entry: Path) -> int:
    """The timestamp of every file the image stages write: fixed per tgz entry, so the same tgz
    gives byte-identical images."""
    f = entry / EPOCH
    if f.is_file():
        return int(f.read_text())
    return int((entry / "manifest.json").stat().st_mtime)  # entries made before the epoch file


def _stage(p: Project, name: str, stage: str, manifest: dict[str, Any], outputs: tuple[str, ...],
           build: Callable[[Path, str], None]) -> Path:
    """The common shape of a stage: key -> store hit, or build atomically; then point at it."""
    manifest = {"stage": stage, "version": VERSIONS[stage], **manifest}
    key = key_of(manifest)
    store = p.store
    entry = store.lookup(stage, key)
    if entry is not None:
        log(f"{name}: {', '.join(outputs)} restored from the store ({key[:12]}), nothing built")
    else:
        with store.build(stage, key, manifest) as work:
            build(work, key)
        entry = store.entry(stage, key)
    for out in outputs:
        if (entry / out).exists():
            store.point(name, out, entry / out)
    return entry


@user_errors
def extract_boot(root: str | Project, name: str) -> None:
    """Kernel, initrd and os-release out of the recipe's rootfs tgz."""
    from pipeline import rootfs

    p = as_project(root)
    r = p.recipe(name)
    tgz = p.store.current(name, TGZ) or _missing(name, TGZ, "build_tgz")
    manifest = {"tgz": tgz.name, "kernel": r.kernel, "initrd": r.initrd}

    def build(work: Path, key: str) -> None:
        rootfs.extract_boot(tgz / TGZ, work, recipe=name, version=r.kernel, require_initrd=r.initrd)

    _stage(p, name, "boot", manifest, (KERNEL, INITRD, OS_RELEASE), build)


@user_errors
def build_rootfs(root: str | Project, name: str) -> None:
    """The ext4 root filesystem image of the tgz (rootless: no mount, no loop device)."""
    from pipeline import rootfs

    p = as_project(root)
    r = p.recipe(name)
    tgz = p.store.current(name, TGZ) or _missing(name, TGZ, "build_tgz")
    epoch = tgz_epoch(tgz)
    manifest = {"tgz": tgz.name, "epoch": epoch, "headroom_mib": r.headroom_mib, "size_mib": r.size_mib}

    def build(work: Path, key: str) -> None:
        sizing: dict[str, Any] = {"headroom_bytes": r.headroom_mib * MiB}
        if r.size_mib:
            sizing["size_bytes"] = r.size_mib * MiB
        params = rootfs.Ext4Params.for_key(key, epoch=epoch, label="root", **sizing)
        rootfs.build_ext4(tgz / TGZ, work / EXT4, params)

    _stage(p, name, "ext4", manifest, (EXT4,), build)


def _disk_stage(root: str | Project, name: str, stage: str, out_name: str) -> None:
    from pipeline import disk

    p = as_project(root)
    r = p.recipe(name)
    boot = p.store.current(name, KERNEL) or _missing(name, KERNEL, "extract_boot")
    ext4 = p.store.current(name, EXT4) or _missing(name, EXT4, "build_rootfs")
    tgz = p.store.current(name, TGZ) or _missing(name, TGZ, "build_tgz")
    epoch = tgz_epoch(tgz)
    manifest = {"boot": boot.name, "ext4": ext4.name, "epoch": epoch, "cmdline": r.cmdline}
    initrd = boot / INITRD if (boot / INITRD).exists() else None
    extra = r.cmdline.split()

    def build(work: Path, key: str) -> None:
        if stage == "bios":
            disk.build_bios_disk(boot / KERNEL, initrd, ext4 / EXT4, work / out_name, key=key, epoch=epoch,
                                 extra_cmdline=extra)
        else:
            disk.build_uefi_disk(boot / KERNEL, initrd, boot / OS_RELEASE, ext4 / EXT4, work / out_name,
                                 key=key, epoch=epoch, extra_cmdline=extra)

    entry = _stage(p, name, stage, manifest, (out_name,), build)
    if r.qcow2:
        qcow = out_name.replace(".img", ".qcow2")
        _stage(p, name, "qcow2", {"raw": entry.name, "of": out_name}, (qcow,),
               lambda work, key: disk.to_qcow2(entry / out_name, work / qcow, compress=True))


@user_errors
def build_syslinux_bios(root: str | Project, name: str) -> None:
    """MBR disk: FAT boot partition with Syslinux, kernel and initrd; the ext4 root as partition 2."""
    _disk_stage(root, name, "bios", BIOS_IMG)


@user_errors
def build_efistub(root: str | Project, name: str) -> None:
    """GPT disk: an ESP with a unified kernel image at \\EFI\\BOOT\\BOOTX64.EFI; the ext4 root."""
    _disk_stage(root, name, "uefi", UEFI_IMG)


# -- run_tgz, run_bios, run_uefi, check_boot --------------------------------------------------


def memory_mib(size: str) -> int:
    """'1G' -> 1024, '512M' -> 512, '768' -> 768 (MiB)."""
    size = size.strip().upper()
    if size.endswith("G"):
        return int(size[:-1]) * 1024
    return int(size.rstrip("M"))


def parse_forwards(spec: str) -> tuple[tuple[int, int], ...]:
    """'2222:22,8080:80' -> ((2222, 22), (8080, 80))."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        host, sep, guest = item.partition(":")
        if not sep or not host.isdigit() or not guest.isdigit():
            raise UserError(f"bad port forward '{item}'", hint="write HOST:GUEST, e.g. --forward 2222:22")
        out.append((int(host), int(guest)))
    return tuple(out)


@dataclass(frozen=True)
class Boot:
    """What one boot mode boots: the disk, and for tgz the kernel, initrd and command line."""

    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    keys: tuple[str, ...] = ()  # store keys of everything booted (check_boot caches against them)


def boot_inputs(p: Project, r: Recipe, mode: str) -> Boot:
    from pipeline.rootfs import read_ext4_identity

    store = p.store
    if mode == "tgz":
        boot = store.current(r.name, KERNEL) or _missing(r.name, KERNEL, "extract_boot")
        ext4 = store.current(r.name, EXT4) or _missing(r.name, EXT4, "build_rootfs")
        uuid, _ = read_ext4_identity(ext4 / EXT4)
        cmdline = " ".join(x for x in (f"root=UUID={uuid} rw console=tty0 console=ttyS0,115200", r.cmdline) if x)
        initrd = boot / INITRD if (boot / INITRD).exists() else None
        return Boot(ext4 / EXT4, boot / KERNEL, initrd, cmdline, (boot.name, ext4.name))
    image = {"bios": BIOS_IMG, "uefi": UEFI_IMG}[mode]
    task = {"bios": "build_syslinux_bios", "uefi": "build_efistub"}[mode]
    entry = store.current(r.name, image) or _missing(r.name, image, task)
    return Boot(entry / image, keys=(entry.name,))


def vm_command(mode: str, b: Boot, settings, scratch: Path, disk: Path | None = None) -> list[str]:
    """The qemu argv for booting `b` in one mode (scratch: a per-run dir for OVMF vars)."""
    from pipeline import qemu

    m = qemu.Mode(mode)
    ovmf = vars_ = None
    if m.needs_ovmf:
        ovmf = qemu.find_ovmf()
        vars_ = qemu.fresh_ovmf_vars(ovmf, scratch)
    return qemu.qemu_cmd(m, settings=settings, disk=disk or b.disk, kernel=b.kernel, initrd=b.initrd,
                         cmdline=b.cmdline, ovmf=ovmf, ovmf_vars=vars_, qemu=qemu.find_qemu())


@user_errors
def run_vm(root: str | Project, name: str, mode: str, memory: str = "", cpus: int = 0, cmdline: str = "",
           forward: str = "", net: bool = True, persist: str = "", accel: str = "") -> Any:
    """Boot a recipe on this terminal's serial console. The cached artifact is never written:
    the disk is a throwaway snapshot, or with `persist` a copy outside the store."""
    p = as_project(root)
    r = p.recipe(name)
    return boot_interactive(p, mode, boot_inputs(p, r, mode), memory=memory or r.memory, cpus=cpus or r.cpus,
                            cmdline=cmdline, forward=forward, net=net, persist=persist, accel=accel)


def boot_interactive(p: Project, mode: str, b: Boot, *, memory: str, cpus: int, cmdline: str = "",
                     forward: str = "", net: bool = True, persist: str = "", accel: str = "") -> Any:
    import tempfile

    from pipeline import qemu

    choice = qemu.select_accel(qemu.Accel.parse(accel or "auto", origin="--accel"), cache_dir=p.store.root)
    settings = qemu.VmSettings(memory_mib=memory_mib(memory), cpus=cpus, accel=choice.accel, network=net,
                               port_forwards=parse_forwards(forward), kernel_args=cmdline, interactive=True,
                               snapshot=not persist)
    disk = None
    if persist:
        disk = Path(persist).resolve()
        if p.store.root in disk.parents:
            raise UserError(f"--persist {persist} is inside the store", hint="give a path outside cache/")
        if not disk.exists():
            log(f"persistent disk: copying {b.disk.name} to {disk}")
            run(["cp", "--sparse=always", b.disk, disk])
        log(f"persistent disk: {disk} (changes are kept there)")
    with tempfile.TemporaryDirectory(prefix="ldt-run-") as scratch:
        cmd = vm_command(mode, b, settings, Path(scratch), disk)
        status = qemu.run_interactive(cmd)
    if status != 0:
        return TaskFailed(f"qemu exited with status {status}")
    return None


CHECK_MODES = ("tgz", "bios", "uefi")


@dataclass(frozen=True)
class CheckResult:
    mode: str
    ok: bool
    seconds: float
    cached: bool
    reason: str = ""
    tail: tuple[str, ...] = ()


def check_one(p: Project, r: Recipe, mode: str, accel) -> CheckResult:
    """Boot one variant headless to the marker, unless that exact image already passed."""
    import tempfile

    from pipeline import qemu

    b = boot_inputs(p, r, mode)
    marker = r.boot_marker or qemu.LOGIN_PROMPT.pattern
    manifest = {"stage": "check", "version": VERSIONS["check"], "mode": mode, "booted": list(b.keys),
                "marker": marker, "cmdline": b.cmdline}
    key = key_of(manifest)
    entry = p.store.lookup("check", key)
    if entry is not None:
        res = json.loads((entry / "result.json").read_text())
        return CheckResult(mode, True, res["seconds"], cached=True)
    settings = qemu.VmSettings(memory_mib=memory_mib(r.memory), cpus=r.cpus, accel=accel, network=False)
    with tempfile.TemporaryDirectory(prefix="ldt-check-") as scratch:
        cmd = vm_command(mode, b, settings, Path(scratch))
        log(f"{r.name}: booting {mode} headless, waiting for {marker!r} (timeout {r.boot_timeout}s)")
        res = qemu.boot_to_marker(cmd, timeout=r.boot_timeout, marker=re.compile(marker, re.MULTILINE))
    if res.ok:  # only passes are remembered: a failure is retried next time
        with p.store.build("check", key, manifest) as work:
            (work / "result.json").write_text(json.dumps({"seconds": round(res.seconds, 1), "accel": str(accel)}))
    return CheckResult(mode, res.ok, res.seconds, cached=False, reason=res.reason, tail=tuple(res.tail))


def check_table(name: str, results: list[CheckResult]) -> str:
    lines = [f"{'recipe':<16} {'mode':<5} {'result':<6} {'seconds':>8}"]
    for c in results:
        note = " (cached)" if c.cached else ""
        lines.append(f"{name:<16} {c.mode:<5} {'pass' if c.ok else 'FAIL':<6} {c.seconds:>8.1f}{note}")
    return "\n".join(lines)


@user_errors
def check_boot(root: str | Project, name: str, modes: tuple[str, ...] = CHECK_MODES) -> Any:
    """The boot matrix of a recipe: each mode to its marker, headless; a table of the results."""
    from pipeline import qemu

    p = as_project(root)
    r = p.recipe(name)
    accel = qemu.select_accel(cache_dir=p.store.root).accel
    results = [check_one(p, r, mode, accel) for mode in modes]
    print(check_table(name, results), flush=True)
    failed = [c for c in results if not c.ok]
    if not failed:
        print(f"boot it yourself: doit run_uefi:{name} (or run_bios, run_tgz); quit with Ctrl-A X", flush=True)
    if failed:
        details = "\n".join(f"{c.mode}: {c.reason}\n  last console lines:\n" + "\n".join("    " + t for t in c.tail)
                            for c in failed)
        return TaskFailed(f"error: {name}: boot check failed for {', '.join(c.mode for c in failed)}\n{details}\n"
                          f"  hint: boot it interactively with `doit run_{failed[0].mode}:{name}`")
    return None


def _missing(name: str, artifact: str, task: str) -> Path:
    raise UserError(f"recipe '{name}' has no {artifact} yet", hint=f"run `doit {task}:{name}`")


# -- inputs from outside recipes/ (the stage commands) ------------------------------------------


def adhoc_recipe(path: Path, prefix: str) -> Recipe:
    """A recipe with default settings standing for a file or folder outside recipes/."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.name.lower().removesuffix(".tgz").removesuffix(".tar.gz"))
    return Recipe(name=f"{prefix}-{stem.strip('-.') or 'input'}", dir=path.parent)


def import_tgz(p: Project, tgz: Path, r: Recipe) -> None:
    """Put a rootfs tgz from anywhere into the store (keyed by its bytes) and point r at it."""
    from pipeline.cache import hash_file

    if not tgz.is_file():
        raise UserError(f"{tgz}: no such file", hint="give the path of a rootfs .tgz (e.g. from docker export | gzip)")
    def build(work: Path, key: str) -> None:
        (work / EPOCH).write_text(f"{int(tgz.stat().st_mtime)}\n")
        try:
            os.link(tgz, work / TGZ)  # same file system: free
        except OSError:
            run(["cp", "--sparse=always", tgz, work / TGZ])

    _stage(p, r.name, "tgz", {"file_xxh3": hash_file(tgz)}, (TGZ,), build)


def import_tree(p: Project, tree: Path, r: Recipe) -> None:
    """A root filesystem folder (as mmdebstrap leaves it) becomes a cached tgz keyed by its content."""
    from pipeline.tgz import compressor_cmd

    if not (tree / "boot").is_dir():
        raise UserError(f"{tree}: no boot/ folder with a kernel", hint="give a root filesystem tree, e.g. made by "
                        "`mmdebstrap --include=linux-image-amd64,systemd-sysv bookworm DIR`")
    files = [str(f.relative_to(tree)) for f in sorted(tree.rglob("*"))]

    def build(work: Path, key: str) -> None:
        (work / EPOCH).write_text(f"{source_date_epoch()}\n")
        tar = ["tar", "-C", tree, "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "-cf", "-", "."]
        with open(work / TGZ, "wb") as out:
            run(["sh", "-c", f"{shlex.join(map(str, tar))} | {shlex.join(compressor_cmd())}"], stdout=out)

    _stage(p, r.name, "tgz", {"tree": tree_manifest(tree, files)}, (TGZ,), build)


# -- graph helpers used by dodo.py -------------------------------------------------------------


def recipes_or_exit(p: Project) -> dict[str, Recipe]:
    """Recipes for dodo.py: a bad recipe is one line and exit status 2, not a traceback."""
    try:
        return p.recipes
    except UserError as e:
        print(e.render(), file=sys.stderr)
        raise SystemExit(2) from None


def recipe_files(r: Recipe) -> list[str]:
    """The recipe folder's files but recipe.toml (a superset of the build context: cheap to list, never
    misses one); recipe.toml's settings reach each task through its uptodate digest instead."""
    return sorted(str(f) for f in r.dir.rglob("*") if (f.is_file() or f.is_symlink()) and f != r.toml)


def tgz_inputs(r: Recipe) -> dict[str, Any]:
    """The non-file inputs of build_tgz, for doit's uptodate digest."""
    inputs: dict[str, Any] = {"version": VERSIONS["tgz"], "settings": r.settings()["build_args"],
                              "platform": r.platform, "bootstrap": r.settings()["bootstrap"],
                              "files": [str(f.relative_to(r.dir)) for f in map(Path, recipe_files(r))]}
    if r.rootfs:  # [build] rootfs (only when set: other recipes' digests stay as they were)
        inputs["rootfs"] = r.rootfs
    if r.bootstrap is None and external_bases(r):
        inputs["bases"] = functools.partial(_base_ids, external_bases(r))  # asks the engine only when checked
    return inputs


def stage_inputs(r: Recipe, stage: str) -> dict[str, Any]:
    """The non-file inputs of an image stage, for doit's uptodate digest."""
    settings = r.settings()
    picked = {"boot": ("kernel", "initrd"), "ext4": ("headroom_mib", "size_mib"),
              "bios": ("cmdline", "qcow2"), "uefi": ("cmdline", "qcow2")}[stage]
    return {"version": VERSIONS[stage], **{k: settings[k] for k in picked}}


def disk_outputs(r: Recipe, image: str) -> list[str]:
    return [image, image.replace(".img", ".qcow2")] if r.qcow2 else [image]


def _base_ids(refs: list[str]) -> dict[str, str | None]:
    from pipeline import docker

    try:
        c = docker.client()
    except UserError:
        return {ref: None for ref in refs}
    return {ref: docker.image_id(c, ref) for ref in refs}


@user_errors
def show_store(root: str) -> None:
    print(Project(Path(root)).store.listing())


@user_errors
def store_gc(root: str) -> None:
    removed = Project(Path(root)).store.gc()
    for e in removed:
        print(f"removed {e}")
    print(f"{len(removed)} removed")
