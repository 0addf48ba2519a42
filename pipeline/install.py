"""debian-install DIR: a bootable Debian tree in a folder (kernel and initrd in DIR/boot), made
with mmdebstrap; `run-dir DIR` boots it.

Rootless when not root: mmdebstrap's unshare mode (a user namespace mapped through the
user's /etc/subuid and /etc/subgid ranges); as root its root mode. access.announce() says
which, and where the kernel or the user's setup does not allow unshare, the one-line fix.

Seen from outside the user namespace, a tree made rootless is owned by the user's sub-ids,
as mmdebstrap documents; `mmdebstrap --unshare-helper CMD` sees it with its real owners
(mmdebstrap.unshare_helper_cmd). As root the tree has its real owners.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import access, mmdebstrap
from pipeline.entrypoint import entry_point
from pipeline.errors import UserError
from pipeline.kernel import choose_version
from pipeline.mmdebstrap import PrivilegeMode
from pipeline.recipes import VARIANTS
from pipeline.run import Step, run

TOOL = "debian-install"
BOOTABLE = ("linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev")  # always installed
PASSWORDLESS_ROOT = 'chroot "$1" passwd -d root'  # a login on the serial console, like the hello recipe


@dataclass(frozen=True)
class Install:
    """What to install: the command line's options."""

    suite: str = "bookworm"
    variant: str = "minbase"
    include: tuple[str, ...] = ()  # on top of BOOTABLE
    mirror: str = "http://deb.debian.org/debian"

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*BOOTABLE, *self.include)))


def mmdebstrap_install_cmd(spec: Install, target: Path, mode: PrivilegeMode) -> list[str]:
    """mmdebstrap making a bootable tree in `target` (a new or empty folder)."""
    return mmdebstrap.command(suite=spec.suite, target=target, mirror=spec.mirror, variant=spec.variant,
                              packages=spec.packages, mode=mode, customize_hooks=(PASSWORDLESS_ROOT,))


def parse_include(text: str) -> tuple[str, ...]:
    """'vim, openssh-server' -> ('vim', 'openssh-server'); a bad package name is a UserError."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.\-]+(:[a-z0-9]+)?(=[^,\s]+)?", n):
            raise UserError(f"--include: '{n}' is not a Debian package name", hint="e.g. --include vim,openssh-server")
    return names


def check_target(target: Path) -> None:
    """An install tree goes into a new or an empty folder (debian-install and arch-install)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: exists and is not an empty folder", hint="give a new or an empty folder")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such folder", hint="create it first, or give another DIR")


def kernels_with_initrd(target: Path, initrd: Callable[[str], str]) -> list[str]:
    """NAME of each DIR/boot/vmlinuz-NAME whose initrd (DIR/boot/initrd(NAME)) is there, sorted."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (target / "boot").glob("vmlinuz-*"))
    return [k for k in kernels if (target / "boot" / initrd(k)).exists()]


def kernel_of(target: Path) -> str:
    """The kernel version the tree boots (DIR/boot/vmlinuz-* with its initrd), or a UserError."""
    with_initrd = kernels_with_initrd(target, lambda k: f"initrd.img-{k}")
    if not with_initrd:
        raise UserError(f"{target}/boot: mmdebstrap finished without a kernel and initrd",
                        hint="keep linux-image-amd64 and initramfs-tools in the package set")
    best = choose_version(with_initrd, None)
    assert best is not None
    return best


def debian_install(spec: Install, target: Path, uid: int | None = None) -> str:
    """Make the tree; returns its kernel version."""
    if not shutil.which("mmdebstrap"):
        raise UserError("mmdebstrap not found", hint="`sudo apt-get install mmdebstrap` (or run ./setup.sh)")
    check_target(target)
    mode = PrivilegeMode.for_uid(os.geteuid() if uid is None else uid)
    with Step(f"{TOOL}: Debian {spec.suite} into {target} (mmdebstrap --mode={mode})"):
        run(mmdebstrap_install_cmd(spec, target, mode))
    return kernel_of(target)


def debian_install_main(argv: Sequence[str] | None) -> int:
    """debian-install DIR: a bootable Debian tree in DIR, made with mmdebstrap (rootless when not root)."""
    ap = argparse.ArgumentParser(
        prog=TOOL, description="Install a bootable Debian (kernel and initrd in DIR/boot, systemd, a login on the "
        "serial console as root without a password) into DIR with mmdebstrap; boot it with `run-dir DIR`. "
        + access.help_sentence(TOOL))
    ap.add_argument("dir", type=Path, help="a new or empty folder")
    ap.add_argument("--suite", default=Install.suite, help="Debian release (default: %(default)s)")
    ap.add_argument("--variant", default=Install.variant, choices=VARIANTS, metavar="V",
                    help="mmdebstrap variant (default: %(default)s)")
    ap.add_argument("--include", default="", metavar="PKG,…",
                    help=f"more packages, comma-separated (always: {', '.join(BOOTABLE)})")
    ap.add_argument("--mirror", default=Install.mirror, metavar="URL", help="(default: %(default)s)")
    args = ap.parse_args(argv)
    access.announce(TOOL)
    spec = Install(suite=args.suite, variant=args.variant, include=parse_include(args.include), mirror=args.mirror)
    target = args.dir.absolute()
    kernel = debian_install(spec, target)
    print(f"Debian {spec.suite} in {target} (kernel {kernel}; root has no password); boot it: run-dir {args.dir}")
    return 0


main = entry_point(debian_install_main)

if __name__ == "__main__":
    main()
