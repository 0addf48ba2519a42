"""Starting QEMU: accelerator choice, pure command-line builders, and the two ways to run a VM.

Reading order: the closed choices (Mode, DiskBus, Accel) → VmSettings → qemu_cmd(), the pure
builder tests assert on → host look-ups (find_qemu, find_ovmf) → the KVM probe and
select_accel() → the executors run_interactive() and boot_to_marker().

Everything that starts a process goes through pipeline.run.spawn()/run(). Imports stay
stdlib-only and the heavier ones (socket, selectors, tempfile, termios) are local to the
executors, so `import pipeline.qemu` is cheap on the `doit run_*` path.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from pipeline.artifacts import Artifact
from pipeline.errors import UserError
from pipeline.files import write_atomic
from pipeline.run import Cmd, argv, log, run, spawn

QEMU = "qemu-system-x86_64"
QEMU_HINT = "apt install qemu-system-x86 (or run ./setup.sh)"
OVMF_HINT = "apt install ovmf"
ACCEL_ENV = "LDT_ACCEL"
DRIVE_ID = "disk0"
QUIT_KEYS = "Ctrl-A X"
MIN_MEMORY_MIB = 256  # a Debian kernel with an initramfs-tools initrd runs out of memory below this

# A serial getty starts a line with "<hostname> login: " and no newline; kernel messages may
# follow on the same line, so the prompt is matched at the start of a line, not at its end.
LOGIN_PROMPT = re.compile(r"^(?!Last login)(?:[\w.-]+ )?login: ")


# ── closed choices ──────────────────────────────────────────────────────────────────────


class Mode(enum.StrEnum):
    """How the VM boots: straight into a kernel, or from a whole disk through firmware. Each
    mode knows what it boots, what it needs built, its firmware and its doit run task."""

    TGZ = "tgz"  # -kernel/-initrd/-append, the ext4 root image as a plain disk
    BIOS = "bios"  # raw MBR disk with Syslinux, SeaBIOS
    UEFI = "uefi"  # raw GPT disk with an ESP, OVMF in pflash

    @property
    def machine(self) -> str:
        return "q35"

    @property
    def direct_kernel(self) -> bool:
        return self is Mode.TGZ

    @property
    def needs_ovmf(self) -> bool:
        return self is Mode.UEFI

    @property
    def firmware(self) -> str:
        return "OVMF (UEFI)" if self is Mode.UEFI else "SeaBIOS"

    @property
    def disk(self) -> Artifact:
        """The artifact the VM's disk is."""
        return {Mode.TGZ: Artifact.EXT4, Mode.BIOS: Artifact.BIOS_IMG, Mode.UEFI: Artifact.UEFI_IMG}[self]

    def needs(self, *, initrd: bool) -> tuple[Artifact, ...]:
        """Every artifact a boot in this mode reads (app.json: the app's init and ports)."""
        if self is Mode.TGZ:
            return (Artifact.VMLINUX, *((Artifact.INITRD,) if initrd else ()), Artifact.EXT4, Artifact.APP)
        return (self.disk, Artifact.APP)

    @property
    def run_task(self) -> str:
        return f"run_{self.value}"

    @property
    def doc(self) -> str:
        return {
            Mode.TGZ: "Boot with qemu -kernel/-initrd and the ext4 root, serial console on this terminal",
            Mode.BIOS: "Boot the Syslinux disk on SeaBIOS, serial console on this terminal",
            Mode.UEFI: "Boot the UEFI disk on OVMF (q35), serial console on this terminal",
        }[self]


class DiskBus(enum.StrEnum):
    """Which controller the guest sees its disk on (virtio is the fast default)."""

    VIRTIO = "virtio"
    SATA = "sata"
    NVME = "nvme"
    USB = "usb"

    def device_args(self, drive: str, *, boot: bool) -> list[str]:
        """`boot`: firmware boots from this disk (with -kernel, bootindex 0 is QEMU's)."""
        index = ",bootindex=0" if boot else ""
        if self is DiskBus.VIRTIO:
            return ["-device", f"virtio-blk-pci,drive={drive}{index}"]
        if self is DiskBus.SATA:  # q35's built-in AHCI controller is bus ide.0…ide.5
            return ["-device", f"ide-hd,drive={drive},bus=ide.0{index}"]
        if self is DiskBus.NVME:
            return ["-device", f"nvme,drive={drive},serial=ldt-{drive}{index}"]
        return [
            "-device", "qemu-xhci,id=xhci",
            "-device", f"usb-storage,bus=xhci.0,drive={drive}{index}",
        ]  # fmt: skip

    @property
    def root_device(self) -> str:
        """The guest's name for the first disk on this bus (for root= in tgz mode)."""
        return {
            DiskBus.VIRTIO: "/dev/vda",
            DiskBus.SATA: "/dev/sda",
            DiskBus.NVME: "/dev/nvme0n1",
            DiskBus.USB: "/dev/sda",
        }[self]


class Accel(enum.StrEnum):
    """The accelerator; AUTO is resolved by select_accel() before building a command."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    def qemu_args(self, cpus: int = 1) -> list[str]:
        if self is Accel.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        if self is Accel.TCG:  # one host thread per vCPU; `max` enables every emulated feature
            return ["-accel", "tcg,thread=multi" if cpus > 1 else "tcg", "-cpu", "max"]
        raise ValueError("Accel.AUTO must be resolved with select_accel() before building a command")

    @classmethod
    def parse(cls, value: str, *, origin: str) -> Accel:
        try:
            return cls(value.strip().lower() or "auto")
        except ValueError:
            choices = ", ".join(a.value for a in cls)
            raise UserError(
                f"{origin}={value!r} is not an accelerator", hint=f"use one of: {choices}"
            ) from None


# ── settings ────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class VmSettings:
    """Everything about the VM that is not the boot mode or the artifacts it boots.

    snapshot=True (the default) opens the disk with snapshot=on: guest writes go to a
    throwaway overlay, so a cached artifact never changes. For a persistent VM pass
    snapshot=False *and* a writable copy or overlay (".qcow2") as the disk.
    """

    memory_mib: int = 2048
    cpus: int = 2
    accel: Accel = Accel.AUTO
    network: bool = True
    port_forwards: tuple[tuple[int, int], ...] = ()  # (host port, guest port), TCP on 127.0.0.1
    kernel_args: str = ""  # appended to the kernel command line (tgz mode only)
    snapshot: bool = True
    interactive: bool = False  # serial console on this terminal (Ctrl-A X quits)
    disk_bus: DiskBus = DiskBus.VIRTIO
    console_log: Path | None = None  # interactive: a copy of the console in this file (an app's exit line)

    def __post_init__(self) -> None:
        # accept [(2222, 22)] too; stored as a tuple so settings stay hashable
        object.__setattr__(self, "port_forwards", tuple((int(h), int(g)) for h, g in self.port_forwards))
        if self.memory_mib < MIN_MEMORY_MIB:
            raise UserError(f"VM memory {self.memory_mib} MiB is too small", hint=f"use at least {MIN_MEMORY_MIB} MiB")
        if self.cpus < 1:
            raise UserError(f"VM cpus must be at least 1, not {self.cpus}")
        for host, guest in self.port_forwards:
            if not (0 < host < 65536 and 0 < guest < 65536):
                raise UserError(f"bad port forward {host}->{guest}", hint="ports are 1…65535")
        if self.port_forwards and not self.network:
            raise UserError("port forwards need the network", hint="drop network=False")

    def with_accel(self, accel: Accel) -> VmSettings:
        return replace(self, accel=accel)


@dataclass(frozen=True)
class Ovmf:
    """A matching pair of OVMF firmware files (the 2M and 4M builds must not be mixed)."""

    code: Path
    vars_template: Path


# ── the pure builders ───────────────────────────────────────────────────────────────────


def qemu_opt(value: str | os.PathLike[str]) -> str:
    """Escape a value inside a -drive/-device option list (QEMU doubles commas)."""
    return os.fspath(value).replace(",", ",,")


def disk_format(disk: Path) -> str:
    return "qcow2" if disk.suffix == ".qcow2" else "raw"


def drive_args(disk: Path, settings: VmSettings, *, boot: bool, drive: str = DRIVE_ID) -> list[str]:
    opts = [f"if=none,id={drive},file={qemu_opt(disk)},format={disk_format(disk)}"]
    if settings.snapshot:  # writes go to a temporary overlay; flushes are pointless there
        opts.append("snapshot=on,cache=unsafe")
    return ["-drive", ",".join(opts), *settings.disk_bus.device_args(drive, boot=boot)]


def hostfwd(host: int, guest: int) -> str:
    return f"hostfwd=tcp:127.0.0.1:{host}-:{guest}"


def network_args(settings: VmSettings) -> list[str]:
    if not settings.network:
        return []
    netdev = ",".join(["user,id=net0", *(hostfwd(h, g) for h, g in settings.port_forwards)])
    # romfile= : no iPXE option ROM, nobody network-boots these VMs and it costs boot time
    return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0,romfile="]


def console_args(settings: VmSettings) -> list[str]:
    """Serial console on stdio; interactive also multiplexes the monitor (Ctrl-A C, Ctrl-A X)."""
    if settings.interactive and settings.console_log is not None:  # mon:stdio, plus a log of the console
        return ["-display", "none",
                "-chardev", f"stdio,id=con0,mux=on,signal=on,logfile={qemu_opt(settings.console_log)}",
                "-serial", "chardev:con0", "-mon", "chardev=con0"]
    if settings.interactive:
        return ["-display", "none", "-serial", "mon:stdio"]
    # A headless guest that reboots (panic, reboot) would loop until a timeout: exit instead.
    return ["-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]


SERIAL_CONSOLE = "ttyS0,115200"


def kernel_cmdline(*, root: str | None = None, consoles: Sequence[str] = ("tty0", SERIAL_CONSOLE),
                   extra: Sequence[str] | str = ()) -> str:
    """The one place a kernel command line is put together: the root file system (read-write),
    the consoles (the last one is /dev/console, so the serial port gets the boot log), then
    the recipe's or the caller's extra words."""
    words = [f"root={root}", "rw"] if root else []
    words += [f"console={c}" for c in consoles]
    words += extra.split() if isinstance(extra, str) else list(extra)
    return " ".join(words)


def default_cmdline(disk: Path | None, bus: DiskBus) -> str:
    return kernel_cmdline(root=bus.root_device if disk is not None else None, consoles=(SERIAL_CONSOLE,))


def direct_kernel_args(
    kernel: Path, initrd: Path | None, cmdline: str | None, disk: Path | None, settings: VmSettings
) -> list[str]:
    line = cmdline if cmdline is not None else default_cmdline(disk, settings.disk_bus)
    line = kernel_cmdline(consoles=(), extra=f"{line} {settings.kernel_args}")
    args = ["-kernel", os.fspath(kernel)]
    if initrd is not None:
        args += ["-initrd", os.fspath(initrd)]
    return [*args, "-append", line]


def pflash_args(ovmf: Ovmf, ovmf_vars: Path) -> list[str]:
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_opt(ovmf.code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={qemu_opt(ovmf_vars)}",
    ]  # fmt: skip


def machine_args(qemu: str, machine: str, accel: Accel, *, cpus: int, memory_mib: int) -> list[str]:
    """The start of every VM's argv: the machine, accelerator, CPUs and memory, no default devices."""
    return [
        qemu,
        "-machine", machine,
        *accel.qemu_args(cpus),
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config",
    ]  # fmt: skip


def qemu_cmd(
    mode: Mode,
    *,
    settings: VmSettings,
    disk: Path | None,
    kernel: Path | None = None,
    initrd: Path | None = None,
    cmdline: str | None = None,
    ovmf: Ovmf | None = None,
    ovmf_vars: Path | None = None,
    qemu: str = QEMU,
) -> list[str]:
    """The full qemu argv for one VM. Pure: no file is touched, no process started.

    tgz: `kernel` (and usually `initrd`) are required; `cmdline` defaults to
    "root=<bus root device> rw console=ttyS0,115200" (no root= without a disk), and
    settings.kernel_args is appended. `disk` may be None only here.
    uefi: `ovmf` and `ovmf_vars`, a fresh writable copy of ovmf.vars_template, are required.
    settings.accel must already be resolved (select_accel()).
    """
    _check_inputs(mode, settings, disk=disk, kernel=kernel, initrd=initrd, cmdline=cmdline, ovmf=ovmf, vars_=ovmf_vars)
    cmd = [
        *machine_args(qemu, mode.machine, settings.accel, cpus=settings.cpus, memory_mib=settings.memory_mib),
        *console_args(settings),
    ]
    if mode.needs_ovmf:
        assert ovmf is not None and ovmf_vars is not None
        cmd += pflash_args(ovmf, ovmf_vars)
    if mode.direct_kernel:
        assert kernel is not None
        cmd += direct_kernel_args(kernel, initrd, cmdline, disk, settings)
    if disk is not None:
        cmd += drive_args(disk, settings, boot=not mode.direct_kernel)
    cmd += network_args(settings)
    cmd += ["-device", "virtio-rng-pci"]  # entropy for early userspace (systemd, sshd)
    return cmd


def _check_inputs(
    mode: Mode,
    settings: VmSettings,
    *,
    disk: Path | None,
    kernel: Path | None,
    initrd: Path | None,
    cmdline: str | None,
    ovmf: Ovmf | None,
    vars_: Path | None,
) -> None:
    """ValueError for a wrong combination of arguments (a bug); UserError for a bad setting."""
    if mode.direct_kernel and kernel is None:
        raise ValueError("tgz mode needs a kernel")
    if not mode.direct_kernel and (kernel or initrd or cmdline is not None):
        raise ValueError(f"{mode} mode boots from the disk: no kernel, initrd or cmdline")
    if not mode.direct_kernel and disk is None:
        raise ValueError(f"{mode} mode needs a disk")
    if mode.needs_ovmf and (ovmf is None or vars_ is None):
        raise ValueError("uefi mode needs ovmf and a fresh copy of its VARS template (ovmf_vars)")
    if not mode.needs_ovmf and (ovmf or vars_):
        raise ValueError(f"{mode} mode does not use OVMF")
    if not mode.direct_kernel and settings.kernel_args:
        raise UserError(
            f"extra kernel arguments only apply in tgz mode, not {mode}",
            hint="bios and uefi images boot the command line built into the disk",
        )


# ── host look-ups ───────────────────────────────────────────────────────────────────────

OVMF_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian ≥ 12, Ubuntu
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),  # Debian ≤ 11 (2M build)
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora
    ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),  # Arch
)


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


def fresh_ovmf_vars(ovmf: Ovmf, directory: Path) -> Path:
    """A writable copy of the VARS template for one run (the template itself stays pristine)."""
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / "OVMF_VARS.fd"
    shutil.copyfile(ovmf.vars_template, dest)
    return dest


# ── the KVM probe ───────────────────────────────────────────────────────────────────────
#
# /dev/kvm opening is not enough: on nested hosts KVM can abort at vCPU setup (`-cpu host`:
# "failed to set MSR 0x10a") or run a guest over 1000x slower than TCG (3.6 µs per loop
# iteration: a kernel then seems to hang right after its real-mode setup, decompressing).
# So the probe boots a tiny firmware with exactly the flags a KVM VM gets; it must reach
# 64-bit long mode, spin 2^24 loop iterations (≈10 ms on working KVM, a minute on the broken
# nested KVM we met, 0.2 s under TCG) and write to isa-debug-exit within PROBE_TIMEOUT.
#
# The firmware is a 64 KiB flat BIOS image: QEMU maps it at 0xF0000 (and below 4 GiB) and
# the CPU resets at 0xFFFF0. _PROBE_CODE is its listing, machine code next to the source
# (GNU as, `.intel_syntax noprefix`, assembled with `as --64` and
# `ld -Ttext=0xF0000 --oformat binary`, bytes checked against objdump); each block starts
# at its ROM offset, gaps are zeros. Addresses inside the code are linear (0xF0000 + offset).

PROBE_TIMEOUT = 2.0
PROBE_EXIT = (0x2A << 1) | 1  # isa-debug-exit turns the value v written to it into (v << 1) | 1
PROBE_VERSION = 1  # bump when the firmware or the probe flags change (invalidates caches)
PROBE_FILE = "accel-probe.json"

_PROBE_CODE: tuple[tuple[int, tuple[tuple[str, str], ...]], ...] = (
    (0xFF00, (  # .code16 start16: real mode, CS base 0xF0000
        ("fa", "cli"),
        ("b800f0", "mov ax, 0xF000"),
        ("8ed8", "mov ds, ax"),
        ("31c0", "xor ax, ax"),
        ("8ec0", "mov es, ax"),
        ("be98ff", "mov si, gdt - 0xF0000"),  # copy the GDT and gdtr to RAM at 0x500: the CPU
        ("bf0005", "mov di, 0x500"),  # sets the descriptors' accessed bits, and a nested KVM
        ("b92600", "mov cx, gdt_end - gdt"),  # hung on that write to ROM
        ("fc", "cld"),
        ("f3a4", "rep movsb"),
        ("31c0", "xor ax, ax"),
        ("8ed8", "mov ds, ax"),
        ("0f01162005", "lgdt [0x520]"),  # the copied gdtr
        ("0f20c0", "mov eax, cr0"),
        ("0c01", "or al, 1"),  # CR0.PE
        ("0f22c0", "mov cr0, eax"),
        ("66ea2fff0f000800", "data32 ljmp 0x08, start32"),
    )),
    (0xFF2F, (  # .code32 start32: protected mode
        ("66b81000", "mov ax, 0x10"),
        ("8ed8", "mov ds, ax"),
        ("8ec0", "mov es, ax"),
        ("8ed0", "mov ss, ax"),
        ("c7050010000003200000", "mov dword ptr [0x1000], 0x2003"),  # PML4[0] -> PDPT
        ("c7050020000003300000", "mov dword ptr [0x2000], 0x3003"),  # PDPT[0] -> PD
        ("c7050030000083000000", "mov dword ptr [0x3000], 0x83"),  # PD[0]: 2 MiB identity page
        ("b800100000", "mov eax, 0x1000"),
        ("0f22d8", "mov cr3, eax"),
        ("0f20e0", "mov eax, cr4"),
        ("83c820", "or eax, 0x20"),  # CR4.PAE
        ("0f22e0", "mov cr4, eax"),
        ("b9800000c0", "mov ecx, 0xC0000080"),  # EFER
        ("0f32", "rdmsr"),
        ("0d00010000", "or eax, 0x100"),  # EFER.LME
        ("0f30", "wrmsr"),
        ("0f20c0", "mov eax, cr0"),
        ("0d00000080", "or eax, 0x80000000"),  # CR0.PG: long mode
        ("0f22c0", "mov cr0, eax"),
        ("ea88ff0f001800", "ljmp 0x18, start64"),
    )),
    (0xFF88, (  # .code64 start64: long mode
        ("b900000001", "mov ecx, 0x1000000"),  # 2^24 iterations: the speed test
        ("ffc9", "1: dec ecx"),
        ("75fc", "jnz 1b"),
        ("b02a", "mov al, 0x2a"),
        ("e6f4", "out 0xf4, al"),  # isa-debug-exit: qemu exits with status 85
        ("f4", "hlt"),
        ("ebf0", "jmp start64"),
    )),
    (0xFF98, (  # gdt:
        ("0000000000000000", ".quad 0"),
        ("ffff0000009acf00", ".quad 0x00CF9A000000FFFF"),  # 0x08: 32-bit code
        ("ffff00000092cf00", ".quad 0x00CF92000000FFFF"),  # 0x10: data
        ("ffff0000009aaf00", ".quad 0x00AF9A000000FFFF"),  # 0x18: 64-bit code
        ("1f00", "gdtr: .word gdtr - gdt - 1"),
        ("00050000", ".long 0x500"),  # gdt_end:
    )),
    (0xFFF0, (  # .code16 reset: the reset vector
        ("ea00ff00f0", "ljmp 0xF000, start16 - 0xF0000"),
    )),
)  # fmt: skip


def probe_firmware() -> bytes:
    """The 64 KiB probe BIOS image (see the listing above)."""
    image = bytearray(0x10000)
    for offset, listing in _PROBE_CODE:
        block = b"".join(bytes.fromhex(code) for code, _asm in listing)
        image[offset : offset + len(block)] = block
    return bytes(image)


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str

    @property
    def notice(self) -> str:
        return f"accelerator: {self.accel} ({self.reason})"


def kvm_unavailable(dev: str = "/dev/kvm") -> str | None:
    """Why KVM can't even be tried, or None. Cheap: no process."""
    if not os.path.exists(dev):
        return f"no {dev}: hardware virtualization unavailable"
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not read-writable for this user (add it to group kvm)"
    return None


def qemu_error(stderr: str) -> str:
    """The line of qemu's stderr that says what went wrong, without the program prefix."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    wanted = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no message")
    return re.sub(r"^qemu-system-\w+: ", "", wanted)


def probe_cmd(firmware: Path, accel_args: Sequence[str], qemu: str = QEMU) -> list[str]:
    return [
        qemu, "-machine", "q35", *accel_args, "-m", "16",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-bios", os.fspath(firmware),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip


def exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def probe_guest(accel_args: Sequence[str], *, qemu: str = QEMU, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Run the probe firmware with these accelerator flags: (finished in time?, why)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ldt-probe-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(probe_firmware())
        start = time.monotonic()
        with spawn(
            probe_cmd(firmware, accel_args, qemu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False, f"probe guest did not finish within {timeout:g}s (hung or far too slow)"
        seconds = time.monotonic() - start
    if proc.returncode == PROBE_EXIT:
        return True, f"probe guest reached long mode and ran its loop in {seconds:.2f}s"
    message = qemu_error(err.decode(errors="replace"))
    return False, f"qemu {exit_status(proc.returncode)}: {message}"


def probe_kvm(qemu: str = QEMU, timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """KVM if a probe guest runs under it with exactly a KVM VM's flags, else TCG and why."""
    ok, why = probe_guest(Accel.KVM.qemu_args(), qemu=qemu, timeout=timeout)
    if ok:
        return AccelChoice(Accel.KVM, f"KVM {why}")
    return AccelChoice(Accel.TCG, f"KVM unusable: {why}")


def probe_key(qemu_path: str) -> dict[str, object]:
    """What the probe result depends on: host kernel, this boot, the qemu binary, the probe."""
    st = os.stat(qemu_path)
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    return {
        "kernel": os.uname().release,
        "boot_id": boot_id,
        "qemu": f"{qemu_path}:{st.st_size}:{st.st_mtime_ns}",
        "probe": PROBE_VERSION,
    }


_probed: dict[str, AccelChoice] = {}  # in-process cache, keyed by the JSON of probe_key()


def _load_cached(cache_file: Path, key: dict[str, object]) -> AccelChoice | None:
    try:
        data = json.loads(cache_file.read_text())
        if data["key"] == key:
            return AccelChoice(Accel(data["accel"]), f"{data['reason']}; cached")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _store_cached(cache_file: Path, key: dict[str, object], choice: AccelChoice) -> None:
    """Best effort: a cache dir we can't write only means probing again next time."""
    try:
        write_atomic(cache_file, json.dumps({"key": key, "accel": choice.accel, "reason": choice.reason}, indent=1))
    except OSError as e:
        log(f"could not save the KVM probe result in {cache_file}: {e}")


def requested_accel(requested: Accel, env: Mapping[str, str]) -> tuple[Accel, str]:
    """Pure precedence: the caller's explicit choice, then $LDT_ACCEL, then AUTO (probe)."""
    if requested is not Accel.AUTO:
        return requested, "requested"
    from_env = Accel.parse(env.get(ACCEL_ENV, ""), origin=ACCEL_ENV)
    return from_env, f"{ACCEL_ENV}={from_env}"


def select_accel(
    requested: Accel = Accel.AUTO,
    *,
    cache_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    qemu: str = QEMU,
    notice: bool = True,
) -> AccelChoice:
    """Resolve the accelerator and print one line saying which and why.

    An explicit `requested` wins over $LDT_ACCEL (kvm|tcg|auto); AUTO probes KVM once per
    host boot and qemu binary, remembering the answer in-process and in
    cache_dir/accel-probe.json.
    """
    choice = _resolve(requested, os.environ if env is None else env, cache_dir, qemu)
    if notice:
        log(choice.notice)
    return choice


def _resolve(requested: Accel, env: Mapping[str, str], cache_dir: Path | None, qemu: str) -> AccelChoice:
    accel, origin = requested_accel(requested, env)
    if accel is Accel.TCG:
        return AccelChoice(Accel.TCG, origin)
    why_not = kvm_unavailable()
    if accel is Accel.KVM:
        if why_not:
            raise UserError(f"KVM was {origin} but {why_not}", hint=f"use {ACCEL_ENV}=tcg")
        return AccelChoice(Accel.KVM, origin)
    if why_not:
        return AccelChoice(Accel.TCG, why_not)
    qemu_path = find_qemu(qemu)
    key = probe_key(qemu_path)
    memo = json.dumps(key, sort_keys=True)
    if memo in _probed:
        return _probed[memo]
    cache_file = cache_dir / PROBE_FILE if cache_dir is not None else None
    choice = _load_cached(cache_file, key) if cache_file else None
    if choice is None:
        choice = probe_kvm(qemu_path)
        if cache_file:
            _store_cached(cache_file, key, choice)
    _probed[memo] = choice
    return choice


# ── executors ───────────────────────────────────────────────────────────────────────────


def run_interactive(cmd: Cmd, *, timeout: float | None = None) -> int:
    """Run a VM built with interactive=True on this terminal; returns qemu's exit status."""
    log(f"serial console on this terminal; quit with {QUIT_KEYS} (Ctrl-A C: QEMU monitor)")
    saved = _save_terminal()
    try:
        return run(cmd, check=False, timeout=timeout).returncode
    finally:
        _restore_terminal(saved)


def _save_terminal() -> list | None:
    try:
        import termios

        return termios.tcgetattr(0) if os.isatty(0) else None
    except (ImportError, OSError):
        return None


def _restore_terminal(saved: list | None) -> None:
    """QEMU restores the terminal itself, unless it was killed: then we do."""
    if saved is None:
        return
    import termios

    try:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
    except OSError:
        pass


@dataclass(frozen=True)
class BootResult:
    ok: bool
    seconds: float  # from starting qemu to the marker (or to the failure)
    tail: list[str] = field(default_factory=list)  # last console lines, ANSI escapes removed
    reason: str = ""


_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clear screen
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: window titles
    r"|\x1b[()*+][0-9A-Za-z]"  # character set selection
    r"|\x1b[@-Z\\-_]"  # other two-byte escapes
    r"|[\x00-\x08\x0b-\x1f\x7f]"  # remaining control characters (keeps \t and \n)
)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def as_pattern(marker: str | re.Pattern[str]) -> re.Pattern[str]:
    """A str marker is literal text; pass re.compile(...) for a regular expression."""
    return marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))


def boot_to_marker(
    cmd: Cmd,
    *,
    timeout: float,
    marker: str | re.Pattern[str] = LOGIN_PROMPT,
    grace: float = 3.0,
    tail_lines: int = 30,
) -> BootResult:
    """Boot headless until `marker` shows on the serial console, then power the guest off.

    `cmd` must be built with interactive=False (serial console on stdout). A QMP socket is
    added; after the marker the guest gets an ACPI power-down and `grace` seconds, then
    QEMU is told to quit, then killed. QEMU never outlives this call: not on timeout, on an
    exception or on KeyboardInterrupt.
    """
    import tempfile

    args = argv(cmd)
    if "mon:stdio" in args:
        raise ValueError("boot_to_marker needs a headless command (interactive=False)")
    pattern = as_pattern(marker)
    with tempfile.TemporaryDirectory(prefix="ldt-qmp-") as tmp:
        qmp = Path(tmp) / "qmp.sock"
        start = time.monotonic()
        with spawn(
            [*args, "-qmp", f"unix:{qmp},server=on,wait=off"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            console = _Console(proc, tail_lines)
            outcome = console.pump(pattern, deadline=start + timeout)
            seconds = time.monotonic() - start
            tail = console.tail()
            if outcome == "marker":
                _power_off(proc, console, qmp, grace)
                return BootResult(True, seconds, tail, f"marker seen after {seconds:.1f}s")
            wanted = marker if isinstance(marker, str) else f"/{pattern.pattern}/"
            if outcome == "timeout":
                reason = f"no {wanted!r} on the console within {timeout:g}s"
            else:
                reason = f"qemu {_exited(proc)} before {wanted!r}{console.error_suffix()}"
            return BootResult(False, seconds, tail, reason)


class Stop(enum.StrEnum):
    """How a check asks the guest to shut down once it passed: the ACPI power button (systemd
    stops the app's unit), or Ctrl-Alt-Del (our app init turns it into `docker stop`)."""

    POWER_BUTTON = "system_powerdown"
    CTRL_ALT_DEL = "ctrl-alt-delete"

    def request(self, qmp: Path) -> bool:
        if self is Stop.POWER_BUTTON:
            return _qmp_command(qmp, "system_powerdown")
        keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
        return _qmp_command(qmp, "send-key", {"keys": keys})


@dataclass(frozen=True)
class CheckOutcome:
    """What boot_check saw: passed or not, when, by which check; the app's exit status while
    running (a failure) or while stopping (how the power-off ended it), the console's tail."""

    ok: bool
    seconds: float
    passed_by: str = ""
    reason: str = ""
    exit_status: int | None = None
    stop_status: int | None = None
    tail: list[str] = field(default_factory=list)


def boot_check(
    cmd: Cmd,
    *,
    timeout: float,
    marker: re.Pattern[str] | None,
    probe: Callable[[], str | None] | None = None,
    exit_line: re.Pattern[str],
    stop: Stop = Stop.POWER_BUTTON,
    grace: float = 15.0,
    tail_lines: int = 30,
) -> CheckOutcome:
    """Boot an app VM headless until the check passes: `marker` on the console, or `probe()`
    (called about four times a second; it must not block) returning what answered, or, with neither, the app's exit
    line with status 0. The app's exit line with any other status fails at once. After a pass
    the guest is asked to stop (`stop`), and its exit line while stopping is reported too.
    QEMU never outlives this call."""
    import tempfile

    args = argv(cmd)
    if "mon:stdio" in args:
        raise ValueError("boot_check needs a headless command (interactive=False)")
    watch = re.compile("|".join(f"(?:{p.pattern})" for p in (exit_line, marker) if p is not None), re.MULTILINE)
    with tempfile.TemporaryDirectory(prefix="ldt-qmp-") as tmp:
        qmp = Path(tmp) / "qmp.sock"
        start = time.monotonic()
        deadline = start + timeout
        with spawn([*args, "-qmp", f"unix:{qmp},server=on,wait=off"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            console = _Console(proc, tail_lines)
            passed_by = ""
            while not passed_by:
                now = time.monotonic()
                if now >= deadline:
                    return CheckOutcome(False, now - start, reason=f"no answer within {timeout:g}s",
                                       tail=console.tail())
                outcome = console.pump(watch, deadline=min(deadline, now + (0.25 if probe is not None else 1.0)))
                status = _last_exit(console, exit_line)
                if status is not None:
                    seconds = time.monotonic() - start
                    if marker is None and probe is None and status == 0:
                        passed_by = "the app exited 0"
                        break
                    return CheckOutcome(False, seconds, reason=f"the app exited with status {status}",
                                       exit_status=status, tail=console.tail())
                if outcome == "marker":
                    passed_by = f"marker /{marker.pattern}/" if marker is not None else "marker"
                elif outcome == "eof":
                    return CheckOutcome(False, time.monotonic() - start,
                                       reason=f"qemu {_exited(proc)} before the check passed{console.error_suffix()}",
                                       tail=console.tail())
                elif probe is not None:
                    passed_by = probe() or ""
            seconds = time.monotonic() - start
            before = len(console.all_exits)
            if not passed_by.startswith("the app exited"):
                if stop.request(qmp):
                    console.drain(proc, grace)
                if proc.poll() is None and _qmp_command(qmp, "quit"):
                    console.drain(proc, 3.0)
                _last_exit(console, exit_line)  # the lines read while it stopped
            stopped = console.all_exits[before:]
            return CheckOutcome(True, seconds, passed_by, exit_status=None,
                               stop_status=stopped[-1] if stopped else None, tail=console.tail())


def _last_exit(console: _Console, exit_line: re.Pattern[str]) -> int | None:
    """The status of an exit line among the lines read since the last call."""
    found = None
    for line in console.take_new():
        m = exit_line.search(line)
        if m:
            found = int(m.group(1))
            console.all_exits.append(found)
    return found


def _exited(proc: subprocess.Popen) -> str:
    status = _wait(proc, 5.0)
    return exit_status(status) if status is not None else "closed its console"


class _Console:
    """Reads qemu's stdout (the serial console) and stderr without blocking, to deadlines."""

    MAX_LINE = 16384

    def __init__(self, proc: subprocess.Popen, tail_lines: int) -> None:
        import codecs
        import selectors
        from collections import deque

        self.selector = selectors.DefaultSelector()
        self.decoders: dict[int, codecs.IncrementalDecoder] = {}
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            self.selector.register(stream.fileno(), selectors.EVENT_READ)
            self.decoders[stream.fileno()] = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.out_fd = proc.stdout.fileno() if proc.stdout else -1
        self.max_lines = tail_lines
        self.lines: deque[str] = deque(maxlen=tail_lines)
        self.partial = ""  # raw text after the last newline
        self.stderr: list[str] = []
        self.new: list[str] = []  # complete lines not yet taken (take_new)
        self.all_exits: list[int] = []  # statuses of exit lines seen, for boot_check

    def pump(self, pattern: re.Pattern[str] | None, deadline: float) -> str:
        """Read until the marker ("marker"), both pipes close ("eof") or the deadline ("timeout")."""
        while self.selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            for key, _ in self.selector.select(min(remaining, 0.5)):
                if self._read(key.fd, pattern):
                    return "marker"
        return "eof"

    def _read(self, fd: int, pattern: re.Pattern[str] | None) -> bool:
        data = os.read(fd, 65536)
        if not data:
            self.selector.unregister(fd)
        text = self.decoders[fd].decode(data, final=not data)
        if fd != self.out_fd:
            self.stderr.append(text)
            return False
        return self._feed(text, pattern)

    def _feed(self, text: str, pattern: re.Pattern[str] | None) -> bool:
        *complete, self.partial = (self.partial + text).split("\n")
        self.partial = self.partial[-self.MAX_LINE :]
        found = False
        for raw in complete:
            line = strip_ansi(raw)
            self.lines.append(line)
            self.new.append(line)
            del self.new[: -self.max_lines * 4]
            found = found or bool(pattern and pattern.search(line))
        # Prompts ("login: ") end without a newline: look at the unfinished line too.
        return found or bool(pattern and pattern.search(strip_ansi(self.partial)))

    def take_new(self) -> list[str]:
        lines, self.new = self.new, []
        return lines

    def tail(self) -> list[str]:
        last = strip_ansi(self.partial)
        lines = [*self.lines, last] if last.strip() else list(self.lines)
        return lines[-self.max_lines :]

    def error_suffix(self) -> str:
        """": <qemu's error message>" if it printed one on stderr."""
        text = "".join(self.stderr)
        return f": {qemu_error(text)}" if text.strip() else ""

    def drain(self, proc: subprocess.Popen, seconds: float) -> bool:
        """Keep the pipes empty (a full pipe would stall the guest) until qemu exits."""
        deadline = time.monotonic() + seconds
        self.pump(None, deadline)
        return _wait(proc, max(0.0, deadline - time.monotonic())) is not None


def _power_off(proc: subprocess.Popen, console: _Console, qmp: Path, grace: float) -> None:
    """ACPI power button, then `quit`, then SIGKILL (by reap); each step bounded."""
    if grace > 0 and _qmp_command(qmp, "system_powerdown") and console.drain(proc, grace):
        return
    if _qmp_command(qmp, "quit"):
        console.drain(proc, 3.0)


def _qmp_command(path: Path, command: str, arguments: dict | None = None, timeout: float = 2.0) -> bool:
    """Send one QMP command; True when QEMU acknowledged it."""
    import socket

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            stream = sock.makefile("rwb")
            stream.readline()  # greeting
            for execute, args in (("qmp_capabilities", None), (command, arguments)):
                stream.write(json.dumps({"execute": execute, **({"arguments": args} if args else {})}).encode()
                             + b"\n")
                stream.flush()
                if not _qmp_reply(stream):
                    return False
            return True
    except (OSError, ValueError):
        return False


def _qmp_reply(stream: BinaryIO) -> bool:
    while line := stream.readline():  # skip asynchronous events
        reply = json.loads(line)
        if "return" in reply or "error" in reply:
            return "return" in reply
    return True  # QEMU may close the socket as it acts on `quit`


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
