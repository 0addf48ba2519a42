"""The QEMU toolkit's vocabulary and every QEMU command line, as pure functions.

Reading order: the closed choices (Mode, DiskBus, Accel) → VmSettings and Machine (the frozen
description vm.py hands down) → qemu_cmd() for run_* and check_boot → virt_cmd() and the
snapshot pieces (memory_args, resume_args) for virt → the monitor's and the KVM probe's args.

Nothing here touches a file or starts a process: tests assert on the lists. The rest of the
toolkit: firmware.py finds the qemu binary and its firmware, kvm.py chooses the accelerator,
launch.py starts QEMU with its sockets, qmp.py speaks to its monitor, headless.py watches a
headless boot's console. vm.py (recipes' run and check) and virt.py (a command in a VM) use them.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifacts import Artifact
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.firmware import Ovmf

QEMU = "qemu-system-x86_64"
DRIVE_ID = "disk0"
MIN_MEMORY_MIB = 256  # a Debian kernel with an initramfs-tools initrd runs out of memory below this


# ── closed choices ──────────────────────────────────────────────────────────────────────


class Mode(enum.StrEnum):
    """The boot mode: straight into a kernel, or from a whole disk through firmware. Each mode
    knows what it boots, what it needs built, its firmware and its doit run task. (Not
    install.Mode, which says what debian-install makes.)"""

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
    """The accelerator; AUTO is resolved by kvm.select_accel() before building a command."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    def qemu_args(self, cpus: int = 1) -> list[str]:
        if self is Accel.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        if self is Accel.TCG:  # one host thread per vCPU; `max` enables every emulated feature
            return ["-accel", "tcg,thread=multi" if cpus > 1 else "tcg", "-cpu", "max"]
        raise ValueError("Accel.AUTO must be resolved with kvm.select_accel() before building a command")

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
class Machine:
    """One VM of run_* or check_boot as vm.py describes it, handed down once: the boot mode,
    what it boots (tgz: the kernel, initrd and command line; else the disk), its settings.
    The host's part (the qemu binary, OVMF) is added by launch.machine_argv()."""

    mode: Mode
    settings: VmSettings
    disk: Path | None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    secure_vars: Path | None = None  # uefi: a signed disk's variable store (keys enrolled): Secure Boot

    def __post_init__(self) -> None:
        if self.secure_vars is not None and not self.mode.needs_ovmf:
            raise ValueError(f"{self.mode} mode has no firmware variables: Secure Boot is uefi's")


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
    """OVMF's code and variables in flash; the Secure Boot build also needs the flash writable
    only from SMM (secure_boot_args), else a guest could rewrite its enrolled keys."""
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu_opt(ovmf.code)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={qemu_opt(ovmf_vars)}",
        *(secure_boot_args() if ovmf.secure else []),
    ]  # fmt: skip


SMM_MACHINE = "q35,smm=on"  # what OVMF's Secure Boot build needs: q35 with System Management Mode


def secure_boot_args() -> list[str]:
    """The flash only writable from SMM (with -machine SMM_MACHINE): the Secure Boot build's variables."""
    return ["-global", "driver=cfi.pflash01,property=secure,value=on"]


def smm_cpus(accel: Accel, cpus: int) -> int:
    """The vCPUs of a Secure Boot VM (SMM): one under TCG, where every SMI (each UEFI variable access,
    before and after the kernel starts) gathers every vCPU and costs dearly (hello's signed uefi row:
    +34-58 % over the plain one with 2 vCPUs, +6-13 % with 1; docs/secure-boot.md); as asked under KVM."""
    return 1 if accel is Accel.TCG else cpus


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
    uefi: `ovmf` and `ovmf_vars`, a fresh writable copy of ovmf.vars_template, are required; a
    Secure Boot build (ovmf.secure) gets q35 with SMM and the SMM-only flash, and under TCG one vCPU
    (smm_cpus). settings.accel must already be resolved (kvm.select_accel()).
    """
    _check_inputs(mode, settings, disk=disk, kernel=kernel, initrd=initrd, cmdline=cmdline, ovmf=ovmf, vars_=ovmf_vars)
    secure = ovmf is not None and ovmf.secure
    cmd = [
        *machine_args(qemu, SMM_MACHINE if secure else mode.machine, settings.accel,
                      cpus=smm_cpus(settings.accel, settings.cpus) if secure else settings.cpus,
                      memory_mib=settings.memory_mib),
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


def machine_cmd(m: Machine, *, qemu: str = QEMU, ovmf: Ovmf | None = None, ovmf_vars: Path | None = None) -> list[str]:
    """qemu_cmd() for a Machine (launch.machine_argv() adds the host's qemu and OVMF)."""
    return qemu_cmd(m.mode, settings=m.settings, disk=m.disk, kernel=m.kernel, initrd=m.initrd, cmdline=m.cmdline,
                    ovmf=ovmf, ovmf_vars=ovmf_vars, qemu=qemu)


# ── virt: a command in a throwaway VM (pipeline/virt.py) ────────────────────────────────


def virtio_pci(kind: str, opts: str) -> list[str]:
    """A -device for a virtio PCI device ("blk", "9p", …); no option ROM (no firmware boots them)."""
    return ["-device", f"virtio-{kind}-pci,{opts},romfile="]


@dataclass(frozen=True)
class VirtMachine:
    """A virt VM as virt.py describes it, handed down once: what all its runs share (a
    snapshot's shape), not the per-run initrd, share, sockets and console log. `accel` is
    resolved; `bios` (qboot) replaces SeaBIOS, which only costs time before a -kernel boot;
    `ports` name the virtio-serial ports ("ldt.<port>"), each a socket of the run; `cmdline`
    and `mount_tag` are what the guest's init expects."""

    kernel: Path
    rootfs: Path
    memory: int
    cpus: int
    accel: Accel
    cmdline: str
    ports: tuple[str, ...]
    mount_tag: str
    net: bool = False
    ro: bool = False
    qemu: str = QEMU
    bios: Path | None = None

    def canonical(self) -> VirtMachine:
        """What a snapshot is made with: a read-only share is a per-run choice, made after the restore."""
        return replace(self, ro=False)


def virt_cmd(m: VirtMachine, *, initrd: Path, workdir: Path, fds: Mapping[str, int], console_log: Path) -> list[str]:
    """The qemu argv for one virt run. `initrd` is the combined one (the run's cpio appended);
    `fds` maps each of m.ports to an inherited, connected socket (launch.launch() makes them)."""
    missing = [p for p in m.ports if p not in fds]
    if missing:
        raise ValueError(f"no socket for port(s) {', '.join(missing)}")
    ro = ",readonly=on" if m.ro else ""
    root = VmSettings(memory_mib=m.memory, cpus=m.cpus, accel=m.accel, network=False)
    cmd = [
        *machine_args(m.qemu, "q35", m.accel, cpus=m.cpus, memory_mib=m.memory),
        "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", f"file:{console_log}",
        *(["-bios", os.fspath(m.bios)] if m.bios is not None else []),
        "-kernel", os.fspath(m.kernel),
        "-initrd", os.fspath(initrd),
        "-append", m.cmdline,
        *drive_args(m.rootfs, root, boot=False, drive="root"),
        "-fsdev", f"local,id=work,path={qemu_opt(workdir)},security_model=none{ro}",
        *virtio_pci("9p", f"fsdev=work,mount_tag={m.mount_tag}"),
        *virtio_pci("serial", "id=ports"),
    ]  # fmt: skip
    for port in m.ports:
        cmd += [
            "-chardev", f"socket,id={port},fd={fds[port]}",
            "-device", f"virtserialport,bus=ports.0,chardev={port},name=ldt.{port}",
        ]  # fmt: skip
    if m.net:
        cmd += ["-netdev", "user,id=net0", *virtio_pci("net", "netdev=net0")]
    return cmd


RAM_ID = "ldt-ram"


def memory_args(ram: Path, memory: int, *, share: bool) -> list[str]:
    """Guest RAM in a file: shared while making a snapshot (the file becomes the snapshot),
    private (copy-on-write) when resuming. Migration skips it (x-ignore-shared)."""
    mode = "on" if share else "off"
    backend = f"memory-backend-file,id={RAM_ID},size={memory}M,mem-path={qemu_opt(ram)},share={mode}"
    return [
        "-object", backend,
        "-machine", f"memory-backend={RAM_ID}",
    ]  # fmt: skip


def resume_args(ram: Path, memory: int, qmp_fd: int) -> list[str]:
    """A resumed snapshot: its RAM file mapped private, the monitor, and the state coming in
    once the monitor set the capability migration needs (QEMU 7.2 has no command-line switch
    for x-ignore-shared)."""
    return [*memory_args(ram, memory, share=False), *qmp_args(qmp_fd), "-incoming", "defer"]


# ── the monitor and the KVM probe ───────────────────────────────────────────────────────


def qmp_args(fd: int) -> list[str]:
    """QMP on an inherited, connected socket (launch.launch() makes it)."""
    return ["-chardev", f"socket,id=qmp,fd={fd}", "-mon", "chardev=qmp,mode=control"]


def qmp_listen_args(path: Path) -> list[str]:
    """QMP on a unix socket QEMU listens on, one connection per command (qmp.ask())."""
    return ["-qmp", f"unix:{path},server=on,wait=off"]


CHECK_PORT = "check"  # the chardev id of check_boot's second serial port


def check_port_args(fd: int) -> list[str]:
    """A second serial port on a socket QEMU inherits as `fd`: the guest's ttyS1, where our app
    init (pipeline/guest/app-init.sh) starts a root shell beside the app when it finds the port."""
    return ["-chardev", f"socket,id={CHECK_PORT},fd={fd}", "-serial", f"chardev:{CHECK_PORT}"]


def probe_cmd(firmware: Path, accel_args: Sequence[str], qemu: str = QEMU) -> list[str]:
    """The KVM probe's VM (kvm.py): the probe firmware as BIOS, its exit through isa-debug-exit."""
    return [
        qemu, "-machine", "q35", *accel_args, "-m", "16",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-bios", os.fspath(firmware),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
