"""mmdebstrap command lines, built in one place by pure functions: the tar stream of a bootstrap
recipe (tgz.bootstrap) and debian-install's bootable tree (install.py)."""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.recipes import Bootstrap


class PrivilegeMode(enum.StrEnum):
    """mmdebstrap's --mode: root when we are root, else a user namespace."""

    ROOT = "root"
    UNSHARE = "unshare"

    @classmethod
    def for_uid(cls, uid: int) -> PrivilegeMode:
        return cls.ROOT if uid == 0 else cls.UNSHARE


def command(*, suite: str, target: str | Path, mirror: str, variant: str, packages: Sequence[str] = (),
            mode: PrivilegeMode | None = None, tar: bool = False, quiet: bool = False,
            customize_hooks: Sequence[str] = ()) -> list[str]:
    """mmdebstrap making `target` (a folder, or "-" for a tar on stdout when tar=True)."""
    cmd = ["mmdebstrap"]
    if mode is not None:
        cmd.append(f"--mode={mode}")
    cmd.append(f"--variant={variant}")
    if tar:
        cmd.append("--format=tar")
    if quiet:
        cmd.append("--quiet")
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [f"--customize-hook={hook}" for hook in customize_hooks]
    return [*cmd, suite, os.fspath(target), mirror]


def tar_cmd(b: Bootstrap) -> list[str]:
    """A bootstrap recipe's root filesystem as an uncompressed tar on stdout."""
    return command(suite=b.suite, target="-", mirror=b.mirror, variant=b.variant, packages=b.packages,
                   tar=True, quiet=True)


def unshare_helper_cmd(cmd: Sequence[str], shifted: bool) -> list[str]:
    """cmd reading a tree made rootless, through the user namespace that sees its real owners."""
    return ["mmdebstrap", "--unshare-helper", *cmd] if shifted else list(cmd)
