"""What each stage of the table in stages.py does: one builder per stage, each filling an empty
work dir with the stage's `makes`, plus the tgz stage's inputs and hooks. The heavy work lives
in the concern's own module (docker, tgz, reroot, rootfs, kernel, initramfs, ext4, disk); these only
connect it. The modules only builders use are imported inside them: a no-op doit computes keys
(the *_inputs here) and builds nothing."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import app as app_mod
from pipeline import docker, initramfs
from pipeline import secureboot as sb
from pipeline.artifacts import EPOCH, Artifact
from pipeline.cache import hash_file, tree_manifest
from pipeline.errors import UserError
from pipeline.files import link_or_copy
from pipeline.recipes import Recipe, from_images, recipe_of_image
from pipeline.run import log, run, verbose

if TYPE_CHECKING:
    from pipeline.build import Build
    from pipeline.project import Project

A = Artifact
MiB = 1 << 20
IMAGE_CONFIG = "image-config.json"  # in a tgz entry: the built image's config (ENTRYPOINT, CMD, ENV…)


# -- tgz ----------------------------------------------------------------------------------------


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH when set, else now (recorded once per tgz entry)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return int(epoch) if epoch else int(time.time())


def external_bases(r: Recipe) -> list[str]:
    """FROM images that are not recipe images (e.g. debian:bookworm from a registry)."""
    refs = from_images(r.dockerfile.read_text(), dict(r.build_args))
    return [ref for ref in refs if recipe_of_image(ref) is None]


def recipe_files(r: Recipe) -> list[str]:
    """The recipe folder's files but recipe.toml (a superset of the build context: cheap to list, never
    misses one); recipe.toml's settings reach each stage through its manifest instead."""
    return sorted(str(f) for f in r.dir.rglob("*") if (f.is_file() or f.is_symlink()) and f != r.toml)


def tgz_sources(p: Project, r: Recipe) -> list[str]:
    """doit's file_dep of build_tgz: the recipe's files and its parents' tgz pointers (ordering)."""
    return recipe_files(r) + [str(p.store.pointer(parent, A.TGZ)) for parent in r.parents]


def tgz_inputs(p: Project, r: Recipe) -> dict[str, Any]:
    """The tgz's inputs besides its settings: the build context, the parents' entries and the
    engine's ids of external base images (asked only when the recipe has any)."""
    m: dict[str, Any] = {"hostname": r.name}
    if r.bootstrap is not None:
        if r.bootstrap.key is not None:  # its name is a setting; what it says (which mirror it trusts) is here
            m["key"] = tree_manifest(r.dir, [r.bootstrap.key])
        return m

    m["context"] = tree_manifest(r.dir, docker.context_files(r.dir))
    m["parents"] = {parent: p.store.current_key(parent, A.TGZ) for parent in r.parents}
    bases = external_bases(r)
    if bases:
        client = docker.client()
        m["bases"] = {ref: docker.image_id(client, ref) for ref in bases}
    return m


def _bootstraps(p: Project) -> list[str]:
    """Bootstrap recipes, for hints; an unreadable recipes/ only loses the hint."""
    try:
        return [n for n, x in p.recipes.items() if x.bootstrap is not None]
    except UserError:
        return []


def tgz_prepare(p: Project, r: Recipe) -> None:
    """External base images must be in the engine before their ids go into the key."""
    if r.bootstrap is not None or not external_bases(r):
        return

    client = docker.client()
    for ref in external_bases(r):
        docker.ensure_base(client, ref, r.name, _bootstraps(p))


def tgz(b: Build) -> None:
    """mmdebstrap for a bootstrap recipe; docker build + export otherwise."""
    from pipeline.tgz import Fixups, bootstrap, filter_tar, write_tgz
    r = b.recipe
    (b.work / EPOCH).write_text(f"{source_date_epoch()}\n")
    if r.bootstrap is not None and r.bootstrap.distro == "arch":  # pacstrap (pipeline/arch.py)
        from pipeline.arch import bootstrap_tgz

        bootstrap_tgz(r.bootstrap, r.dir, b.out(A.TGZ), r.name)
        return
    if r.bootstrap is not None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        bootstrap(r.bootstrap, b.out(A.TGZ), r.name, int(epoch) if epoch else None)
        return

    client = docker.client()
    for parent in r.parents:  # the engine must hold the parent's current image
        ensure_image(b.project, client, parent)
    log(f"{r.name}: docker build {r.dir}")
    # [build] rootfs: the built image is only the builder; the tgz is its folder, re-rooted, and ensure_image
    # imports that tgz as ldt/<name> (so FROM ldt/<name> builds on the tree, not on the builder)
    ref = f"{r.image}:builder-{b.key}" if r.rootfs else f"{r.image}:{b.key}"
    image = docker.build(client, r.dir, ref, buildargs=dict(r.build_args), platform=r.platform,
                         recipe=r.name, known_recipes=_bootstraps(b.project), echo=_echo)
    if not r.rootfs:  # the builder's ENV, CMD… are not the tree's
        (b.work / IMAGE_CONFIG).write_text(json.dumps(docker.image_config(client, image), sort_keys=True))
    with docker.exported(client, image) as chunks:
        from pipeline.reroot import reroot_filter

        write_tgz(chunks, b.out(A.TGZ), Fixups(hostname=r.name), f"export {r.name}",
                  reroot_filter(r.rootfs) if r.rootfs else filter_tar)


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def tgz_after(p: Project, r: Recipe, entry: Path) -> None:
    """ldt/<name>:latest follows the current entry where the engine holds its image (built here,
    or imported before). A tgz pulled from the shared store is imported only when something needs
    it (a child's FROM, suco: ensure_image), so a runner that only pulls pays no docker import
    (15 s for hello) and needs no engine; a stale latest is taken off meanwhile."""
    try:
        client = docker.client()
    except UserError:
        return  # no engine: no tag to keep current
    keyed = f"{r.image}:{entry.name}"
    if docker.image_id(client, keyed) is not None:
        docker.tag(client, keyed, f"{r.image}:latest")
        return
    stale = docker.untag(client, f"{r.image}:latest")
    log(f"{r.name}: the engine gets {r.image} when a FROM or suco needs it"
        + (f" ({r.image}:latest, an older image, untagged)" if stale else ""))


def ensure_image(p: Project, client, name: str) -> str:
    """Make ldt/<name>:latest the image of the recipe's current tgz entry (import it if gone)."""

    if client is None:
        client = docker.client()
    entry = p.store.current(name, A.TGZ)
    if entry is None:
        raise UserError(f"recipe '{name}' has no rootfs.tgz yet", hint=f"run `doit build_tgz:{name}`")
    r = p.recipe(name)
    keyed = f"{r.image}:{entry.name}"
    if docker.image_id(client, keyed) is None:
        cfg_file = entry / IMAGE_CONFIG
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        log(f"{name}: importing {entry / A.TGZ} into the engine as {keyed}")
        docker.import_tgz(client, entry / A.TGZ, keyed, docker.config_changes(cfg))
    docker.tag(client, keyed, f"{r.image}:latest")
    return keyed


# -- app ----------------------------------------------------------------------------------------

GUEST_SCRIPTS = ("app-init.sh", "app-exit.sh")


def app_inputs(p: Project, r: Recipe) -> dict[str, Any]:
    """What the app stage writes into an image besides the image itself (its config is in the
    tgz entry): app.py's VERSION, the guest scripts and the static busybox our init runs on."""

    busybox = app_mod.HOST_BUSYBOX
    return {"app_py": app_mod.VERSION,
            "guest": {name: hashlib.sha256(app_mod.guest_script(name)).hexdigest() for name in GUEST_SCRIPTS},
            "busybox": hash_file(busybox) if busybox.is_file() else None}


def image_config(tgz_entry: Path) -> dict[str, Any]:
    """The image config the tgz stage recorded; {} for bootstrap recipes and imported archives."""
    f = tgz_entry / IMAGE_CONFIG
    return json.loads(f.read_text()) if f.is_file() else {}


def app(b: Build) -> None:
    """Resolve the image's app against its root filesystem (errors now, not at boot) and write
    app.json plus the files that run it, as a tar the ext4 stage lays over the image."""
    from pipeline import rootfs

    r = b.recipe
    tgz = b.inputs[A.TGZ]
    assert b.epoch is not None
    facts = rootfs.scan_rootfs(tgz)
    plan = app_mod.plan(image_config(tgz.parent), r.app, facts, hostname=r.name)
    log(f"{r.name}: {plan.describe()}")
    (b.out(A.APP)).write_text(json.dumps(plan.to_json(), indent=1, sort_keys=True) + "\n")
    files: tuple[app_mod.GuestFile, ...] = ()
    if plan.app is not None and plan.init is not None:
        busybox = app_mod.host_busybox() if plan.init is app_mod.InitKind.LDT else app_mod.HOST_BUSYBOX
        files = app_mod.guest_files(plan.app, plan.init, busybox)
    write_guest_tar(files, b.out(A.APP_FILES), mtime=b.epoch)


def write_guest_tar(files: Sequence[Any], out: Path, *, mtime: int) -> None:
    """app.GuestFile values as a tar owned by root (directories, files, symlinks)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.mtime, info.mode = mtime, f.mode & 0o7777
            if f.link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, f.link
                tar.addfile(info)
            elif stat.S_ISDIR(f.mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = f.source.read_bytes() if f.source is not None else f.data
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def current_plan(p: Project, name: str) -> Any:
    """The app.Plan of a recipe's current app entry (UserError when it has none yet)."""

    entry = p.store.current(name, A.APP)
    if entry is None:
        raise UserError(f"recipe '{name}' has no {A.APP} yet", hint=f"run `doit build_app:{name}`")
    return app_mod.Plan.from_json(json.loads((entry / A.APP).read_text()))


# -- image stages -------------------------------------------------------------------------------

DEFAULT_KERNEL_RECIPE = "virt"  # whose kernel boots images that have none


def kernel_recipe(p: Project, r: Recipe) -> str | None:
    """The recipe whose kernel, initrd and modules boot r; None: r's own. Own when [boot] kernel
    names a version or kernel_from names r itself; kernel_from's recipe when it names another;
    else own when the image has a kernel, DEFAULT_KERNEL_RECIPE when it has none."""
    if r.kernel_from is not None:
        return None if r.kernel_from == r.name else r.kernel_from
    if r.kernel is not None or r.name == DEFAULT_KERNEL_RECIPE:
        return None
    if current_plan(p, r.name).kernels:
        return None
    return DEFAULT_KERNEL_RECIPE


BORROWED = (A.KERNEL, A.INITRD, A.OS_RELEASE, A.TGZ)  # what the boot stage reads of the kernel recipe


def boot_key_inputs(p: Project, r: Recipe) -> dict[str, Any]:
    """A borrowed kernel: the kernel recipe's boot and tgz entries are inputs of the boot stage;
    and for an app on our init, what goes into our initrd."""

    k = kernel_recipe(p, r)
    if k is None:
        return verity_key_inputs(r)
    m: dict[str, Any] = {**verity_key_inputs(r), "kernel_from": {"recipe": k, "boot": p.store.current_key(k, A.KERNEL),
                                         "tgz": p.store.current_key(k, A.TGZ)}}
    if our_initrd(p, r, k):
        busybox = app_mod.HOST_BUSYBOX
        m["initrd"] = {"format": initramfs.APP_INITRD_FORMAT,
                       "init": hashlib.sha256(app_mod.guest_script(APP_INITRD_SCRIPT)).hexdigest(),
                       "busybox": hash_file(busybox) if busybox.is_file() else None,
                       "modules": [initramfs.APP_INITRD_MODULES, initramfs.APP_INITRD_MORE]}
        if r.verity:
            m["initrd"]["verity"] = {"modules": initramfs.VERITY_MODULES,
                                     "dmsetup": {name: hash_file(f) for f, name in dmsetup_files().items()}}
    return m


APP_INITRD_SCRIPT = "app-initrd.sh"  # the /init of our initrd (pipeline/guest/)


def our_initrd(p: Project, r: Recipe, kernel_from: str | None) -> bool:
    """An app that our init runs, on a borrowed kernel (kernel_from: kernel_recipe(p, r)), boots
    with our initrd (initramfs.app_initrd): the whole boot is ours, so no udev and no scripts,
    only the modules the VM needs."""

    return r.initrd and kernel_from is not None and current_plan(p, r.name).init is app_mod.InitKind.LDT


def boot_sources(p: Project, r: Recipe) -> list[str]:
    """doit's file_dep besides the needs: the kernel recipe's files, when one may be borrowed
    (ordering only; before the first app.json nobody knows, so the default recipe's are listed)."""
    try:
        k = kernel_recipe(p, r)
    except UserError:
        k = DEFAULT_KERNEL_RECIPE if r.kernel is None and r.kernel_from is None else None
    try:
        known = k is not None and k != r.name and p.recipe(k).bootable
    except UserError:
        known = False
    if not known:
        return []
    assert k is not None
    return [str(p.store.pointer(k, a)) for a in BORROWED if a is not A.INITRD or p.recipe(k).initrd]


def boot(b: Build) -> None:
    from pipeline import kernel, rootfs

    p, r = b.project, b.recipe
    k = kernel_recipe(p, r)
    if k is None:
        rootfs.extract_boot(b.inputs[A.TGZ], b.work, recipe=r.name, version=r.kernel, require_initrd=r.initrd)
        write_guest_tar((), b.out(A.MODULES), mtime=0)
        if r.verity:
            add_verity(b, r.name, b.inputs[A.TGZ])
        return
    files = {a: p.store.pointer(k, a).resolve() for a in BORROWED}
    ours = our_initrd(p, r, k)
    for a in (A.KERNEL, A.OS_RELEASE, *(() if ours else (A.INITRD,))):
        if files[a].is_file():
            link_or_copy(files[a], b.out(a))
    if r.initrd and not ours and not files[A.INITRD].is_file():
        raise UserError(f"recipe {r.name}: the kernel of recipe '{k}' boots without an initrd",
                        hint="set [boot] initrd = false, or use another kernel_from")
    version = kernel.release_of(files[A.KERNEL])
    if version is None:
        raise UserError(f"recipe {k}: {files[A.KERNEL]} is not an x86 bzImage", hint="use another kernel_from")
    count = rootfs.extract_modules(files[A.TGZ], version, b.out(A.MODULES), recipe=k)
    how = f"{k}'s initrd"
    if ours:
        size = write_app_initrd(b.out(A.MODULES), version, b.out(A.INITRD), kernel_recipe=k, verity=r.verity)
        how = f"our initrd ({size / MiB:.1f} MiB)"
    elif r.verity:
        add_verity(b, k, files[A.TGZ])
    log(f"{r.name}: no kernel of its own, booting {k}'s {version} ({count} entries of /lib/modules/{version})"
        f" with {how}")


VERITY_SCRIPTS = {"local-top": "verity-local-top.sh", "local-bottom": "verity-local-bottom.sh"}  # pipeline/guest/
VERITY_HINT = ("install dmsetup in the image (apt-get install dmsetup: initramfs-tools then puts it in the "
               "initrd), or set [disk] verity = false")


def verity_key_inputs(r: Recipe) -> dict[str, Any]:
    """What the boot stage adds to an initrd for [disk] verity: the scripts (their hashes)."""
    if not r.verity:
        return {}
    return {"verity": {phase: hashlib.sha256(app_mod.guest_script(name)).hexdigest()
                       for phase, name in VERITY_SCRIPTS.items()}}


def add_verity(b: Build, kernel_recipe: str, tgz: Path) -> None:
    """[disk] verity: the image's own initrd (initramfs-tools, with dmsetup) gets what opens the root
    through dm-verity appended (initramfs.verity_overlay: the scripts, dm-verity from the kernel's
    modules in `tgz`); the image itself is not changed. An initrd that cannot: one line, nothing stored."""
    from pipeline import kernel, rootfs
    r = b.recipe
    initrd = b.out(A.INITRD)
    version = kernel.release_of(b.out(A.KERNEL))
    if not initrd.is_file():
        raise UserError(f"recipe {r.name}: [disk] verity needs an initrd to open the root",
                        hint="set [boot] initrd = true, or [disk] verity = false")
    if version is None:
        raise UserError(f"recipe {kernel_recipe}: {b.out(A.KERNEL)} is not an x86 bzImage", hint=VERITY_HINT)
    data = initrd.read_bytes()
    with tempfile.TemporaryDirectory(prefix="ldt-verity-") as scratch:
        modules = Path(scratch) / A.MODULES
        rootfs.extract_modules(tgz, version, modules, recipe=kernel_recipe)
        with tarfile.open(modules) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str) -> bytes | None:
                m = members.get(f"lib/modules/{version}/{name}")
                f = tar.extractfile(m) if m is not None else None
                return f.read() if f is not None else None

            scripts = {phase: app_mod.guest_script(name) for phase, name in VERITY_SCRIPTS.items()}
            try:
                overlay = initramfs.verity_overlay(data, version, read, scripts)
            except ValueError as e:
                raise UserError(f"recipe {r.name}: [disk] verity: the initrd of {kernel_recipe} cannot open a "
                                f"dm-verity root: {e}", hint=VERITY_HINT) from None
    initrd.unlink()  # it may be a link to another entry's file: write a new one
    initrd.write_bytes(data + overlay)
    log(f"{r.name}: dm-verity opener added to the initrd ({len(overlay) / MiB:.1f} MiB)")


DMSETUP = Path("/usr/sbin/dmsetup")  # the build host's: our initrd runs it with its own libraries and loader
_LDD_PATH = re.compile(r"(/\S+) \(0x")


def dmsetup_files() -> dict[Path, str]:
    """{host file: its name in lib/ldt/dm/}: dmsetup, the libraries `ldd` says it links, and their
    loader as ld.so (the initrd runs `ld.so --library-path lib/ldt/dm dmsetup`, whatever libc the image has)."""
    if not DMSETUP.is_file():
        raise UserError(f"{DMSETUP} not found: [disk] verity on our initrd needs it", hint="install dmsetup")
    out = run(["ldd", DMSETUP], capture=True).stdout.decode()
    files = {DMSETUP: "dmsetup"}
    for lib in _LDD_PATH.findall(out):
        files[Path(lib)] = "ld.so" if Path(lib).name.startswith("ld-linux") else Path(lib).name
    if "ld.so" not in files.values():
        raise UserError(f"{DMSETUP}: ldd names no loader", hint="is it a dynamic x86-64 executable?")
    return files


def write_app_initrd(modules_tar: Path, version: str, out: Path, *, kernel_recipe: str, verity: bool = False) -> int:
    """Our initrd for an app on our init, from the borrowed kernel's modules; its size. With verity, dm-verity
    among the first modules and dmsetup (the host's, with its libraries) in it."""

    busybox = app_mod.host_busybox().read_bytes()
    first = (*initramfs.APP_INITRD_MODULES, *(initramfs.VERITY_MODULES if verity else ()))
    dm = {name: f.read_bytes() for f, name in dmsetup_files().items()} if verity else None
    with tarfile.open(modules_tar) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes | None:
            m = members.get(f"lib/modules/{version}/{name}")
            f = tar.extractfile(m) if m is not None else None
            return f.read() if f is not None else None

        try:
            data = initramfs.app_initrd(app_mod.guest_script(APP_INITRD_SCRIPT), busybox, read, first=first, dm=dm)
        except ValueError as e:
            raise UserError(f"recipe {kernel_recipe}: /lib/modules/{version}: {e}",
                            hint="its kernel package installs them with modules.dep; rebuild the kernel recipe") from e
    out.write_bytes(data)
    return len(data)


def ext4(b: Build) -> None:
    from pipeline import verity
    from pipeline.ext4 import Ext4Params, build_ext4

    r = b.recipe
    assert b.epoch is not None
    sizing: dict[str, Any] = {"headroom_bytes": r.headroom_mib * MiB}
    if r.size_mib:
        sizing["size_bytes"] = r.size_mib * MiB
    params = Ext4Params.for_key(b.key, epoch=b.epoch, label="root", **sizing)
    build_ext4(b.inputs[A.TGZ], b.out(A.EXT4), params, extra=(b.inputs[A.MODULES], b.inputs[A.APP_FILES]))
    if r.verity:  # the hash tree beside it, salt and UUID of the key: same tree and key, same root hash
        v = verity.format_verity(b.out(A.EXT4), b.work / verity.HASH_FILE, verity.VerityParams.from_key(b.key))
        (b.work / verity.INFO_FILE).write_text(v.to_json())
        log(f"{r.name}: dm-verity root hash {v.root_hash}")


def disk_cmdline(b: Build) -> list[str]:
    """The recipe's extra kernel command line, and what the app's init needs (init=/.ldt/init)."""

    plan = app_mod.Plan.from_json(json.loads(b.inputs[A.APP].read_text()))
    return [*plan.kernel_args.split(), *b.recipe.cmdline.split()]


def bios(b: Build) -> None:
    from pipeline import disk

    assert b.epoch is not None
    disk.build_bios_disk(b.inputs[A.KERNEL], b.input(A.INITRD), b.inputs[A.EXT4], b.out(A.BIOS_IMG), key=b.key,
                         epoch=b.epoch, extra_cmdline=disk_cmdline(b))


def uefi(b: Build) -> None:
    """The UEFI disk; with [boot] secure_boot its UKI signed with the db key (under a clock frozen at
    the epoch: reproducible), the certificates to enroll on its ESP, and beside it in the entry the
    sb_vars entry's variable store, the firmware it boots on (vm.machine() finds it there); with
    [disk] verity the root's hash tree (the ext4 entry's) as a third partition, its root hash on the
    UKI's command line."""
    from pipeline import disk, verity
    assert b.epoch is not None
    with tempfile.TemporaryDirectory(prefix="ldt-enroll-") as scratch:
        sign: disk.Signer | None = None
        esp_files: dict[str, Path] = {}
        if b.recipe.secure_boot:
            keys = sb.ensure_keys()
            sign = functools.partial(sb.sign, pair=keys.db, epoch=b.epoch)
            enroll = sb.enrollment_files(keys, Path(scratch), epoch=b.epoch)
            esp_files = {dest: enroll[name] for name, dest in sb.esp_enrollment_paths().items()}
            link_or_copy(b.inputs[A.SB_VARS], b.out(A.SB_VARS))
        ext4_entry = b.inputs[A.EXT4].parent  # [disk] verity: the hash tree and its facts are beside the root
        v = verity.Verity.from_json((ext4_entry / verity.INFO_FILE).read_text()) if b.recipe.verity else None
        disk.build_uefi_disk(b.inputs[A.KERNEL], b.input(A.INITRD), b.inputs[A.OS_RELEASE], b.inputs[A.EXT4],
                             b.out(A.UEFI_IMG), key=b.key, epoch=b.epoch, extra_cmdline=disk_cmdline(b),
                             sign=sign, esp_files=esp_files, verity=v,
                             hash_img=ext4_entry / verity.HASH_FILE if v else None)


# -- Secure Boot --------------------------------------------------------------------------------


def sb_prepare(p: Project, r: Recipe) -> None:
    """Before a signed stage's key: the keys, made in the per-user folder on the first signed build
    (never in cache/, never printed), and every pair checked."""
    if r.secure_boot:
        sb.ensure_keys()


def sb_fingerprints(p: Project, r: Recipe) -> dict[str, Any]:
    """What the uefi stage's key holds of the keys for a signed disk: the certificates' fingerprints
    (the ESP carries all three certificates; the db key signs). Nothing for an unsigned one."""
    return {"secure_boot": sb.fingerprints(sb.located())} if r.secure_boot else {}


def sb_vars_inputs(p: Project, r: Recipe) -> dict[str, Any]:
    """The sb_vars stage's key: the three certificates' fingerprints and OVMF's template (no recipe
    setting: every recipe signed with the same keys shares the entry)."""
    template = sb.OVMF_VARS_TEMPLATE
    return {"keys": sb.fingerprints(sb.located()),
            "template": hash_file(template) if template.is_file() else None}


def sb_vars(b: Build) -> None:
    sb.make_vars(sb.ensure_keys(), b.out(A.SB_VARS))


QCOW2_OF = {A.BIOS_IMG: A.BIOS_QCOW2, A.UEFI_IMG: A.UEFI_QCOW2}


def qcow2(b: Build) -> None:
    from pipeline import disk

    (raw,) = b.inputs
    disk.to_qcow2(b.inputs[raw], b.out(QCOW2_OF[raw]), compress=True)


def vmlinux(b: Build) -> None:
    from pipeline import kernel
    kernel.write_vmlinux(b.inputs[A.KERNEL], b.out(A.VMLINUX))


def fast_boot(b: Build) -> None:
    """virt boots a recipe through the initrd its kernel came with (virt-init.sh runs on that
    initrd's shell and modprobe): an app on our initrd gets its kernel recipe's. Which one that
    is, is in the boot entry's key, so this stage's key follows it."""
    initrd = b.inputs[A.INITRD]
    k = kernel_recipe(b.project, b.recipe)
    if k is not None and our_initrd(b.project, b.recipe, k):
        initrd = b.project.store.pointer(k, A.INITRD).resolve()
        if not initrd.is_file():
            raise UserError(f"recipe {b.recipe.name}: virt boots it through the initrd of its kernel recipe "
                            f"'{k}', which has none", hint=f"set [boot] initrd = true in recipes/{k}/recipe.toml")
    fast_boot_into(b.inputs[A.VMLINUX], initrd, b.work)


def fast_boot_into(kernel_image: Path, initrd: Path, work: Path) -> None:
    """virt's kernel and initrd: the kernel as kernel.write_vmlinux() leaves it (the vmlinux stage's
    output is linked as it is) and the initrd as one archive with only the modules virt loads.
    Whatever cannot be done (an unknown compression) keeps the original file: slower, same result."""
    from pipeline import kernel

    start = time.monotonic()
    kernel.write_vmlinux(kernel_image, work / A.FAST_KERNEL)
    try:
        (work / A.FAST_INITRD).write_bytes(initramfs.slim_initrd(initrd.read_bytes()))
    except (ValueError, OSError, EOFError, UserError) as e:
        if verbose():
            log(f"virt: booting the original initrd ({e})")
        link_or_copy(initrd, work / A.FAST_INITRD)
    if verbose():  # virt's own stderr is the command's: quiet unless asked
        log(f"virt: prepared the fast-boot kernel and initrd in {time.monotonic() - start:.1f}s")
