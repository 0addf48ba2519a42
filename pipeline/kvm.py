"""The accelerator choice: KVM when it works, TCG otherwise, and why, said in one line.

Reading order: the probe firmware (a hand-assembled 64 KiB BIOS, listed next to its source)
→ probe_guest()/probe_kvm() (boot it under KVM with exactly a KVM VM's flags) → the cache of
the answer (per host boot and qemu binary, in-process and in cache/accel-probe.json) →
select_accel(), which callers use.

/dev/kvm opening is not enough: on nested hosts KVM can abort at vCPU setup (`-cpu host`:
"failed to set MSR 0x10a") or run a guest over 1000x slower than TCG (3.6 µs per loop
iteration: a kernel then seems to hang right after its real-mode setup, decompressing).
So the probe boots a tiny firmware with exactly the flags a KVM VM gets; it must reach
64-bit long mode, spin 2^24 loop iterations (≈10 ms on working KVM, a minute on the broken
nested KVM we met, 0.2 s under TCG) and write to isa-debug-exit within PROBE_TIMEOUT.

The firmware is a 64 KiB flat BIOS image: QEMU maps it at 0xF0000 (and below 4 GiB) and
the CPU resets at 0xFFFF0. _PROBE_CODE is its listing, machine code next to the source
(GNU as, `.intel_syntax noprefix`, assembled with `as --64` and
`ld -Ttext=0xF0000 --oformat binary`, bytes checked against objdump); each block starts
at its ROM offset, gaps are zeros. Addresses inside the code are linear (0xF0000 + offset).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import firmware
from pipeline.errors import UserError
from pipeline.files import write_atomic
from pipeline.launch import exit_status, launch, qemu_error
from pipeline.qemu import QEMU, Accel, probe_cmd
from pipeline.run import log

ACCEL_ENV = "LDT_ACCEL"

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


def probe_guest(accel_args: Sequence[str], *, qemu: str = QEMU, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Run the probe firmware with these accelerator flags: (finished in time?, why)."""
    with tempfile.TemporaryDirectory(prefix="ldt-probe-") as tmp, launch() as vm:
        image = Path(tmp) / "probe.bin"
        image.write_bytes(probe_firmware())
        start = time.monotonic()
        proc = vm.start(probe_cmd(image, accel_args, qemu))
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
    qemu_path = firmware.find_qemu(qemu)
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

