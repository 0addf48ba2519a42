"""The QEMU toolkit without a VM: qemu.py's pure command-line builders, kvm.py's accelerator
choice, firmware look-ups, and headless.boot_to_marker's console handling, launch() and the QMP
client against a fake qemu (a Python script)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import process_gone

from pipeline import firmware, headless, kvm, launch, qemu, qmp
from pipeline.errors import UserError
from pipeline.firmware import Ovmf
from pipeline.qemu import Accel, DiskBus, Mode, VmSettings, qemu_cmd

KERNEL = Path("/k/vmlinuz")
INITRD = Path("/k/initrd.img")
DISK = Path("/store/root.ext4")
OVMF = Ovmf(Path("/fw/OVMF_CODE_4M.fd"), Path("/fw/OVMF_VARS_4M.fd"))
VARS = Path("/run/vm/OVMF_VARS.fd")
TCG = VmSettings(accel=Accel.TCG)


def after(cmd: list[str], flag: str) -> list[str]:
    """Every value that follows `flag` in cmd."""
    return [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == flag]


def tgz(settings: VmSettings = TCG, **kw: object) -> list[str]:
    return qemu_cmd(Mode.TGZ, settings=settings, disk=kw.pop("disk", DISK), kernel=KERNEL, initrd=INITRD, **kw)


def uefi(settings: VmSettings = TCG) -> list[str]:
    return qemu_cmd(Mode.UEFI, settings=settings, disk=Path("/store/uefi.img"), ovmf=OVMF, ovmf_vars=VARS)


def test_secure_boot_firmware_gets_smm_and_the_smm_only_flash() -> None:
    secboot = Ovmf(Path("/fw/OVMF_CODE_4M.secboot.fd"), Path("/store/sb_vars/k/sb-vars.fd"), secure=True)
    cmd = qemu_cmd(Mode.UEFI, settings=TCG, disk=Path("/store/uefi.img"), ovmf=secboot, ovmf_vars=VARS)
    assert after(cmd, "-machine") == ["q35,smm=on"]
    assert after(cmd, "-global") == ["driver=cfi.pflash01,property=secure,value=on"]
    assert after(cmd, "-drive")[0] == "if=pflash,format=raw,unit=0,readonly=on,file=/fw/OVMF_CODE_4M.secboot.fd"
    assert "-global" not in uefi() and "q35,smm=on" not in uefi()  # the plain build is as it was


def test_a_secure_boot_vm_under_tcg_has_one_vcpu() -> None:
    """SMM under TCG gathers every vCPU at each SMI: one vCPU brings the signed row near the plain one."""
    secboot = Ovmf(Path("/fw/OVMF_CODE_4M.secboot.fd"), Path("/store/sb_vars/k/sb-vars.fd"), secure=True)
    two = VmSettings(accel=Accel.TCG, cpus=2)
    cmd = qemu_cmd(Mode.UEFI, settings=two, disk=Path("/store/uefi.img"), ovmf=secboot, ovmf_vars=VARS)
    assert after(cmd, "-smp") == ["1"] and after(cmd, "-accel") == ["tcg"]
    assert after(uefi(two), "-smp") == ["2"]  # the plain firmware: as asked
    kvm = VmSettings(accel=Accel.KVM, cpus=2)
    assert after(qemu_cmd(Mode.UEFI, settings=kvm, disk=Path("/store/uefi.img"), ovmf=secboot, ovmf_vars=VARS),
                 "-smp") == ["2"]


def test_only_a_uefi_machine_has_secure_boot_variables() -> None:
    qemu.Machine(Mode.UEFI, TCG, Path("/d.img"), secure_vars=Path("/v.fd"))
    with pytest.raises(ValueError):
        qemu.Machine(Mode.BIOS, TCG, Path("/d.img"), secure_vars=Path("/v.fd"))


def test_find_secboot_ovmf(tmp_path: Path) -> None:
    code, vars_ = tmp_path / "OVMF_CODE_4M.secboot.fd", tmp_path / "sb-vars.fd"
    with pytest.raises(UserError) as e:
        firmware.find_secboot_ovmf(vars_, [str(code)])
    assert "Secure Boot build" in e.value.message and e.value.hint == "apt install ovmf"
    code.touch()
    with pytest.raises(UserError):
        firmware.find_secboot_ovmf(vars_, [str(code)])  # the enrolled variables are missing
    vars_.touch()
    assert firmware.find_secboot_ovmf(vars_, [str(code)]) == Ovmf(code, vars_, secure=True)


# ── modes ──


def test_tgz_boots_the_kernel_with_the_root_image_as_virtio_disk() -> None:
    cmd = tgz()
    assert cmd[0] == "qemu-system-x86_64"
    assert after(cmd, "-kernel") == [str(KERNEL)]
    assert after(cmd, "-initrd") == [str(INITRD)]
    assert after(cmd, "-append") == ["root=/dev/vda rw console=ttyS0,115200"]
    assert after(cmd, "-drive") == [f"if=none,id=disk0,file={DISK},format=raw,snapshot=on,cache=unsafe"]
    assert after(cmd, "-device")[0] == "virtio-blk-pci,drive=disk0"  # no bootindex: -kernel owns 0
    assert "-bios" not in cmd and "if=pflash" not in " ".join(cmd)


def test_tgz_cmdline_override_and_extra_args() -> None:
    extra = VmSettings(accel=Accel.TCG, kernel_args="systemd.unit=rescue.target quiet")
    assert after(tgz(extra), "-append") == [
        "root=/dev/vda rw console=ttyS0,115200 systemd.unit=rescue.target quiet"
    ]
    assert after(tgz(extra, cmdline="console=ttyS0"), "-append") == ["console=ttyS0 systemd.unit=rescue.target quiet"]


def test_tgz_without_disk_has_no_root_and_no_drive() -> None:
    cmd = qemu_cmd(Mode.TGZ, settings=TCG, disk=None, kernel=KERNEL)
    assert after(cmd, "-append") == ["console=ttyS0,115200"]
    assert "-drive" not in cmd and "-initrd" not in cmd


@pytest.mark.parametrize("bus,root", [("virtio", "/dev/vda"), ("sata", "/dev/sda"), ("nvme", "/dev/nvme0n1"),
                                      ("usb", "/dev/sda")])  # fmt: skip
def test_tgz_root_follows_the_disk_bus(bus: str, root: str) -> None:
    cmd = tgz(VmSettings(accel=Accel.TCG, disk_bus=DiskBus(bus)))
    assert after(cmd, "-append")[0].startswith(f"root={root} rw ")


def test_bios_boots_the_disk_through_seabios() -> None:
    cmd = qemu_cmd(Mode.BIOS, settings=TCG, disk=Path("/store/bios.img"))
    assert after(cmd, "-machine") == ["q35"]
    for flag in ("-kernel", "-initrd", "-append", "-bios"):
        assert flag not in cmd
    assert "if=pflash" not in " ".join(cmd)
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in after(cmd, "-device")


def test_uefi_uses_q35_read_only_code_and_the_vars_copy() -> None:
    cmd = uefi()
    assert after(cmd, "-machine") == ["q35"]
    drives = after(cmd, "-drive")
    assert drives[:2] == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF.code}",
        f"if=pflash,format=raw,unit=1,file={VARS}",
    ]
    assert str(OVMF.vars_template) not in " ".join(cmd)  # the template is never handed to qemu
    assert drives[2].startswith("if=none,id=disk0,file=/store/uefi.img,format=raw,snapshot=on")
    assert "-kernel" not in cmd and "-append" not in cmd


@pytest.mark.parametrize(
    "mode,kw",
    [
        (Mode.TGZ, {"disk": DISK}),  # no kernel
        (Mode.BIOS, {"disk": DISK, "kernel": KERNEL}),
        (Mode.BIOS, {"disk": DISK, "cmdline": "quiet"}),
        (Mode.BIOS, {"disk": None}),
        (Mode.UEFI, {"disk": DISK, "ovmf": OVMF}),  # no vars copy
        (Mode.BIOS, {"disk": DISK, "ovmf": OVMF, "ovmf_vars": VARS}),
    ],
)
def test_wrong_argument_combinations_are_programming_errors(mode: Mode, kw: dict) -> None:
    with pytest.raises(ValueError):
        qemu_cmd(mode, settings=TCG, **kw)


def test_extra_kernel_args_outside_tgz_are_a_user_error() -> None:
    with pytest.raises(UserError, match="only apply in tgz mode"):
        uefi(VmSettings(accel=Accel.TCG, kernel_args="quiet"))


def test_mode_behaviour() -> None:
    assert [m.direct_kernel for m in Mode] == [True, False, False]
    assert [m.needs_ovmf for m in Mode] == [False, False, True]
    assert Mode("uefi") is Mode.UEFI


# ── disks ──


def test_snapshot_is_the_default_and_persistent_mode_writes_through() -> None:
    assert "snapshot=on" in after(tgz(), "-drive")[0]
    persistent = VmSettings(accel=Accel.TCG, snapshot=False)
    drive = after(tgz(persistent, disk=Path("/vm/root.qcow2")), "-drive")[0]
    assert drive == "if=none,id=disk0,file=/vm/root.qcow2,format=qcow2"


def test_commas_in_paths_are_escaped() -> None:
    drive = after(tgz(disk=Path("/a,b/root.ext4")), "-drive")[0]
    assert "file=/a,,b/root.ext4,format=raw" in drive


@pytest.mark.parametrize(
    "bus,devices",
    [
        ("virtio", ["virtio-blk-pci,drive=disk0,bootindex=0"]),
        ("sata", ["ide-hd,drive=disk0,bus=ide.0,bootindex=0"]),
        ("nvme", ["nvme,drive=disk0,serial=ldt-disk0,bootindex=0"]),
        ("usb", ["qemu-xhci,id=xhci", "usb-storage,bus=xhci.0,drive=disk0,bootindex=0"]),
    ],
)
def test_disk_bus_devices(bus: str, devices: list[str]) -> None:
    cmd = uefi(VmSettings(accel=Accel.TCG, disk_bus=DiskBus(bus), network=False))
    assert after(cmd, "-device") == [*devices, "virtio-rng-pci"]


# ── network, console ──


def test_port_forwards_become_hostfwd_on_localhost() -> None:
    cmd = tgz(VmSettings(accel=Accel.TCG, port_forwards=((2222, 22), (8080, 80))))
    assert after(cmd, "-netdev") == [
        "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80"
    ]
    assert "virtio-net-pci,netdev=net0,romfile=" in after(cmd, "-device")


def test_port_forwards_may_be_given_as_a_list() -> None:
    settings = VmSettings(port_forwards=[(2222, 22)])  # type: ignore[arg-type]
    assert settings.port_forwards == ((2222, 22),) and hash(settings)


def test_network_off_has_no_nic() -> None:
    cmd = tgz(VmSettings(accel=Accel.TCG, network=False))
    assert "-netdev" not in cmd and "-nic" not in cmd
    assert "-nodefaults" in cmd  # so qemu adds no NIC of its own either


@pytest.mark.parametrize(
    "kw,hint",
    [
        ({"port_forwards": ((2222, 22),), "network": False}, "network"),
        ({"port_forwards": ((0, 22),)}, "ports"),
        ({"port_forwards": ((2222, 70000),)}, "ports"),
        ({"memory_mib": 16}, "MiB"),
    ],
)
def test_bad_settings_are_user_errors(kw: dict, hint: str) -> None:
    with pytest.raises(UserError) as e:
        VmSettings(**kw)
    assert hint in e.value.render()


def test_headless_console_is_plain_serial_on_stdio() -> None:
    cmd = tgz()
    assert after(cmd, "-serial") == ["stdio"]
    assert after(cmd, "-monitor") == ["none"]
    assert after(cmd, "-display") == ["none"]
    assert "-no-reboot" in cmd


def test_interactive_console_multiplexes_the_monitor() -> None:
    cmd = tgz(VmSettings(accel=Accel.TCG, interactive=True))
    assert after(cmd, "-serial") == ["mon:stdio"]
    assert "-monitor" not in cmd and "-no-reboot" not in cmd


def test_memory_and_cpus() -> None:
    cmd = tgz(VmSettings(accel=Accel.TCG, memory_mib=4096, cpus=3))
    assert after(cmd, "-m") == ["4096"] and after(cmd, "-smp") == ["3"]


# ── accelerator ──


def test_accel_args() -> None:
    assert Accel.KVM.qemu_args(4) == ["-accel", "kvm", "-cpu", "host"]
    assert Accel.TCG.qemu_args(1) == ["-accel", "tcg", "-cpu", "max"]
    assert Accel.TCG.qemu_args(2) == ["-accel", "tcg,thread=multi", "-cpu", "max"]
    assert after(tgz(VmSettings(accel=Accel.KVM)), "-accel") == ["kvm"]


def test_unresolved_accel_cannot_build_a_command() -> None:
    with pytest.raises(ValueError, match="select_accel"):
        tgz(VmSettings())
    assert tgz(VmSettings().with_accel(Accel.TCG)) == tgz()


def test_requested_accel_precedence() -> None:
    env = {"LDT_ACCEL": "kvm"}
    assert kvm.requested_accel(Accel.TCG, env) == (Accel.TCG, "requested")
    assert kvm.requested_accel(Accel.AUTO, env) == (Accel.KVM, "LDT_ACCEL=kvm")
    assert kvm.requested_accel(Accel.AUTO, {"LDT_ACCEL": " TCG "})[0] is Accel.TCG
    assert kvm.requested_accel(Accel.AUTO, {"LDT_ACCEL": ""})[0] is Accel.AUTO
    assert kvm.requested_accel(Accel.AUTO, {})[0] is Accel.AUTO


def test_bad_ldt_accel_is_a_user_error() -> None:
    with pytest.raises(UserError) as e:
        kvm.requested_accel(Accel.AUTO, {"LDT_ACCEL": "hvf"})
    assert "LDT_ACCEL='hvf'" in e.value.message and "kvm" in (e.value.hint or "")


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record probe calls instead of running qemu; KVM looks present."""
    calls: list[str] = []

    def fake_probe(qemu_path: str, timeout: float = 0) -> kvm.AccelChoice:
        calls.append(qemu_path)
        return kvm.AccelChoice(Accel.TCG, "KVM unusable: fake")

    monkeypatch.setattr(kvm, "probe_kvm", fake_probe)
    monkeypatch.setattr(kvm, "kvm_unavailable", lambda: None)
    monkeypatch.setattr(firmware, "find_qemu", lambda name=qemu.QEMU: sys.executable)
    monkeypatch.setattr(kvm, "_probed", {})
    return calls


def test_env_override_skips_the_probe(no_probe: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    choice = kvm.select_accel(env={"LDT_ACCEL": "tcg"})
    assert choice == kvm.AccelChoice(Accel.TCG, "LDT_ACCEL=tcg")
    assert no_probe == []
    assert capsys.readouterr().err == "ldt: accelerator: tcg (LDT_ACCEL=tcg)\n"


def test_forced_kvm_without_dev_kvm_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "kvm_unavailable", lambda: "no /dev/kvm: hardware virtualization unavailable")
    with pytest.raises(UserError) as e:
        kvm.select_accel(Accel.KVM, env={})
    assert "no /dev/kvm" in e.value.message and "LDT_ACCEL=tcg" in (e.value.hint or "")
    assert kvm.select_accel(env={}, notice=False).reason.startswith("no /dev/kvm")


def test_probe_result_is_cached_in_process_and_on_disk(tmp_path: Path, no_probe: list[str]) -> None:
    first = kvm.select_accel(cache_dir=tmp_path, env={}, notice=False)
    assert first.accel is Accel.TCG and no_probe == [sys.executable]
    assert kvm.select_accel(cache_dir=tmp_path, env={}, notice=False) == first  # in-process
    kvm._probed.clear()
    again = kvm.select_accel(cache_dir=tmp_path, env={}, notice=False)  # from the file
    assert again.reason == "KVM unusable: fake; cached" and len(no_probe) == 1
    stored = json.loads((tmp_path / "accel-probe.json").read_text())
    assert stored["key"]["kernel"] == os.uname().release and stored["accel"] == "tcg"


def test_a_changed_key_probes_again(tmp_path: Path, no_probe: list[str]) -> None:
    (tmp_path / "accel-probe.json").write_text(json.dumps({"key": {"kernel": "other"}, "accel": "kvm", "reason": "x"}))
    assert kvm.select_accel(cache_dir=tmp_path, env={}, notice=False).accel is Accel.TCG
    assert len(no_probe) == 1


def test_a_corrupt_cache_file_probes_again(tmp_path: Path, no_probe: list[str]) -> None:
    (tmp_path / "accel-probe.json").write_text("{not json")
    kvm.select_accel(cache_dir=tmp_path, env={}, notice=False)
    assert len(no_probe) == 1


def test_probe_firmware_is_the_assembled_image() -> None:
    image = kvm.probe_firmware()
    assert len(image) == 0x10000
    # sha256 of `as --64 probe.S && ld -Ttext=0xF0000 --oformat binary` (the listing in qemu.py)
    assert hashlib.sha256(image).hexdigest() == "4f9574b3c70f213d6d2b6f7dacaf1bfcb699e0fe2a9d671b9ebf12dddaa50f4c"
    assert image[0xFFF0:0xFFF5] == bytes.fromhex("ea00ff00f0")  # reset vector: jmp f000:ff00


def test_probe_listing_blocks_do_not_overlap() -> None:
    ends = []
    for offset, listing in kvm._PROBE_CODE:
        assert not ends or offset >= ends[-1]
        ends.append(offset + sum(len(bytes.fromhex(code)) for code, _ in listing))
    assert ends[-1] <= 0x10000


def test_probe_cmd_uses_exactly_the_kvm_flags() -> None:
    cmd = qemu.probe_cmd(Path("/tmp/p.bin"), Accel.KVM.qemu_args())
    assert cmd[cmd.index("-accel") : cmd.index("-accel") + 4] == ["-accel", "kvm", "-cpu", "host"]
    assert after(cmd, "-bios") == ["/tmp/p.bin"]
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in after(cmd, "-device")
    assert kvm.PROBE_EXIT == 85


def test_qemu_error_picks_the_error_line() -> None:
    err = (
        "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni\n"
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
        "qemu-system-x86_64: ../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.\n"
    )
    assert launch.qemu_error(err) == "error: failed to set MSR 0x10a to 0x69"
    assert launch.qemu_error("qemu-system-x86_64: -drive x: Could not open 'x'\n") == "-drive x: Could not open 'x'"
    assert launch.exit_status(-6) == "was killed by SIGABRT" and launch.exit_status(1) == "exited with status 1"


# ── host look-ups ──


def test_find_ovmf_takes_the_first_complete_pair(tmp_path: Path) -> None:
    (tmp_path / "CODE_4M.fd").touch()  # its VARS is missing: skipped
    (tmp_path / "CODE.fd").touch()
    (tmp_path / "VARS.fd").write_bytes(b"vars")
    pairs = [(str(tmp_path / "CODE_4M.fd"), str(tmp_path / "VARS_4M.fd")),
             (str(tmp_path / "CODE.fd"), str(tmp_path / "VARS.fd"))]  # fmt: skip
    ovmf = firmware.find_ovmf(pairs)
    assert ovmf == Ovmf(tmp_path / "CODE.fd", tmp_path / "VARS.fd")
    copy = firmware.fresh_ovmf_vars(ovmf, tmp_path / "run")
    assert copy.read_bytes() == b"vars" and copy != ovmf.vars_template


def test_missing_ovmf_and_qemu_say_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        firmware.find_ovmf([(str(tmp_path / "a"), str(tmp_path / "b"))])
    assert e.value.hint == "apt install ovmf"
    with pytest.raises(UserError) as e:
        firmware.find_qemu("qemu-system-nonexistent")
    assert "qemu-system-x86" in (e.value.hint or "")


# ── console matching ──


def test_login_prompt_marker() -> None:
    assert headless.LOGIN_PROMPT.search("localhost login: ")
    assert headless.LOGIN_PROMPT.search("hello-vm.example login: [   32.98] kvm: Nested Virtualization enabled")
    assert headless.LOGIN_PROMPT.search("login: ")
    assert not headless.LOGIN_PROMPT.search("         Starting systemd-logind.service - User Login Management...")
    assert not headless.LOGIN_PROMPT.search("Last login: Mon Jan 1")


def test_strip_ansi() -> None:
    raw = "\x1b[0;32m  OK  \x1b[0m] Started \x1b]0;title\x07getty\r\x1b[?25l\x1b(B."
    assert headless.strip_ansi(raw) == "  OK  ] Started getty."


def test_str_markers_are_literal() -> None:
    assert headless.as_pattern("(initramfs)").search("(initramfs) ")
    assert not headless.as_pattern("a.c").search("abc")
    pattern = headless.as_pattern(headless.LOGIN_PROMPT)
    assert pattern is headless.LOGIN_PROMPT


# ── boot_to_marker against a fake qemu ──
# The fake is a Python script standing in for qemu (it ignores the -qmp argument that
# boot_to_marker appends), writes its pid to a file, prints a console, then sleeps.


def fake_qemu(tmp_path: Path, body: str) -> tuple[list[str], Path]:
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        out = sys.stdout
        """
    ) + textwrap.dedent(body)
    return [sys.executable, "-c", script], pidfile


def gone(pidfile: Path) -> bool:
    return process_gone(int(pidfile.read_text()))


def test_marker_in_an_unfinished_line_is_found(tmp_path: Path) -> None:
    cmd, pidfile = fake_qemu(tmp_path, """
        out.write("\\x1b[0;32mbooting\\x1b[0m\\r\\n" * 40 + "Debian GNU/Linux 12 localhost ttyS0\\r\\n\\r\\n")
        out.write("localhost login: "); out.flush()
        time.sleep(60)
    """)  # fmt: skip
    start = time.monotonic()
    result = headless.boot_to_marker(cmd, timeout=20, grace=0)
    assert result.ok, result
    assert result.seconds < 10 and time.monotonic() - start < 10
    assert result.tail[-1] == "localhost login: "
    assert len(result.tail) == 30 and result.tail[0] == "booting"
    assert gone(pidfile)


def test_timeout_returns_the_tail_and_kills(tmp_path: Path) -> None:
    cmd, pidfile = fake_qemu(tmp_path, """
        for i in range(50):
            out.write(f"line {i}\\n")
        out.flush()
        time.sleep(60)
    """)  # fmt: skip
    result = headless.boot_to_marker(cmd, marker="never", timeout=1.0)
    assert not result.ok
    assert "within 1s" in result.reason
    assert result.tail == [f"line {i}" for i in range(20, 50)]
    assert gone(pidfile)


def test_early_exit_reports_status_and_stderr(tmp_path: Path) -> None:
    cmd, pidfile = fake_qemu(tmp_path, """
        out.write("half a line")
        sys.stderr.write("qemu-system-x86_64: -drive x: Could not open 'x'\\n")
        sys.exit(1)
    """)  # fmt: skip
    result = headless.boot_to_marker(cmd, marker="never", timeout=20)
    assert not result.ok and result.seconds < 10
    assert result.reason == "qemu exited with status 1 before 'never': -drive x: Could not open 'x'"
    assert result.tail == ["half a line"]


SECURE = headless.Expect(require=(re.compile("secureboot: Secure boot enabled"),), refuse=re.compile("Access Denied"))
VERITY = headless.Expect(require=(re.compile("ldt-verity: root opened: "),))


def test_secure_boot_needs_the_kernel_line_before_the_marker(tmp_path: Path) -> None:
    cmd, _ = fake_qemu(tmp_path, """
        out.write("[    0.000000] secureboot: Secure boot enabled\\n" + "more\\n" * 60 + "localhost login: ")
        out.flush(); time.sleep(60)
    """)  # fmt: skip
    result = headless.boot_to_marker(cmd, timeout=20, grace=0, expect=SECURE)
    assert result.ok and not result.refused, result  # seen 60 lines before the prompt: remembered
    cmd, _ = fake_qemu(tmp_path, """
        out.write("no secure boot here\\nlocalhost login: "); out.flush(); time.sleep(60)
    """)  # fmt: skip
    result = headless.boot_to_marker(cmd, timeout=20, grace=0, expect=SECURE)
    assert not result.ok and not result.refused
    assert result.reason == "no 'secureboot: Secure boot enabled' on the console before the check passed"


def test_every_required_line_must_show(tmp_path: Path) -> None:
    both = SECURE + VERITY
    assert both.refuse is not None and both.refuse.pattern == "(?:Access Denied)" and len(both.require) == 2
    cmd, _ = fake_qemu(tmp_path, """
        out.write("ldt-verity: root opened: /dev/mapper/root\\n[  1.0] secureboot: Secure boot enabled\\n")
        out.write("localhost login: "); out.flush(); time.sleep(60)
    """)  # fmt: skip
    assert headless.boot_to_marker(cmd, timeout=20, grace=0, expect=both).ok
    cmd, _ = fake_qemu(tmp_path, """
        out.write("[  1.0] secureboot: Secure boot enabled\\nlocalhost login: "); out.flush(); time.sleep(60)
    """)  # fmt: skip
    result = headless.boot_to_marker(cmd, timeout=20, grace=0, expect=both)
    assert not result.ok
    assert result.reason == "no 'ldt-verity: root opened: ' on the console before the check passed"


def test_a_firmware_refusal_ends_the_boot_at_once_in_one_line(tmp_path: Path) -> None:
    cmd, pidfile = fake_qemu(tmp_path, """
        out.write('BdsDxe: failed to load Boot0001 "UEFI QEMU HARDDISK" from PciRoot(0x0): Access Denied\\r\\n')
        out.flush(); time.sleep(60)
    """)  # fmt: skip
    result = headless.boot_to_marker(cmd, timeout=20, grace=0, expect=SECURE)
    assert not result.ok and result.refused and result.seconds < 10
    assert result.reason == ('the firmware refused the image: BdsDxe: failed to load Boot0001 '
                             '"UEFI QEMU HARDDISK" from PciRoot(0x0): Access Denied')
    assert gone(pidfile)


def test_keyboard_interrupt_kills_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd, pidfile = fake_qemu(tmp_path, """
        out.write("a line\\n"); out.flush()
        time.sleep(60)
    """)  # fmt: skip

    def interrupted(text: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(headless, "strip_ansi", interrupted)
    with pytest.raises(KeyboardInterrupt):
        headless.boot_to_marker(cmd, timeout=20)
    assert gone(pidfile)


FAKE_QMP = """
    import json, socket
    path = sys.argv[sys.argv.index("-qmp") + 1].removeprefix("unix:").split(",")[0]
    server = socket.socket(socket.AF_UNIX); server.bind(path); server.listen()
    out.write("localhost login: "); out.flush()
    log = open({log!r}, "a")
    while True:
        conn, _ = server.accept()
        stream = conn.makefile("rwb")
        stream.write(b'{{"QMP": {{}}}}\\n'); stream.flush()
        for line in stream:
            command = json.loads(line)["execute"]
            log.write(command + "\\n"); log.flush()
            stream.write(b'{{"return": {{}}}}\\n'); stream.flush()
            if command in {exits_on}:
                sys.exit(0)
        conn.close()
"""


@pytest.mark.parametrize(
    "exits_on,commands,slow",
    [
        (("system_powerdown",), ["qmp_capabilities", "system_powerdown"], False),  # a guest that powers off
        (("quit",), ["qmp_capabilities", "system_powerdown", "qmp_capabilities", "quit"], True),  # one that doesn't
    ],
)
def test_power_off_after_the_marker(tmp_path: Path, exits_on: tuple[str], commands: list[str], slow: bool) -> None:
    log = tmp_path / "qmp.log"
    cmd, pidfile = fake_qemu(tmp_path, FAKE_QMP.format(log=str(log), exits_on=exits_on))
    start = time.monotonic()
    result = headless.boot_to_marker(cmd, timeout=20, grace=1.5)
    elapsed = time.monotonic() - start
    assert result.ok, result
    assert log.read_text().split() == commands
    assert (elapsed > 1.5) is slow and elapsed < 8
    assert gone(pidfile)


def test_interactive_commands_are_refused() -> None:
    with pytest.raises(ValueError, match="headless"):
        headless.boot_to_marker(tgz(VmSettings(accel=Accel.TCG, interactive=True)), timeout=1)


# ── launch and the QMP client ──


def test_launch_hands_qemu_its_socket_ends_and_reaps_it(tmp_path: Path) -> None:
    cmd, pidfile = fake_qemu(tmp_path, """
        import socket
        socket.socket(fileno=int(sys.argv[1])).sendall(b"hello")
        time.sleep(60)
    """)  # fmt: skip
    with launch.launch(("port",)) as vm:
        vm.start([*cmd, str(vm.fds["port"])])
        vm.ours["port"].settimeout(20)
        assert vm.ours["port"].recv(5) == b"hello"
    assert gone(pidfile)


def test_qmp_skips_events_and_says_what_qemu_refused() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b'{"QMP": {}}\n{"return": {}}\n{"event": "STOP"}\n{"return": {"status": "completed"}}\n'
                       b'{"error": {"desc": "no such command"}}\n')
        monitor = qmp.Qmp(ours, timeout=5)
        assert monitor.call("query-migrate") == {"status": "completed"}
        with pytest.raises(qmp.QmpError, match="no such command"):
            monitor.call("bogus")
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(qmp.QmpClosed):
            monitor.call("quit")


def test_a_machine_is_built_like_its_parts() -> None:
    m = qemu.Machine(Mode.TGZ, TCG, DISK, KERNEL, INITRD, "console=ttyS0")
    assert qemu.machine_cmd(m) == tgz(cmdline="console=ttyS0")
