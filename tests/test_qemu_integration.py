"""pipeline.qemu against the real qemu-system-x86_64: the KVM probe, every command line
qemu must accept, and boot_to_marker on a real kernel + initramfs (no root disk).

Every guest runs under boot_to_marker() or the probe, so every guest has a timeout.
Full-disk boots (bios/uefi images, root on ext4) belong with the disk builders' tests.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from pipeline import firmware, headless, kvm, qemu
from pipeline.qemu import Accel, DiskBus, Mode, VmSettings

pytestmark = pytest.mark.integration

@pytest.fixture(scope="session", autouse=True)
def need_qemu() -> None:
    if shutil.which(qemu.QEMU) is None:
        pytest.skip(f"{qemu.QEMU} is not installed ({firmware.QEMU_HINT})")


@pytest.fixture(scope="session")
def hello_kernel_initrd(hello_artifacts: dict[str, Path]) -> tuple[Path, Path]:
    """(kernel, initrd) of recipes/hello, from the pipeline's extract_boot stage."""
    return hello_artifacts["vmlinuz"], hello_artifacts["initrd.img"]


@pytest.fixture(scope="session")
def accel() -> Accel:
    """What select_accel() picks here (TCG on the nested hosts this was written on)."""
    return kvm.select_accel(env={}, notice=False).accel


def tagged(cmd: list[str]) -> tuple[list[str], str]:
    """The command with a unique -name, so the test can look for a leftover process."""
    tag = f"ldt-test-{uuid.uuid4().hex[:12]}"
    return [*cmd, "-name", tag], tag


def running(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


# ── the accelerator ──


def test_kvm_probe_is_bounded_and_cached(tmp_path: Path) -> None:
    kvm._probed.clear()
    start = time.monotonic()
    choice = kvm.select_accel(cache_dir=tmp_path, env={})
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"the probe took {elapsed:.1f}s"
    if choice.accel is Accel.KVM:
        assert "reached long mode" in choice.reason
    else:  # the hosts this was developed on: nested KVM aborts (-cpu host) or crawls
        assert choice.reason
    kvm._probed.clear()
    start = time.monotonic()
    again = kvm.select_accel(cache_dir=tmp_path, env={})
    assert time.monotonic() - start < 0.1
    assert again.accel is choice.accel and again.reason.endswith("; cached")


def test_probe_firmware_reaches_long_mode_under_tcg() -> None:
    ok, why = kvm.probe_guest(Accel.TCG.qemu_args(2), timeout=10)
    assert ok, why


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm")
def test_probe_verdict_on_plain_kvm_is_bounded() -> None:
    """Without -cpu host (which aborts on some hosts) the probe sees KVM's speed itself."""
    start = time.monotonic()
    ok, why = kvm.probe_guest(["-accel", "kvm", "-cpu", "qemu64"], timeout=2.0)
    assert time.monotonic() - start < 5
    assert ok or "did not finish within 2s" in why or "qemu" in why


def test_ldt_accel_env_wins(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LDT_ACCEL", "tcg")
    assert kvm.select_accel().accel is Accel.TCG
    assert "accelerator: tcg (LDT_ACCEL=tcg)" in capsys.readouterr().err


# ── qemu accepts every command line we build (paused with -S, nothing boots) ──


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("bus", list(DiskBus))
def test_qemu_accepts_the_command_line(
    mode: Mode, bus: DiskBus, tmp_path: Path, accel: Accel, request: pytest.FixtureRequest
) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(16 << 20)
    settings = VmSettings(accel=accel, memory_mib=256, disk_bus=bus, port_forwards=((42022, 22),))
    kw: dict = {}
    if mode is Mode.TGZ:  # qemu parses the kernel at startup, so it must be a real one
        kernel, initrd = request.getfixturevalue("hello_kernel_initrd")
        kw = {"kernel": kernel, "initrd": initrd}
    if mode is Mode.UEFI:
        ovmf = firmware.find_ovmf()
        kw = {"ovmf": ovmf, "ovmf_vars": firmware.fresh_ovmf_vars(ovmf, tmp_path)}
    cmd, tag = tagged([*qemu.qemu_cmd(mode, settings=settings, disk=disk, **kw), "-S"])
    result = headless.boot_to_marker(cmd, marker="never", timeout=1.5, grace=0)
    assert not result.ok
    assert "within 1.5s" in result.reason, result.reason  # still running: qemu liked the argv
    assert running(tag) == []


# ── real boots (kernel + initramfs, no root disk) ──


def hello_cmd(kernel_initrd: tuple[Path, Path], accel: Accel, cmdline: str) -> tuple[list[str], str]:
    kernel, initrd = kernel_initrd
    settings = VmSettings(accel=accel, memory_mib=1024, network=False)
    return tagged(qemu.qemu_cmd(Mode.TGZ, settings=settings, disk=None, kernel=kernel, initrd=initrd,
                                cmdline=cmdline))  # fmt: skip


def test_boot_to_the_initramfs_shell(hello_kernel_initrd: tuple[Path, Path], accel: Accel) -> None:
    """break=top: the initramfs drops to its shell first thing (~20 s under TCG on 2 cores)."""
    cmd, tag = hello_cmd(hello_kernel_initrd, accel, "console=ttyS0 quiet break=top")
    start = time.monotonic()
    result = headless.boot_to_marker(cmd, marker="(initramfs)", timeout=120, grace=1)
    assert result.ok, f"{result.reason}\n" + "\n".join(result.tail)
    assert result.seconds < 120
    assert "(initramfs)" in result.tail[-1]
    assert time.monotonic() - start < result.seconds + 10  # power-off is bounded too
    assert running(tag) == []


def test_marker_that_never_comes(hello_kernel_initrd: tuple[Path, Path], accel: Accel) -> None:
    cmd, tag = hello_cmd(hello_kernel_initrd, accel, "console=ttyS0 earlyprintk=ttyS0 panic=-1")
    start = time.monotonic()
    result = headless.boot_to_marker(cmd, marker="this never appears", timeout=6)
    assert time.monotonic() - start < 15
    assert not result.ok
    assert "within 6s" in result.reason
    assert result.tail, "with earlyprintk the kernel's real-mode setup prints within a second"
    assert result.reason == "no 'this never appears' on the console within 6s"
    assert running(tag) == []


def test_qemu_failing_at_startup(tmp_path: Path, accel: Accel) -> None:
    missing = tmp_path / "no-such-vmlinuz"
    cmd, tag = tagged(qemu.qemu_cmd(Mode.TGZ, settings=VmSettings(accel=accel), disk=None, kernel=missing))
    result = headless.boot_to_marker(cmd, timeout=30)
    assert not result.ok and result.seconds < 10
    assert result.reason.startswith("qemu exited with status 1")
    assert "no-such-vmlinuz" in result.reason
    assert running(tag) == []
