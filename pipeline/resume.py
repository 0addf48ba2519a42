"""virt's fast path: resume a saved post-boot VM instead of booting one (issue 12).

Reading order: the stage and its manifest (what a snapshot is keyed by) → the pure builders
(snapshot_cpio, run_conf; the QEMU command-line pieces are in pipeline/qemu.py) → restore()
→ find() (a usable entry, or why not) → make() (boot to the snapshot point once, save) →
prepare() (find or make; NoSnapshot means: boot cold).

virt.py hands down a frozen qemu.VirtMachine (the VM every run of these settings shares);
the store look-ups (find, discard, _lock and the store part of prepare) are kept apart from
the QEMU part (make, restore).

What is saved. The guest's init (pipeline/guest/virt-init.sh with LDT_SNAPSHOT=1) boots as in
a cold run up to the point where only per-run things are left: root mounted read-only,
modules loaded, ports found, the control port open. It says "ready"; the host stops the VM
and migrates its device state to a file (`vm.state`). The guest's RAM is not in that stream:
it lives in a memory-backend-file (`vm.ram`, sparse, share=on while making) and migration
skips it (x-ignore-shared). A run maps vm.ram privately (share=off: copy-on-write, the file
never changes, any number of runs share it) and loads vm.state with `-incoming fd:N`, so a
restore costs the device state, not the guest's memory.

What is fresh per run. The disk: the same root image under a new throwaway overlay
(snapshot=on); nothing was written before the snapshot point (read-only mount), so the
restored guest's caches match it, and the guest remounts it read-write after the restore.
The share: the 9p export is mounted only after the restore (QEMU refuses to migrate a
mounted one), from this run's -fsdev. The ports: new socketpairs behind the same devices.
The settings: the guest reads them from the control port ("conf <lines>", then that many
lines): the command, the host's clock (clock_settime) and 64 random bytes from the host,
written into the kernel's pool followed by a reseed (RNDRESEEDCRNG), so no two runs share
random state.

Keyed by: the kernel, initrd and root image (path, size, mtime: store entries never change,
an explicit --rootfs that changes gets a new key), the qemu binary (same), the firmware, the
init script's content, memory, cpus, the accelerator and the whole QEMU command line shape.
A missing, damaged or unusable snapshot is never an error: prepare() raises NoSnapshot, saying
why under LDT_VERBOSE=1, and virt boots cold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import notices, qemu
from pipeline.cache import Source, Store, hash_file, key_of
from pipeline.initramfs import make_cpio, pad4
from pipeline.launch import launch
from pipeline.qmp import Qmp, QmpError
from pipeline.run import log, reap, verbose
from pipeline.stages import VIRT_SNAPSHOT

STAGE = VIRT_SNAPSHOT.name  # the store folder cache/store/virt_snapshot/<key>/ (a row of stages.py)
RAM, STATE, INITRD, INFO = "vm.ram", "vm.state", "vm.initrd", "vm.json"
READY = b"ready\n"
STARTED = b"started\n"
MAKE_GUARD = 300.0  # seconds: a boot to the snapshot point that takes longer is given up
SEED_BYTES = 64


class NoSnapshot(Exception):
    """Why this run boots cold (shown under LDT_VERBOSE=1)."""


@dataclass(frozen=True)
class Snapshot:
    entry: Path

    @property
    def ram(self) -> Path:
        return self.entry / RAM

    @property
    def state(self) -> Path:
        return self.entry / STATE

    @property
    def initrd(self) -> Path:
        return self.entry / INITRD


# ── the manifest ────────────────────────────────────────────────────────────────────────


def identity(path: Path | str) -> str:
    """A file as the key sees it: where it really is, its size and mtime (no hashing per run)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def manifest(*, kernel: Path, initrd: Path, rootfs: Path, qemu: str, bios: Path | None, init: str,
             memory: int, cpus: int, accel: str, cmd_shape: Sequence[str]) -> dict[str, Any]:
    """Every input of a snapshot; its key is the entry's name."""
    return {
        **VIRT_SNAPSHOT.head(),
        "inputs": {
            "kernel": identity(kernel),
            "initrd": identity(initrd),
            "rootfs": identity(rootfs),
            "qemu": identity(qemu),
            "bios": identity(bios) if bios is not None else None,
        },
        "init": key_of({"script": init}),
        "memory": memory,
        "cpus": cpus,
        "accel": accel,
        "qemu_argv": list(cmd_shape),
    }


def manifest_of(machine: qemu.VirtMachine, *, initrd: Path, init: str) -> dict[str, Any]:
    """The manifest of a snapshot of this VM (machine.canonical()), its initrd and init script."""
    return manifest(kernel=machine.kernel, initrd=initrd, rootfs=machine.rootfs, qemu=machine.qemu,
                    bios=machine.bios, init=init, memory=machine.memory, cpus=machine.cpus, accel=str(machine.accel),
                    cmd_shape=shape(machine))


def shape(machine: qemu.VirtMachine) -> list[str]:
    """The command line every snapshot of this VM is made and resumed with, per-run values
    (the share, the sockets, the console log) left as placeholders."""
    fds = {p: 100 + i for i, p in enumerate(machine.ports)}
    return qemu.virt_cmd(machine, workdir=Path("/WORK"), initrd=Path("/INITRD"), fds=fds, console_log=Path("/CONSOLE"))


# ── pure builders ───────────────────────────────────────────────────────────────────────


def snapshot_cpio(init: str, *, init_name: str, conf_name: str) -> bytes:
    """The archive appended to the initrd of a snapshot: the init script in snapshot mode."""
    return make_cpio({init_name: init.encode(), conf_name: b"LDT_SNAPSHOT=1\nLDT_NET=0\nLDT_DEBUG=0\n"})


def run_conf(settings: str, *, seed: bytes, now_ns: int) -> bytes:
    """What a restored guest reads from the control port: "conf <lines>", then the lines:
    the run's settings (virt.argv_script()), the host's clock and fresh randomness."""
    sec, nsec = divmod(now_ns, 1_000_000_000)
    text = f"{settings}LDT_SEED={seed.hex()}\nLDT_SEC={sec}\nLDT_NSEC={nsec}\n"
    return f"conf {text.count(chr(10))}\n{text}".encode()


IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]


def restore(qmp_sock: socket.socket, uri: str, marks: dict[str, float], timeout: float = 30.0) -> None:
    """Start loading the saved state from `uri` (fd:N, the state file passed to QEMU); the VM
    runs by itself once loaded. NoSnapshot when QEMU does not get that far."""
    try:
        qmp = Qmp(qmp_sock, timeout)
        marks["monitor"] = time.monotonic()
        qmp.call("migrate-set-capabilities", capabilities=IGNORE_SHARED)
        qmp.call("migrate-incoming", uri=uri)
    except (QmpError, OSError, ValueError) as e:
        raise NoSnapshot(f"the restore failed: {e}") from None


PHASES = (("host set-up", "entry", "spawned"), ("QEMU start", "spawned", "monitor"),
          ("state load + guest wake-up", "monitor", "started"), ("fresh state + command", "started", "status"),
          ("QEMU stop", "status", "ended"))  # fmt: skip


def timings(marks: dict[str, float]) -> str:
    """Where a resumed run's time went, from run_virt()'s start (the interpreter's own start-up
    and imports come before it)."""
    parts = [f"{name} {marks[b] - marks[a]:.3f}s" for name, a, b in PHASES if a in marks and b in marks]
    return "resume timings: " + ", ".join(parts)


# ── finding a snapshot ──────────────────────────────────────────────────────────────────


def find(store: Store, m: dict[str, Any]) -> Snapshot:
    """The local entry of manifest m, checked; NoSnapshot says why there is none usable."""
    key = key_of(m)
    entry = store.lookup(STAGE, key, quiet=not verbose())  # a damaged one: named only under LDT_VERBOSE
    if entry is None:
        raise NoSnapshot(f"no snapshot for this image and these settings yet ({key[:12]})")
    return checked(entry)


def checked(entry: Path) -> Snapshot:
    """A stored snapshot this host can restore: its files whole, its RAM file open to this user."""
    key, snap = entry.name, Snapshot(entry)
    try:
        info = json.loads((entry / INFO).read_text())
        for name in (RAM, STATE, INITRD):
            if os.stat(entry / name).st_size != info["sizes"][name]:
                raise NoSnapshot(f"snapshot {key[:12]}: {name} has the wrong size (damaged)")
        if hash_file(snap.state) != info["state_xxh3"]:
            raise NoSnapshot(f"snapshot {key[:12]}: {STATE} is damaged")
        if not os.access(snap.ram, os.R_OK | os.W_OK):  # QEMU 7.2 opens it read-write (mapped private)
            raise NoSnapshot(f"snapshot {key[:12]}: {RAM} is not readable and writable for this user")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise NoSnapshot(f"snapshot {key[:12]} unreadable: {e}") from None
    return snap


def discard(snap: Snapshot) -> None:
    """Drop an entry that cannot be restored (made by another QEMU build, say): best effort,
    the next run makes a new one. Renamed away first, so no run starts on a half-removed one."""
    gone = snap.entry.with_name(f".gone-{snap.entry.name}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(snap.entry, gone)
        shutil.rmtree(gone, ignore_errors=True)


# ── making one ──────────────────────────────────────────────────────────────────────────


class MakeFailed(Exception):
    """Making the snapshot failed; `console` is the guest's console (virt.guest_error reads it)."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message)
        self.console = console


def make(work: Path, *, machine: qemu.VirtMachine, guard: float = MAKE_GUARD) -> None:
    """Boot `machine` to the snapshot point and save the VM into work/ (which holds INITRD already)."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ldt-virt-snap-") as tmp, launch((*machine.ports, "qmp")) as vm:
        share, console_log, err = Path(tmp) / "share", Path(tmp) / "console.log", Path(tmp) / "qemu.err"
        share.mkdir()
        cmd = [
            *qemu.virt_cmd(machine, workdir=share, initrd=work / INITRD, fds=vm.fds, console_log=console_log),
            *qemu.memory_args(work / RAM, machine.memory, share=True),
            *qemu.qmp_args(vm.fds["qmp"]),
        ]  # fmt: skip
        with open(err, "wb") as err_file:
            proc = vm.start(cmd, stderr=err_file, new_session=True)
        if not _wait_for(vm.ours["control"], READY, start + guard):
            reap(proc)
            console = console_log.read_text(errors="replace") if console_log.exists() else ""
            qemu_err = err.read_text(errors="replace").strip()
            raise MakeFailed(f"the guest did not reach the snapshot point{': ' + qemu_err if qemu_err else ''}",
                             console)
        booted = time.monotonic()
        try:
            _save(Qmp(vm.ours["qmp"]), work / STATE, err)
        except QmpError as e:
            raise MakeFailed(str(e)) from None
        proc.wait(timeout=30)
    sizes = {name: os.stat(work / name).st_size for name in (RAM, STATE, INITRD)}
    info = {"sizes": sizes, "state_xxh3": hash_file(work / STATE), "boot_s": round(booted - start, 3),
            "save_s": round(time.monotonic() - booted, 3)}
    (work / INFO).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if verbose():
        log(f"virt: snapshot made: boot {info['boot_s']}s, save {info['save_s']}s, "
            f"state {sizes[STATE] >> 10} KiB, RAM {_allocated(work / RAM) >> 20} MiB of {sizes[RAM] >> 20}")


def _save(qmp: Qmp, state: Path, err: Path) -> None:
    """Migrate the VM's device state into `state`, then quit. No `stop` first: migration stops
    the VM when it completes, and the restored one then starts by itself (it takes over the
    saved "running" state)."""
    qmp.call("migrate-set-capabilities", capabilities=IGNORE_SHARED)
    qmp.call("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    qmp.call("migrate", uri=f"exec:cat > {shlex.quote(os.fspath(state))}")
    while (status := qmp.call("query-migrate").get("status")) not in ("completed", "failed", "cancelled"):
        time.sleep(0.01)
    if status != "completed":
        raise MakeFailed(f"saving the VM state {status}: {err.read_text(errors='replace').strip()}")
    qmp.call("quit")


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _wait_for(sock: socket.socket, line: bytes, deadline: float) -> bool:
    """True once `line` came on sock; False on EOF (QEMU is gone) or at the deadline."""
    got = b""
    while line not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return False
        except OSError:
            data = b""
        if not data:
            return False
        got += data
    return True


# ── find or make ────────────────────────────────────────────────────────────────────────


NOTICE = ("virt: this run boots and saves the VM once it is up (a few seconds); later runs with the same image "
          "and settings resume it instead of booting")


def prepare(store: Store | None, machine: qemu.VirtMachine, *, initrd: Path, init: str, cpio: bytes) -> Snapshot:
    """The snapshot of `machine` (canonical: see VirtMachine.canonical) booting `initrd` with
    `cpio` (the init script `init` in snapshot mode) appended: an entry of the store's
    virt_snapshot row, found or made now by the one path (once: concurrent runs wait for one
    maker). Raises NoSnapshot when there is none and none can be made (the caller boots cold),
    MakeFailed when the guest failed on the way."""
    if store is None:
        raise NoSnapshot("no writable store for a snapshot")
    m = manifest_of(machine, initrd=initrd, init=init)

    def make_into(work: Path, key: str) -> None:
        if verbose():
            log(f"virt: no snapshot for this image and these settings yet ({key[:12]}); making one")
        if notices.first_time(store.root / "notices", NOTICE):
            log(NOTICE)
        _write_initrd(work / INITRD, initrd, cpio)
        make(work, machine=machine)

    for again in (False, True):
        try:
            got = store.obtain(VIRT_SNAPSHOT, m, make_into, quiet=not verbose())
        except OSError as e:
            raise NoSnapshot(f"could not make a snapshot: {e}") from None
        if got.entry is None:
            raise NoSnapshot("the snapshot was made but is not in the store")
        try:
            return checked(got.entry)
        except NoSnapshot as e:
            if got.source is not Source.LOCAL or again:
                raise
            if verbose():
                log(f"virt: {e}; making one")
            discard(Snapshot(got.entry))  # stored, but not restorable here: made once more
    raise AssertionError("unreachable")


def _write_initrd(dest: Path, initrd: Path, cpio: bytes) -> None:
    with open(dest, "wb") as f, open(initrd, "rb") as src:
        shutil.copyfileobj(src, f)
        f.write(pad4(f.tell()))
        f.write(cpio)
