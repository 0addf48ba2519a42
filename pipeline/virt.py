"""virt: run one command as root in a throwaway VM that sees the current directory at /work.

Reading order: VirtOptions → the pure builders (argv_script, init_script, virt_cpio,
virt_kernel_cmdline, virt_qemu_cmd) → checks → the executor run_virt() and its relay.
The guest's init is pipeline/guest/virt-init.sh; the kernel and initrd it boots are the
fast_boot stage's (pipeline/initramfs.py: an uncompressed kernel, a slim initrd).

How a run works. The image's own kernel boots with its own initrd plus a small appended
cpio (the kernel unpacks concatenated archives): `rdinit=/ldt-virt-init` starts our script
instead of initramfs-tools' /init. The script (the initrd's klibc sh) mounts the root image
(a throwaway snapshot) at /root, loads the 9p and virtio-serial modules from it, mounts the
host directory at /root/work over 9p and chroots into /root to run argv in /work. The
command's stdin, stdout and stderr are FIFOs relayed to three virtio-serial ports, each a
socketpair to this process, so the streams stay separate and free of kernel messages (the
kernel console goes to a log shown only on failure). The exit status and the byte count of
each output port come back on a fourth port; once every byte has arrived, QEMU is stopped.

Most runs do not boot: _run_resumed() restores a VM saved at the point where only the
command is missing (pipeline/resume.py: what is saved, how it is keyed, what each run makes
fresh) and sends the settings on the control port instead of in the cpio. A run that cannot
resume boots as above (`--cold` always does).

Every process goes through pipeline.run.spawn()/run(); nothing here changes the images.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.initramfs import make_cpio, pad4
from pipeline.qemu import (
    MIN_MEMORY_MIB,
    Accel,
    VmSettings,
    drive_args,
    find_qemu,
    kernel_cmdline,
    machine_args,
    qemu_opt,
    select_accel,
)
from pipeline.run import log, reap, spawn, verbose

INIT = "ldt-virt-init"  # path of the init script inside the appended cpio
CONF = "ldt-virt-conf"  # sourced by the init script: settings and `set -- argv`
MOUNT_TAG = "ldtwork"
PORTS = ("stdin", "stdout", "stderr", "control")  # virtio-serial port names are "ldt.<port>"
ERROR_TAG = "ldt-virt-error:"  # the init script's failure lines on the kernel console
STATUS_LINE = re.compile(rb"status (\d+) (\d+|-) (\d+|-)\n")
EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PIPE = 141  # 128 + SIGPIPE: the host's stdout reader went away
EXIT_TERMINATED = 143  # 128 + SIGTERM
RESUME_GUARD = 60.0  # seconds a restored guest may take to start the command before virt boots cold
MSIZE = 512 * 1024  # 9p message size: the largest virtio transport size, for throughput
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REFUSED_WORKDIRS = ("/", "/proc", "/sys", "/dev", "/run", "/boot")


# ── settings ────────────────────────────────────────────────────────────────────────────


def virtio_pci(kind: str, opts: str) -> list[str]:
    """A -device for a virtio PCI device ("blk", "9p", …); no option ROM (no firmware boots them)."""
    return ["-device", f"virtio-{kind}-pci,{opts},romfile="]


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


def virt_qemu_cmd(
    *,
    kernel: Path,
    initrd: Path,
    rootfs: Path,
    workdir: Path,
    options: VirtOptions,
    accel: Accel,
    fds: Mapping[str, int],
    console_log: Path,
    qemu: str = "qemu-system-x86_64",
    bios: Path | None = None,
) -> list[str]:
    """The qemu argv for one virt run. Pure. `initrd` is the combined one (virt_cpio appended);
    `fds` maps each of PORTS to an inherited, connected socket; `accel` is resolved; `bios`
    (qboot) replaces SeaBIOS, which only costs time before a -kernel boot."""
    missing = [p for p in PORTS if p not in fds]
    if missing:
        raise ValueError(f"no socket for port(s) {', '.join(missing)}")
    ro = ",readonly=on" if options.ro else ""
    root = VmSettings(memory_mib=options.memory, cpus=options.cpus, accel=accel, network=False)
    cmd = [
        *machine_args(qemu, "q35", accel, cpus=options.cpus, memory_mib=options.memory),
        "-no-reboot", "-display", "none", "-monitor", "none",
        "-serial", f"file:{console_log}",
        *(["-bios", os.fspath(bios)] if bios is not None else []),
        "-kernel", os.fspath(kernel),
        "-initrd", os.fspath(initrd),
        "-append", virt_kernel_cmdline(),
        *drive_args(rootfs, root, boot=False, drive="root"),
        "-fsdev", f"local,id=work,path={qemu_opt(workdir)},security_model=none{ro}",
        *virtio_pci("9p", f"fsdev=work,mount_tag={MOUNT_TAG}"),
        *virtio_pci("serial", "id=ports"),
    ]  # fmt: skip
    for port in PORTS:
        cmd += [
            "-chardev", f"socket,id={port},fd={fds[port]}",
            "-device", f"virtserialport,bus=ports.0,chardev={port},name=ldt.{port}",
        ]  # fmt: skip
    if options.net:
        cmd += ["-netdev", "user,id=net0", *virtio_pci("net", "netdev=net0")]
    return cmd


QBOOT_CANDIDATES = ("/usr/share/qemu/qboot.rom", "/usr/share/qemu-firmware/qboot.rom", "/usr/share/qboot/bios.bin")


def find_qboot(candidates: Sequence[str] = QBOOT_CANDIDATES) -> Path | None:
    """qboot, the minimal firmware for -kernel boots (≈0.3 s faster than SeaBIOS), if installed."""
    return next((Path(c) for c in candidates if os.path.isfile(c)), None)


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
    import tempfile

    entry_time = time.monotonic()
    if not argv:
        raise UserError("no command given", hint="virt -- COMMAND [ARGS…]")
    share = check_workdir(workdir)
    check_artifacts(kernel=kernel, initrd=initrd, **{"root image": rootfs})
    qemu = find_qemu()
    accel = select_accel(options.accel, cache_dir=cache_dir, notice=verbose()).accel
    term = os.environ.get("TERM") if os.isatty(1) else None
    if not options.cold and not options.net:
        from pipeline import resume

        try:
            return _run_resumed(argv, kernel=kernel, initrd=initrd, rootfs=rootfs, share=share, options=options,
                                accel=accel, qemu=qemu, term=term, cache_dir=cache_dir, entry_time=entry_time)
        except resume.NoSnapshot as e:
            if verbose():
                log(f"virt: booting cold: {e}")
    with tempfile.TemporaryDirectory(prefix="ldt-virt-") as tmp:
        combined = Path(tmp) / "initrd"
        _write_initrd(combined, initrd, virt_cpio(argv, options=options, term=term))
        console_log = Path(tmp) / "console.log"
        pairs = {port: socket.socketpair() for port in PORTS}
        ours = {port: a for port, (a, _) in pairs.items()}
        theirs = {port: b for port, (_, b) in pairs.items()}
        try:
            cmd = virt_qemu_cmd(
                kernel=kernel, initrd=combined, rootfs=rootfs, workdir=share, options=options, accel=accel,
                fds={p: s.fileno() for p, s in theirs.items()}, console_log=console_log, qemu=qemu,
                bios=find_qboot(),
            )  # fmt: skip
            with spawn(
                cmd,
                pass_fds=[s.fileno() for s in theirs.values()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C is ours to handle, not QEMU's
            ) as proc:
                for s in theirs.values():  # QEMU holds them now
                    s.close()
                return _supervise(proc, ours, console_log, options.timeout)
        finally:
            for s in theirs.values():
                s.close()


def _run_resumed(argv: list[str], *, kernel: Path, initrd: Path, rootfs: Path, share: Path, options: VirtOptions,
                 accel: Accel, qemu: str, term: str | None, cache_dir: Path | None, entry_time: float) -> int:
    """run_virt() on a restored snapshot; resume.NoSnapshot when this run has to boot cold
    (nothing of the command ran then: the host's stdin is only read once the guest started it)."""
    import functools
    import tempfile
    from dataclasses import replace

    from pipeline import resume
    from pipeline.cache import Store

    bios = find_qboot()
    # The snapshot's shape: --ro and --timeout only change what happens after the restore.
    base = functools.partial(virt_qemu_cmd, kernel=kernel, rootfs=rootfs, accel=accel, qemu=qemu, bios=bios)
    canonical = functools.partial(base, options=replace(options, ro=False, timeout=None))
    init = init_script()
    m = resume.manifest(kernel=kernel, initrd=initrd, rootfs=rootfs, qemu=qemu, bios=bios, init=init,
                        memory=options.memory, cpus=options.cpus, accel=str(accel),
                        cmd_shape=resume.shape(canonical, PORTS))
    old_term = _on_sigterm()  # SIGTERM while making one: its QEMU is reaped like a run's
    try:
        snap = resume.prepare(Store(cache_dir) if cache_dir is not None else None, m, base_cmd=canonical,
                              ports=PORTS, initrd=initrd, memory=options.memory,
                              cpio=resume.snapshot_cpio(init, init_name=INIT, conf_name=CONF))
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
    settings = argv_script(argv, ro=options.ro, net=False, term=term, debug=verbose())
    with tempfile.TemporaryDirectory(prefix="ldt-virt-") as tmp:
        console_log = Path(tmp) / "console.log"
        pairs = {port: socket.socketpair() for port in (*PORTS, "qmp")}
        ours = {port: a for port, (a, _) in pairs.items()}
        theirs = {port: b for port, (_, b) in pairs.items()}
        state = os.open(snap.state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            cmd = [
                *base(workdir=share, initrd=snap.initrd, options=options, console_log=console_log,
                      fds={p: theirs[p].fileno() for p in PORTS}),
                *resume.resume_args(snap, options.memory, theirs["qmp"].fileno()),
            ]  # fmt: skip
            with spawn(
                cmd,
                pass_fds=[*(s.fileno() for s in theirs.values()), state],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            ) as proc:
                marks["spawned"] = time.monotonic()
                for s in theirs.values():
                    s.close()
                try:
                    resume.restore(ours.pop("qmp"), f"fd:{state}", marks)
                    os.close(state)
                    state = -1
                    conf = resume.run_conf(settings, seed=os.urandom(resume.SEED_BYTES), now_ns=time.time_ns())
                    status = _supervise(proc, ours, console_log, options.timeout, preamble=conf, marks=marks)
                    if verbose():
                        log("virt: " + resume.timings(marks))
                    return status
                except resume.NoSnapshot as e:  # it cannot be restored here: the next run makes a new one
                    resume.discard(snap)
                    raise resume.NoSnapshot(f"{e}; snapshot {snap.entry.name[:12]} removed") from None
        finally:
            for s in (*theirs.values(), *ours.values()):
                s.close()
            if state >= 0:
                os.close(state)


def _write_initrd(dest: Path, initrd: Path, extra: bytes) -> None:
    import shutil

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
    relay = _Relay(proc, socks, preamble)
    old_term = _on_sigterm()
    try:
        finished = relay.pump(deadline, start + RESUME_GUARD)
    except KeyboardInterrupt:
        reap(proc)
        return EXIT_INTERRUPTED
    except _PipeClosed:
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
        from pipeline import resume

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


class _PipeClosed(Exception):
    """The host's stdout or stderr is a pipe whose reader is gone."""


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


class _Relay:
    """Host stdin → the stdin port; the stdout/stderr ports → fds 1/2; the control port → status."""

    CHUNK = 65536
    MAX_PENDING = 1 << 20  # stop reading host stdin while this much waits for the guest

    def __init__(self, proc: subprocess.Popen, socks: dict[str, socket.socket], preamble: bytes = b"") -> None:
        import selectors

        self.sel = selectors.PollSelector()  # unlike epoll, poll takes regular files and /dev/null
        self.proc = proc
        self.socks = socks
        self.status: int | None = None
        self.control = b""
        self.err = bytearray()
        self.pending = b""  # host stdin not yet taken by the guest
        self.stdin_eof = False
        self.stdin_closed = False
        self.sinks = {"stdout": 1, "stderr": 2}
        self.received = {"stdout": 0, "stderr": 0}
        self.expected: dict[str, int | None] = {}  # bytes each output port sent, from the status line
        self.to_control = preamble  # a restored guest's settings, not yet sent
        self.started = not preamble  # the guest started the command (host stdin flows only then)
        self.guarded = False  # pump() gave up waiting for the start
        self.marks: dict[str, float] = {}  # when the guest started the command, when its status came
        for s in socks.values():
            s.setblocking(False)
        self.sel.register(socks["stdout"], selectors.EVENT_READ, "stdout")
        self.sel.register(socks["stderr"], selectors.EVENT_READ, "stderr")
        self.sel.register(socks["control"], selectors.EVENT_READ | (selectors.EVENT_WRITE if preamble else 0),
                          "control")
        assert proc.stderr is not None
        self.sel.register(proc.stderr, selectors.EVENT_READ, "qemu")
        self.stdin_fd = self._host_stdin()
        if self.stdin_fd is None:
            self._close_stdin()
        elif self.started:
            self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    @staticmethod
    def _host_stdin() -> int | None:
        try:
            os.fstat(0)
        except OSError:
            return None
        return 0

    def _open_streams(self) -> set[str]:
        return {key.data for key in self.sel.get_map().values()} & {"stdout", "stderr", "control", "qemu"}

    def complete(self) -> bool:
        """The status arrived and so did every byte the guest sent (or its reader went away)."""
        if self.status is None or len(self.expected) < 2:
            return False
        for port, count in self.expected.items():
            if count is None:
                return False  # unknown: wait for the guest's reset
            if port in self.sinks and self.received[port] < count:
                return False
        return True

    def pump(self, deadline: float | None, start_guard: float | None = None) -> bool:
        """Relay until the command's output is complete or QEMU has closed every stream;
        False when the deadline passed first. Until the guest started the command,
        `start_guard` ends the relay too (self.guarded)."""
        while self._open_streams() and not self.complete():
            if not self.started and start_guard is not None and time.monotonic() >= start_guard:
                self.guarded = True
                return True
            ends = [t for t in (deadline, None if self.started else start_guard) if t is not None]
            wait = None if not ends else min(ends) - time.monotonic()
            if deadline is not None and deadline <= time.monotonic():
                return False
            for key, events in self.sel.select(max(wait, 0) if wait is not None else None):
                self._handle(key.data, events)
        return True

    def _handle(self, what: str, events: int) -> None:
        import selectors

        if what == "host-stdin":
            self._read_host_stdin()
        elif what == "guest-stdin":
            self._write_guest_stdin()
        elif what == "control" and events & selectors.EVENT_WRITE:
            self._write_control()
            if events & selectors.EVENT_READ:
                self._read_port(what)
        elif what == "qemu":
            assert self.proc.stderr is not None
            data = os.read(self.proc.stderr.fileno(), self.CHUNK)
            if data:
                self.err += data
            else:
                self.sel.unregister(self.proc.stderr)
        else:
            self._read_port(what)

    def _read_port(self, port: str) -> None:
        sock = self.socks[port]
        try:
            data = sock.recv(self.CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            return
        if port == "control":
            self.control += data
            if not self.started and b"started\n" in self.control:
                self._started()
            found = STATUS_LINE.search(self.control)
            if found and "status" not in self.marks:
                self.marks["status"] = time.monotonic()
            if found:
                self.status = int(found.group(1))
                for name, count in zip(("stdout", "stderr"), found.group(2, 3), strict=True):
                    self.expected[name] = int(count) if count != b"-" else None
            return
        self.received[port] += len(data)
        fd = self.sinks.get(port)
        if fd is None:
            return
        try:
            _write_all(fd, data)
        except BrokenPipeError:
            raise _PipeClosed from None  # `virt -- yes | head`: end like the writer of a pipe
        except OSError:  # a closed descriptor (2>&-): discard, like /dev/null
            del self.sinks[port]

    def _write_control(self) -> None:
        import selectors

        sock = self.socks["control"]
        try:
            sent = sock.send(self.to_control)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # QEMU is gone: the reads say so
            sent = len(self.to_control)
        self.to_control = self.to_control[sent:]
        if not self.to_control and sock in {k.fileobj for k in self.sel.get_map().values()}:
            self.sel.modify(sock, selectors.EVENT_READ, "control")

    def _started(self) -> None:
        import selectors

        self.started = True
        self.marks["started"] = time.monotonic()
        if self.stdin_fd is not None and not self.stdin_eof and self.stdin_fd not in self.sel.get_map():
            self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    def _read_host_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, self.CHUNK)
        except OSError:
            data = b""
        if not data:
            self.stdin_eof = True
            self.sel.unregister(self.stdin_fd)
            if not self.pending:
                self._close_stdin()
            return
        self.pending += data
        self._write_guest_stdin()
        if len(self.pending) >= self.MAX_PENDING and self.stdin_fd in self.sel.get_map():
            self.sel.unregister(self.stdin_fd)

    def _write_guest_stdin(self) -> None:
        import selectors

        sock = self.socks.get("stdin")
        if sock is None or self.stdin_closed:
            self.pending = b""
            return
        try:
            sent = sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the guest is gone
            self.pending = b""
            self._close_stdin()
            return
        self.pending = self.pending[sent:]
        registered = sock in {k.fileobj for k in self.sel.get_map().values()}
        if self.pending and not registered:
            self.sel.register(sock, selectors.EVENT_WRITE, "guest-stdin")
        elif not self.pending and registered:
            self.sel.unregister(sock)
        if not self.pending:
            if self.stdin_eof:
                self._close_stdin()
            elif self.stdin_fd is not None and self.stdin_fd not in self.sel.get_map():
                self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    def _close_stdin(self) -> None:
        """EOF for the guest command, after everything sent before it.

        shutdown(), not close(): QEMU reads the socket only as fast as the guest takes the
        data and sees the end of the stream after it; a closed socket is a hang-up that QEMU
        acts on at once, dropping what it has not read yet.
        """
        sock = self.socks.get("stdin")
        if sock is None or self.stdin_closed:
            return
        self.stdin_closed = True
        if sock in {k.fileobj for k in self.sel.get_map().values()}:
            self.sel.unregister(sock)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def qemu_stderr(self) -> str:
        return self.err.decode(errors="replace")

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
        self.sel.close()
        for s in self.socks.values():
            s.close()
        if self.err and verbose():
            sys.stderr.write(self.qemu_stderr())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        view = view[n:]


# ── development entry point (the console script lives in pipeline/cli.py) ──────────────
