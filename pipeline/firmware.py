"""What QEMU runs on this host: the qemu binary and its firmware (OVMF for UEFI, with a fresh
copy of its variable store per run; OVMF's Secure Boot build for signed disks, over the variable
store with the user's keys enrolled (secureboot.make_vars); and qboot for virt's -kernel boots).

Look-ups only: each says what to install when something is missing (a UserError), or, for
the optional qboot, returns None.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.qemu import QEMU

QEMU_HINT = "apt install qemu-system-x86 (or run ./setup.sh)"
OVMF_HINT = "apt install ovmf"

OVMF_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian ≥ 12, Ubuntu
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),  # Debian ≤ 11 (2M build)
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),  # Arch
)
SECBOOT_CODE_CANDIDATES = (
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",  # Debian ≥ 12, Ubuntu (SMM required)
    "/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd",  # Fedora
    "/usr/share/edk2/x64/OVMF_CODE.secboot.4m.fd",  # Arch
)
QBOOT_CANDIDATES = ("/usr/share/qemu/qboot.rom", "/usr/share/qemu-firmware/qboot.rom", "/usr/share/qboot/bios.bin")


@dataclass(frozen=True)
class Ovmf:
    """A matching pair of OVMF firmware files (the 2M and 4M builds must not be mixed)."""

    code: Path
    vars_template: Path
    secure: bool = False  # the Secure Boot build: q35 with SMM, its flash writable only from SMM




def find_qemu(name: str = QEMU) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"{name} not found", hint=QEMU_HINT)
    return path


def find_ovmf(candidates: Sequence[tuple[str, str]] = OVMF_CANDIDATES) -> Ovmf:
    """The first installed OVMF code/vars pair (non-secure-boot build, no SMM needed)."""
    for code, vars_template in candidates:
        if os.path.isfile(code) and os.path.isfile(vars_template):
            return Ovmf(Path(code), Path(vars_template))
    raise UserError("OVMF (UEFI firmware for QEMU) not found", hint=OVMF_HINT)


def find_secboot_ovmf(vars_template: Path, candidates: Sequence[str] = SECBOOT_CODE_CANDIDATES) -> Ovmf:
    """OVMF's Secure Boot build with `vars_template`, a variable store with keys enrolled and
    Secure Boot on (the sb_vars stage's); it enforces signatures on every image it starts."""
    code = next((Path(c) for c in candidates if os.path.isfile(c)), None)
    if code is None:
        raise UserError("OVMF's Secure Boot build (OVMF_CODE_4M.secboot.fd) not found", hint=OVMF_HINT)
    if not vars_template.is_file():
        raise UserError(f"Secure Boot variable store {vars_template} not found",
                        hint="build it again (doit build_efistub:<recipe>)")
    return Ovmf(code, vars_template, secure=True)


def fresh_ovmf_vars(ovmf: Ovmf, directory: Path) -> Path:
    """A writable copy of the VARS template for one run (the template itself stays pristine)."""
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / "OVMF_VARS.fd"
    shutil.copyfile(ovmf.vars_template, dest)
    return dest


def find_qboot(candidates: Sequence[str] = QBOOT_CANDIDATES) -> Path | None:
    """qboot, the minimal firmware for -kernel boots (≈0.3 s faster than SeaBIOS), if installed."""
    return next((Path(c) for c in candidates if os.path.isfile(c)), None)
