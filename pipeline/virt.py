"""virt: run one command as root in a throwaway VM that sees the current directory at /work.

Reading order: VirtOptions → the guest's side (argv_script, init_script, virt_cpio,
virt_kernel_cmdline) → machine(), the frozen qemu.VirtMachine that is handed down → checks →
the executor run_virt() and _supervise().
The guest's init is pipeline/guest/virt-init.sh; the kernel and initrd it boots are the
fast_boot stage's (pipeline/initramfs.py: an uncompressed kernel, a slim initrd).

How the work splits: virt.py knows the guest's protocol and the user's options; the QEMU
command line is qemu.virt_cmd() of a VirtMachine; QEMU starts through launch.launch(); the
streams are relayed by relay.Relay; a saved post-boot VM is resume.py's.

How a run works. The image's own kernel boots with its own initrd plus a small appended
cpio (the kernel unpacks concatenated archives): `rdinit=/ldt-virt-init` starts our script
instead of initramfs-tools' /init. The script (the initrd's klibc sh) mounts the root image
(a throwaway snapshot) at /root, loads the 9p and virtio-serial modules from it, mounts the
host directory at /root/work over 9p and chroots into /root to run argv in /work. The
command's stdin, stdout and stderr are FIFOs relayed to three virtio-serial ports, each a
socketpair to this process, so the streams stay separate and free of kernel messages (the
kernel console goes to a log shown only on failure). The exit status and the byte count of
each output port come back on a fourth port; once every byte has arrived, QEMU is stopped.

Most runs do not boot: _run_resumed() hands resume.prepare() the VirtMachine, gets the
snapshot of a VM saved at the point where only the command is missing (pipeline/resume.py:
what is saved, how it is keyed, what each run makes fresh), restores it and sends the
settings on the control port instead of in the cpio. A run that cannot
resume boots as above (`--cold` always does).

QEMU starts through launch.launch() (run.spawn()); nothing here changes the images.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import resume
from pipeline.cache import Store
from pipeline.errors import UserError
from pipeline.firmware import find_qboot, find_qemu
from pipeline.initramfs import make_cpio, pad4
from pipeline.kvm import select_accel
from pipeline.launch import launch
from pipeline.qemu import MIN_MEMORY_MIB, QEMU, Accel, VirtMachine, kernel_cmdline, resume_args, virt_cmd
from pipeline.relay import PipeClosed, Relay
from pipeline.run import log, reap, verbose

INIT = "ldt-virt-init"  # path of the init script inside the appended cpio
CONF = "ldt-virt-conf"  # sourced by the init script: settings and `set -- argv`
MOUNT_TAG = "ldtwork"
PORTS = ("stdin", "stdout", "stderr", "control")  # virtio-serial port names are "ldt.<port>"
ERROR_TAG = "ldt-virt-error:"  # the init script's failure lines on the kernel console
EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PIPE = 141  # 128 + SIGPIPE: the host's stdout reader went away
EXIT_TERMINATED = 143  # 128 + SIGTERM
RESUME_GUARD = 60.0  # seconds a restored guest may take to start the command before virt boots cold
MSIZE = 512 * 1024  # 9p message size: the largest virtio transport size, for throughput
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REFUSED_WORKDIRS = ("/", "/proc", "/sys", "/dev", "/run", "/boot")


# ── settings ────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class VirtOptions:
    """How the throwaway VM looks. memory in MiB; timeout in seconds (None: no limit)."""

    memory: int = 1024
    cpus: int = 1
    timeout: float | None = None
    net: bool = False  # user-mode networking (-nic user): outbound TCP/UDP, DNS at 10.0.2.3
    ro: bool = False  # /work read-only
    accel: Accel = Accel.AUTO
    cold: bool = False  # boot, even when a saved post-boot VM could be resumed (pipeline/resume.py)

    def __post_init__(self) -> None:
        if self.memory < MIN_MEMORY_MIB:
            raise UserError(f"VM memory {self.memory} MiB is too small", hint=f"use at least {MIN_MEMORY_MIB} MiB")
        if self.cpus < 1:
            raise UserError(f"VM cpus must be at least 1, not {self.cpus}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"timeout must be positive, not {self.timeout:g}")


# ── pure builders ───────────────────────────────────────────────────────────────────────


def argv_script(argv: Sequence[str], *, ro: bool, net: bool, term: str | None, debug: bool = False) -> str:
    """The settings file the init script sources: POSIX-quoted, so any argv is safe in it."""
    if not argv:
        raise ValueError("virt needs a command")
    words = " ".join(shlex.quote(os.fsdecode(a)) for a in argv)
    return "\n".join([
        f"LDT_RO={int(ro)}",
        f"LDT_NET={int(net)}",
        f"LDT_TERM={shlex.quote(term or '')}",
        f"LDT_DEBUG={int(debug)}",
        f"set -- {words}",
        "",
    ])  # fmt: skip


def init_script() -> str:
    """The guest's PID 1: pipeline/guest/virt-init.sh; the per-run settings live in CONF."""
    return (Path(__file__).parent / "guest" / "virt-init.sh").read_text()


def virt_cpio(argv: Sequence[str], *, options: VirtOptions, term: str | None) -> bytes:
    """The archive appended to the image's initrd: the init script and this run's settings."""
    return make_cpio({
        INIT: init_script().encode(),
        CONF: argv_script(argv, ro=options.ro, net=options.net, term=term, debug=verbose()).encode(),
    })  # fmt: skip


# Kernel arguments that only save boot time in a VM without keyboard, one serial port and
# nothing to audit: about 0.5 s under TCG (the crypto self-tests are most of it).
FAST_BOOT_ARGS = "cryptomgr.notests no_timer_check 8250.nr_uarts=1 i8042.noaux i8042.nokbd audit=0 apparmor=0"


def virt_kernel_cmdline() -> str:
    # quiet: the console log stays short; panic=-1 with -no-reboot: a crash ends QEMU at once.
    return kernel_cmdline(consoles=("ttyS0",), extra=f"rdinit=/{INIT} panic=-1 quiet {FAST_BOOT_ARGS}")


def machine(options: VirtOptions, *, kernel: Path, rootfs: Path, accel: Accel, qemu: str = QEMU,
            bios: Path | None = None) -> VirtMachine:
    """The VM of a run with these options, as qemu.virt_cmd() builds it."""
    return VirtMachine(kernel=kernel, rootfs=rootfs, memory=options.memory, cpus=options.cpus, accel=accel,
                       cmdline=virt_kernel_cmdline(), ports=PORTS, mount_tag=MOUNT_TAG, net=options.net,
                       ro=options.ro, qemu=qemu, bios=bios)


# ── checks ──────────────────────────────────────────────────────────────────────────────


def check_workdir(workdir: Path) -> Path:
    """The directory to share, resolved; UserError when it may not or cannot be shared."""
    try:
        resolved = workdir.resolve(strict=True)
    except PermissionError:
        raise UserError(f"{workdir} is not accessible for this user", hint="cd into a directory you can read") from None
    except (OSError, RuntimeError):
        raise UserError(
            f"the current directory {workdir} does not exist", hint="cd into the directory to share"
        ) from None
    if not resolved.is_dir():
        raise UserError(f"{resolved} is not a directory", hint="cd into the directory to share")
    if os.fspath(resolved) in REFUSED_WORKDIRS:
        raise UserError(
            f"refusing to share {resolved} with the VM (it sees the current directory at /work)",
            hint="cd into a project directory first",
        )
    if not os.access(resolved, os.R_OK | os.X_OK):
        raise UserError(f"{resolved} is not readable for this user", hint="cd into a directory you can read")
    return resolved


def check_artifacts(**paths: Path) -> None:
    for what, path in paths.items():
        if not path.is_file():
            raise UserError(f"{what} {path} not found", hint="build the image first")
        if not os.access(path, os.R_OK):
            raise UserError(f"{what} {path} is not readable for this user")


_HINTS = {
    "initrd-module": "the initrd lacks module {what}: build it with MODULES=most in "
    "/etc/initramfs-tools/initramfs.conf (Debian's default) or list {what} in /etc/initramfs-tools/modules",
    "root-module": "the image's kernel has no module {what}: add a kernel package that ships it to the recipe "
    "(Debian: linux-image-amd64)",
    "no-shell": "virt runs the command through the image's /bin/sh: keep a shell (dash or bash) in the image",
    "mount-root": "the root image must be an ext4 file system",
}


def guest_error(console: str) -> UserError | None:
    """The init script's failure line on the console, as a UserError with a hint."""
    found = re.search(rf"{re.escape(ERROR_TAG)} (\S+) ?(.*)", console)
    if not found:
        return None
    kind, what = found.group(1), found.group(2).strip()
    messages = {
        "initrd-module": f"module {what} is missing from the image's initrd",
        "root-module": f"module {what} is missing from the image",
        "no-shell": "the image has no /bin/sh",
        "mount-root": "the root image could not be mounted as ext4",
        "mount-work": "the guest could not mount the shared directory over 9p",
        "no-disk": "the guest found no root disk",
        "no-ports": "the guest found no virtio-serial ports",
        "network": "the guest could not configure its network",
    }
    hint = _HINTS.get(kind, "run with LDT_VERBOSE=1 for the guest console")
    return UserError(messages.get(kind, f"guest setup failed: {kind} {what}"), hint=hint.format(what=what))


# ── the executor ────────────────────────────────────────────────────────────────────────


def run_virt(
    argv: list[str],
    *,
    kernel: Path,
    initrd: Path,
    rootfs: Path,
    workdir: Path,
    options: VirtOptions,
    cache_dir: Path | None = None,
) -> int:
    """Run argv as root in a throwaway VM with workdir at /work; return its exit status.

    stdin, stdout and stderr are relayed separately. Other exits: 124 when options.timeout
    (counted from QEMU's start, boot included) passed and the VM was killed, 130 on Ctrl-C,
    143 on SIGTERM, 141 when the host's stdout/stderr pipe has no reader any more.
    UserError for what the user can fix (directory, image, qemu). `kernel` and `initrd` are
    booted as they are (the fast_boot stage's files boot fastest); `cache_dir` (the project's
    cache/) keeps the KVM probe's answer.
    """
    entry_time = time.monotonic()
    if not argv:
        raise UserError("no command given", hint="virt -- COMMAND [ARGS…]")
    share = check_workdir(workdir)
    check_artifacts(kernel=kernel, initrd=initrd, **{"root image": rootfs})
    accel = select_accel(options.accel, cache_dir=cache_dir, notice=verbose()).accel
    m = machine(options, kernel=kernel, rootfs=rootfs, accel=accel, qemu=find_qemu(), bios=find_qboot())
    term = os.environ.get("TERM") if os.isatty(1) else None
    if not options.cold and not options.net:
        try:
            return _run_resumed(argv, m, initrd=initrd, share=share, timeout=options.timeout, term=term,
                                cache_dir=cache_dir, entry_time=entry_time)
        except resume.NoSnapshot as e:
            if verbose():
                log(f"virt: booting cold: {e}")
    with tempfile.TemporaryDirectory(prefix="ldt-virt-") as tmp, launch(PORTS) as vm:
        combined = Path(tmp) / "initrd"
        _write_initrd(combined, initrd, virt_cpio(argv, options=options, term=term))
        console_log = Path(tmp) / "console.log"
        cmd = virt_cmd(m, initrd=combined, workdir=share, fds=vm.fds, console_log=console_log)
        proc = vm.start(cmd, new_session=True)  # new session: Ctrl-C is ours to handle, not QEMU's
        return _supervise(proc, vm.ours, console_log, options.timeout)


def _run_resumed(argv: list[str], m: VirtMachine, *, initrd: Path, share: Path, timeout: float | None,
                 term: str | None, cache_dir: Path | None, entry_time: float) -> int:
    """run_virt() on a restored snapshot; resume.NoSnapshot when this run has to boot cold
    (nothing of the command ran then: the host's stdin is only read once the guest started it)."""
    init = init_script()
    old_term = _on_sigterm()  # SIGTERM while making one: its QEMU is reaped like a run's
    try:
        snap = resume.prepare(Store(cache_dir) if cache_dir is not None else None, m.canonical(), initrd=initrd,
                              init=init, cpio=resume.snapshot_cpio(init, init_name=INIT, conf_name=CONF))
    except resume.MakeFailed as e:
        error = guest_error(e.console)
        if error is not None:
            raise error from None  # what a cold boot would say too, without booting again
        raise resume.NoSnapshot(str(e)) from None
    except _Terminated:
        return EXIT_TERMINATED
    finally:
        _restore_sigterm(old_term)
    marks = {"entry": entry_time}
    if verbose():
        log(f"virt: resuming snapshot {snap.entry.name[:12]}")
    settings = argv_script(argv, ro=m.ro, net=False, term=term, debug=verbose())
    with tempfile.TemporaryDirectory(prefix="ldt-virt-") as tmp, launch((*PORTS, "qmp")) as vm:
        console_log = Path(tmp) / "console.log"
        state = os.open(snap.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            cmd = [
                *virt_cmd(m, workdir=share, initrd=snap.initrd, console_log=console_log, fds=vm.fds),
                *resume_args(snap.ram, m.memory, vm.fds["qmp"]),
            ]
            proc = vm.start(cmd, pass_fds=[state], new_session=True)
            marks["spawned"] = time.monotonic()
            try:
                resume.restore(vm.ours["qmp"], f"fd:{state}", marks)
                os.close(state)
                state = -1
                conf = resume.run_conf(settings, seed=os.urandom(resume.SEED_BYTES), now_ns=time.time_ns())
                ports = {p: vm.ours[p] for p in PORTS}
                status = _supervise(proc, ports, console_log, timeout, preamble=conf, marks=marks)
                if verbose():
                    log("virt: " + resume.timings(marks))
                return status
            except resume.NoSnapshot as e:  # it cannot be restored here: the next run makes a new one
                resume.discard(snap)
                raise resume.NoSnapshot(f"{e}; snapshot {snap.entry.name[:12]} removed") from None
        finally:
            if state >= 0:
                os.close(state)


def _write_initrd(dest: Path, initrd: Path, extra: bytes) -> None:
    shutil.copyfile(initrd, dest)
    with dest.open("ab") as f:
        f.write(pad4(f.tell()))
        f.write(extra)


def _supervise(
    proc: subprocess.Popen, socks: dict[str, socket.socket], console_log: Path, timeout: float | None,
    preamble: bytes = b"",
    marks: dict[str, float] | None = None,
) -> int:
    """Relay the streams until QEMU exits; the exit status, 124 or 130. QEMU never outlives this.

    With a preamble (a restored guest's settings, sent on the control port) nothing else is
    relayed until the guest says it started the command; a guest that never does (the restore
    failed, or took longer than RESUME_GUARD) is resume.NoSnapshot: the caller boots cold."""
    start = time.monotonic()
    deadline = start + timeout if timeout is not None else None
    relay = Relay(proc, socks, preamble)
    old_term = _on_sigterm()
    try:
        finished = relay.pump(deadline, start + RESUME_GUARD)
    except KeyboardInterrupt:
        reap(proc)
        return EXIT_INTERRUPTED
    except PipeClosed:
        reap(proc)
        return EXIT_PIPE
    except _Terminated:
        reap(proc)
        return EXIT_TERMINATED
    finally:
        reap(proc)
        relay.close()
        _restore_sigterm(old_term)
        if marks is not None:
            marks.update(relay.marks, ended=time.monotonic())
    if verbose():
        log(f"virt: VM ran {time.monotonic() - start:.1f}s")
    console = console_log.read_text(errors="replace") if console_log.exists() else ""
    if verbose():
        log("virt: guest console:\n" + console)
    if not relay.started:
        if finished and not relay.guarded:
            why = (relay.qemu_stderr().strip().splitlines() or ["QEMU stopped"])[-1]
            raise resume.NoSnapshot(f"the restore failed: {why}")
        if finished:
            raise resume.NoSnapshot(f"the restored guest did not start the command in {RESUME_GUARD:g}s")
    if not finished:
        log(f"virt: timed out after {timeout:g}s, VM killed")
        return EXIT_TIMEOUT
    if relay.status is not None:
        return relay.status
    error = guest_error(console)
    if error is not None:
        raise error
    qemu_err = relay.qemu_stderr().strip()
    if qemu_err:
        raise UserError(f"qemu failed: {qemu_err.splitlines()[-1]}", hint="run with LDT_VERBOSE=1 to see its command")
    tail = "\n".join("  " + line for line in console.strip().splitlines()[-20:])
    raise UserError(f"the VM stopped before the command finished; its console ended with:\n{tail}")


class _Terminated(Exception):
    """SIGTERM: stop the VM like Ctrl-C does, then exit 143."""


def _raise_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _on_sigterm():
    try:
        return signal.signal(signal.SIGTERM, _raise_sigterm)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(old) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)


# ── development entry point (the console script lives in pipeline/cli.py) ──────────────
