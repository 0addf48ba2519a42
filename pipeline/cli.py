"""Console scripts: the stage commands for files and folders outside recipes/, virt and suco.

Each is a thin wrapper over the same stage functions as the doit tasks, writes to the same
cache (the project's cache/, or $LDT_ROOT/cache) and prints where its output is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import access, builders, rootfs_import, stages, vm
from pipeline.artifacts import Artifact
from pipeline.entrypoint import entry_point
from pipeline.errors import UserError
from pipeline.notices import first_time
from pipeline.project import Project
from pipeline.qemu import Mode
from pipeline.recipes import Recipe

A = Artifact


def project_root() -> Path:
    """The project this package belongs to (an editable install), or $LDT_ROOT."""
    return Path(os.environ.get("LDT_ROOT") or Path(__file__).resolve().parent.parent)


def vm_options(parser: argparse.ArgumentParser, *, cmdline: bool) -> None:
    parser.add_argument("--memory", default="1G", help="guest memory (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default: %(default)s)")
    if cmdline:
        parser.add_argument("--cmdline", default="", help="extra kernel command line")
    parser.add_argument("--forward", default="", help="host port forwards HOST:GUEST[,HOST:GUEST]")
    parser.add_argument("--no-net", dest="net", action="store_false", help="no network")
    parser.add_argument("--persist", default="", metavar="FILE",
                        help="keep changes in FILE (a copy made on first use) instead of a throwaway snapshot")
    parser.add_argument("--accel", default="", choices=["", "kvm", "tcg", "auto"],
                        help="accelerator (default: $LDT_ACCEL or auto: KVM when it works)")


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The tool's arguments; its --help says what it needs of the host (root, the Docker socket,
    /dev/kvm), and before any work it says once what is missing or not needed (access.py)."""
    ap.description = f"{ap.description} {access.help_sentence(ap.prog)}"
    args = ap.parse_args(argv)
    cache = Project(project_root()).store.root
    access.announce(ap.prog, seen=cache / "notices" if os.access(cache, os.W_OK) else None)
    return args


def _run_options(args: argparse.Namespace) -> vm.RunOptions:
    return vm.RunOptions(memory=args.memory, cpus=args.cpus, cmdline=getattr(args, "cmdline", ""),
                         forward=args.forward, net=args.net, persist=args.persist, accel=args.accel)


def _booted(status: int) -> int:
    if status != 0:
        raise UserError(f"qemu exited with status {status}")
    return 0


def _say(what: str, path: Path) -> None:
    print(f"{what}: {path}")


def _from_tgz(tgz: Path, *artifacts: Artifact) -> tuple[Project, Recipe]:
    """Import a tgz into the store and run the stages that make `artifacts` on it (each cached)."""
    r = rootfs_import.adhoc_recipe(tgz, "tgz")
    p = Project(project_root(), extra=(r,))
    rootfs_import.import_tgz(p, tgz.resolve(), r)
    _materialize(p, r, artifacts)
    return p, r


def _materialize(p: Project, r: Recipe, artifacts: tuple[Artifact, ...]) -> None:
    """The stages after the import (its tgz is the import's) that make `artifacts`, in order."""
    for stage in stages.chain(r, artifacts):
        if stage.name != "tgz":
            stages.materialize(p, r, stage)


# -- build-tgz DIR ------------------------------------------------------------------------------


def build_tgz_main(argv: Sequence[str] | None) -> int:
    """build-tgz DIR: a Dockerfile folder -> cached rootfs tgz."""
    from pipeline import recipes

    ap = argparse.ArgumentParser(prog="build-tgz", description="Build a Dockerfile folder into a cached rootfs tgz "
                                 "(docker build + export); prints the tgz's path.")
    ap.add_argument("dir", type=Path, help="a folder with a Dockerfile (the build context)")
    args = parse(ap, argv)
    if recipes.build_file(args.dir) is None:  # a Containerfile is a Dockerfile too; both: an error
        raise UserError(f"{args.dir}: no Dockerfile", hint="give a folder holding a Dockerfile (or Containerfile)")
    r = recipes.load(args.dir.resolve())
    p = Project(project_root(), extra=(r,))
    stages.materialize(p, r, stages.STAGE["tgz"])
    _say("rootfs tgz", p.store.pointer(r.name, Artifact.TGZ).resolve())
    return 0


# -- build-syslinux-bios / build-efistub FILE.tgz -----------------------------------------------


def _build_disk(prog: str, description: str, mode: Mode, what: str, argv: Sequence[str] | None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("tgz", type=Path)
    args = parse(ap, argv)
    p, r = _from_tgz(args.tgz, mode.disk)
    _say(what, p.store.pointer(r.name, mode.disk).resolve())
    return 0


def build_bios_main(argv: Sequence[str] | None) -> int:
    """build-syslinux-bios FILE.tgz: a BIOS-bootable raw disk image (Syslinux, MBR)."""
    return _build_disk("build-syslinux-bios", "Make a Syslinux BIOS disk image from a rootfs tgz (kernel and initrd "
                       "from its /boot); prints the image's path.", Mode.BIOS, "BIOS disk image", argv)


def build_efistub_main(argv: Sequence[str] | None) -> int:
    """build-efistub FILE.tgz: a UEFI-bootable raw GPT disk image (ESP with a UKI)."""
    return _build_disk("build-efistub", "Make a UEFI disk image (GPT, ESP with a unified kernel image) from a "
                       "rootfs tgz; prints the image's path.", Mode.UEFI, "UEFI disk image", argv)


# -- run-tgz FILE.tgz, run-dir DIR, run-bios IMG, run-uefi IMG --------------------------------


def run_tgz_main(argv: Sequence[str] | None) -> int:
    """run-tgz FILE.tgz: boot a rootfs tgz with -kernel/-initrd on this terminal."""
    ap = argparse.ArgumentParser(prog="run-tgz", description="Boot a rootfs tgz (its kernel and initrd, an ext4 root "
                                 "made from it, cached) with the serial console on this terminal.")
    ap.add_argument("tgz", help="a rootfs tgz, or oci://HOST/REPO:TAG of a published image")
    vm_options(ap, cmdline=True)
    args = parse(ap, argv)
    p, r = _from_tgz(_file_or_pulled(args.tgz, Artifact.TGZ), *Mode.TGZ.needs(initrd=True))
    _say("root image", p.store.pointer(r.name, Artifact.EXT4).resolve())
    return _booted(vm.run_recipe(p, r, Mode.TGZ, _run_options(args)))


def run_dir_main(argv: Sequence[str] | None) -> int:
    """run-dir DIR: boot a root filesystem folder (kernel and initrd in DIR/boot)."""
    ap = argparse.ArgumentParser(prog="run-dir", description="Boot a folder holding a root filesystem, with its "
                                 "kernel and initrd in DIR/boot (as mmdebstrap leaves it): the folder becomes a "
                                 "cached ext4 image keyed by its content and boots like run-tgz.")
    ap.add_argument("dir", type=Path)
    vm_options(ap, cmdline=True)
    ap.add_argument("--check", action="store_true", help="no console: check_boot's boot matrix (every mode "
                    "headless to the marker) and its table")
    ap.add_argument("--marker", default=None, metavar="REGEX", help="what --check waits for (default: a login prompt)")
    args = parse(ap, argv)
    tree = args.dir.resolve()
    if not tree.is_dir():
        raise UserError(f"{args.dir}: not a folder", hint="give a root filesystem folder")
    r = rootfs_import.adhoc_recipe(tree, "dir")
    r = dataclasses.replace(r, boot_marker=args.marker) if args.marker else r
    p = Project(project_root(), extra=(r,))
    rootfs_import.import_tree(p, tree, r)
    if args.check:  # the tree as a recipe: the same stages and boot matrix as `doit check_boot:NAME`
        _materialize(p, r, tuple(dict.fromkeys(a for m in Mode for a in m.needs(initrd=r.initrd))))
        vm.check_boot(p, r)
        return 0
    _materialize(p, r, Mode.TGZ.needs(initrd=r.initrd))
    _say("root image", p.store.pointer(r.name, Artifact.EXT4).resolve())
    return _booted(vm.run_recipe(p, r, Mode.TGZ, _run_options(args)))


def _run_image(mode: Mode, prog: str, argv: Sequence[str] | None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=f"Boot a raw or qcow2 disk image on "
                                 f"{mode.firmware}, serial console on this "
                                 f"terminal; the image is not changed (throwaway snapshot) unless --persist.")
    ap.add_argument("image", help="a raw or qcow2 disk image, or oci://HOST/REPO:TAG of a published image")
    vm_options(ap, cmdline=False)
    args = parse(ap, argv)
    image = _file_or_pulled(args.image, mode.disk)
    if not image.is_file():
        raise UserError(f"{image}: no such disk image", hint="build one with build-syslinux-bios or build-efistub")
    o = _run_options(args)
    return _booted(vm.boot_interactive(Project(project_root()), mode, vm.Boot(image.resolve()), o,
                                       memory=o.memory, cpus=o.cpus))


def _file_or_pulled(arg: str, artifact: Artifact) -> Path:
    """A path as given, or for oci://… the artifact's file in the pulled (verified, cached) image."""
    if not arg.startswith("oci"):
        return Path(arg)
    from pipeline import publish

    f = publish.pull_published(Project(project_root()), arg) / artifact
    if not f.is_file():
        raise UserError(f"{arg} holds no {artifact}", hint="publish the recipe with its disk images built")
    return f


def run_bios_main(argv: Sequence[str] | None) -> int:
    """run-bios IMG: boot a BIOS disk image on SeaBIOS."""
    return _run_image(Mode.BIOS, "run-bios", argv)


def run_uefi_main(argv: Sequence[str] | None) -> int:
    """run-uefi IMG: boot a UEFI disk image on OVMF."""
    return _run_image(Mode.UEFI, "run-uefi", argv)


# -- virt -------------------------------------------------------------------------------------

VIRT_IMAGE = "virt"  # the built-in recipe: recipes/virt


def virt_main(argv: Sequence[str] | None) -> int:
    """virt [options] -- CMD ARGS...: CMD as root in a throwaway VM, the current folder at /work."""
    from pipeline import virt
    from pipeline.qemu import Accel

    ap = argparse.ArgumentParser(prog="virt", description="Run CMD as root in a throwaway VM that sees the current "
                                 "folder at /work (read-write, 9p) and nothing else of the host; exits with CMD's "
                                 "status (124 on timeout). The kernel and userspace come from a recipe's image.")
    ap.add_argument("--image", default=VIRT_IMAGE, metavar="RECIPE",
                    help="the recipe whose kernel and root filesystem to boot (default: %(default)s)")
    ap.add_argument("--kernel", type=Path, help="boot these files instead of a recipe's (all three needed)")
    ap.add_argument("--initrd", type=Path)
    ap.add_argument("--rootfs", type=Path, help="an ext4 root filesystem image")
    ap.add_argument("--memory", type=int, default=virt.VirtOptions.memory, help="MiB (default: %(default)s)")
    ap.add_argument("--cpus", type=int, default=virt.VirtOptions.cpus, help="(default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds; exit status 124 when exceeded")
    ap.add_argument("--net", action="store_true", help="user-mode networking (default: no network)")
    ap.add_argument("--ro", action="store_true", help="a read-only /work")
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"], help="(default: $LDT_ACCEL or auto)")
    ap.add_argument("--cold", action="store_true", help="boot the VM instead of resuming a saved post-boot one")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parse(ap, argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (virt [options] -- CMD ARGS...)")
    try:
        workdir = Path.cwd()
    except FileNotFoundError:
        raise UserError("the current folder does not exist", hint="cd into the folder to share") from None
    options = virt.VirtOptions(memory=args.memory, cpus=args.cpus, timeout=args.timeout, net=args.net, ro=args.ro,
                               accel=Accel.parse(args.accel, origin="--accel"), cold=args.cold)
    p = Project(project_root())
    explicit = (args.kernel, args.initrd, args.rootfs)
    if any(explicit):
        if not all(explicit):
            ap.error("--kernel, --initrd and --rootfs go together")
        kernel, initrd, rootfs = explicit
    else:
        r = p.recipe(args.image)
        # the graph's own up-to-date checks, in this process: no doit start-up on the fast path
        if not all(stages.up_to_date(p, x, s) for s, x in _virt_stages(p, r)):
            run_doit(p, [f"{task}:{r.name}" for task in dict.fromkeys(stages.MAKER[a].task for a in VIRT_FILES)])
        kernel, initrd, rootfs = (p.store.pointer(r.name, a) for a in VIRT_FILES)
    writable = os.access(p.store.root, os.W_OK)
    if any(explicit) and writable:
        kernel, initrd = stages.fast_boot_files(p, kernel, initrd)
    cache = p.store.root if writable else None  # another user's checkout: the probe is not remembered
    return virt.run_virt(command, kernel=kernel, initrd=initrd, rootfs=rootfs, workdir=workdir, options=options,
                         cache_dir=cache)


VIRT_FILES = (Artifact.FAST_KERNEL, Artifact.FAST_INITRD, Artifact.EXT4)  # what virt boots of a recipe


def _virt_stages(p: Project, r: Recipe) -> list[tuple[stages.Stage, Recipe]]:
    """Every stage virt's files of r come from: the tgz of each recipe it builds FROM, then its own."""
    from pipeline import recipes

    tgz = stages.STAGE["tgz"]
    return [*((tgz, p.recipe(a)) for a in recipes.ancestors(p.recipes, r.name)),
            *((s, r) for s in stages.chain(r, VIRT_FILES))]


# -- suco -------------------------------------------------------------------------------------

SUCO_NOTICE = ("suco: this runs CMD as root in a privileged container: NOT a security boundary "
               "(it can reach the host's devices and kernel); use virt for isolation")


def suco_main(argv: Sequence[str] | None) -> int:
    """suco [--image RECIPE] CMD...: CMD as root in a privileged container, the current folder at /work."""
    ap = argparse.ArgumentParser(prog="suco", description="Like sudo, but CMD runs as root in a --privileged "
                                 "--cap-add SYS_ADMIN container of a recipe's image, with the current folder at "
                                 "/work; the exit status is passed back. " + SUCO_NOTICE.removeprefix("suco: "))
    ap.add_argument("--image", default="debian-bookworm", help="recipe whose image to use (default: %(default)s)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = parse(ap, argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")
    from pipeline import docker

    p = Project(project_root())
    p.recipe(args.image)  # an unknown recipe: one line listing the known ones
    _notice_once(p)
    run_doit(p, [f"build_tgz:{args.image}"])  # its output goes to stderr, never into CMD's stdout
    client = docker.client()
    image = builders.ensure_image(p, client, args.image)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    with _raw_terminal(tty):
        return docker.run_privileged(client, image, cmd, Path.cwd(), tty=tty)


def _notice_once(p: Project) -> None:
    if first_time(p.store.root / "notices", SUCO_NOTICE):
        print(SUCO_NOTICE, file=sys.stderr)


@contextlib.contextmanager
def _raw_terminal(enabled: bool):
    if not enabled:
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the doit graph from a command ----------------------------------------------------------


def run_doit(p: Project, tasks: list[str]) -> None:
    """Bring tasks of the project's graph up to date (doit's own checks: quick when nothing changed).

    doit's report goes to stderr, so it never mixes with a command's stdout."""
    from pipeline.run import run

    # executed-only: nothing at all is printed when everything is up to date
    proc = run([sys.executable, "-m", "doit", "-f", p.root / "dodo.py", "--dir", p.root, "--reporter",
                "executed-only", *tasks], check=False, stdout=sys.stderr.fileno())
    if proc.returncode != 0:
        raise UserError(f"building {', '.join(tasks)} failed (see above)")


build_tgz = entry_point(build_tgz_main)
build_syslinux_bios = entry_point(build_bios_main)
build_efistub = entry_point(build_efistub_main)
run_tgz = entry_point(run_tgz_main)
run_dir = entry_point(run_dir_main)
run_bios = entry_point(run_bios_main)
run_uefi = entry_point(run_uefi_main)
suco = entry_point(suco_main)
virt = entry_point(virt_main)
