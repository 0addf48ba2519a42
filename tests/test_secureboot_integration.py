"""Secure Boot for real: hello's UKI signed with test keys boots on OVMF's secboot build with those
keys enrolled (the kernel says Secure Boot is on, lockdown follows, Debian-signed modules still
load), and the firmware refuses an unsigned UKI, one signed with another key and a tampered one.

Each boot is a real QEMU under TCG, one at a time; a refusal is seen on OVMF's console, so those
boots end in seconds rather than at the timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project
from console import Watched, watch

from pipeline import disk, ext4, firmware, headless, ids, qemu, verity
from pipeline import secureboot as sb
from pipeline.run import run

pytestmark = pytest.mark.integration

EPOCH = 1_700_000_000
KEY = "secureboot-test"
BOOT_TIMEOUT = 600.0


def uefi_disk_with(uki: Path, root_img: Path, out: Path, *, key: str = KEY, epoch: int = EPOCH,
                   enroll: dict[str, Path] | None = None) -> Path:
    """disk.build_uefi_disk's layout, with a UKI made outside it (signed, unsigned, tampered), and
    the certificates for enrolling by hand where secureboot.esp_enrollment_paths() puts them."""
    enroll = enroll or {}
    esp_size = disk.fat_min_size(uki.stat().st_size + sum(p.stat().st_size for p in enroll.values()))
    (p1, p2), size = disk.layout([esp_size, root_img.stat().st_size], tail=disk.ALIGN)
    esp = disk.Partition(*p1, type=disk.ESP_TYPE, name="ESP", uuid=ids.derive_uuid(key, "gpt-esp"))
    root = disk.Partition(*p2, type=disk.ROOT_X86_64_TYPE, name="root", uuid=ids.derive_uuid(key, "gpt-root"))
    env = disk.mtools_env(epoch)
    with open(out, "wb") as f:
        f.truncate(size)
    disk._partition_table(out, "gpt", str(ids.derive_uuid(key, "gpt-disk")).upper(), [esp, root])
    run(disk.mformat_cmd(out, esp, serial=ids.derive_u32(key, "esp-fat"), label="ESP"), env=env)
    run(disk.mmd_cmd(out, esp.start, ["::/EFI", "::/EFI/BOOT"]), env=env)
    run(disk.mcopy_cmd(out, esp.start, uki, disk.UKI_PATH), env=env)
    if enroll:
        run(disk.mmd_cmd(out, esp.start, ["::/EFI/keys", "::/loader", "::/loader/keys", "::/loader/keys/ldt"]),
            env=env)
        for name, dest in sb.esp_enrollment_paths().items():
            run(disk.mcopy_cmd(out, esp.start, enroll[name], dest), env=env)
    disk.sparse_copy_into(root_img, out, root.start)
    return out


def boot(disk_img: Path, ovmf: firmware.Ovmf, tmp: Path, *, until: Callable[[str], bool],
         timeout: float = BOOT_TIMEOUT) -> Watched:
    """Boot the disk on `ovmf` (a copy of its variables) until `until(console)` or the timeout: the
    argv is qemu.qemu_cmd()'s, the one the boot matrix runs (q35 with SMM for the secboot build)."""
    vars_copy = tmp / f"vars-{time.monotonic_ns()}.fd"
    shutil.copyfile(ovmf.vars_template, vars_copy)
    settings = qemu.VmSettings(memory_mib=1024, cpus=1, accel=qemu.Accel.TCG, network=False)
    cmd = qemu.qemu_cmd(qemu.Mode.UEFI, settings=settings, disk=disk_img, ovmf=ovmf, ovmf_vars=vars_copy)
    assert qemu.SMM_MACHINE in cmd and "driver=cfi.pflash01,property=secure,value=on" in cmd
    try:
        return watch(cmd, until, timeout)
    finally:
        vars_copy.unlink()


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def secure_boot_lines(console: str) -> str:
    """The console's lines about EFI and Secure Boot: what a missing "Secure boot enabled" is told by."""
    return "\n".join(line for line in console.splitlines() if re.search(r"(?i)secure ?boot|lockdown|\befi\b", line))


def logged_in(console: str) -> bool:
    return any(headless.LOGIN_PROMPT.match(line) for line in console.splitlines())


def decided(console: str) -> bool:
    return sb.BootVerdict.of(console) is not sb.BootVerdict.UNDECIDED


@dataclass(frozen=True)
class SbEnv:
    tmp: Path
    root: Path  # hello's rootfs.ext4
    unsigned: Path  # hello's UKI, as disk.build_uki makes it
    signed: Path  # ... signed with the test db key at EPOCH
    again: Path  # ... signed a second time, same key and epoch
    wrong: Path  # ... signed with another key set's db key
    tampered: Path  # signed, then one byte changed
    vars: Path  # OVMF vars with the test PK/KEK/db enrolled, Secure Boot on
    db_cert: Path
    enroll: dict[str, Path]  # the .cer/.esl/.auth files

    def uki(self, which: str) -> Path:
        return getattr(self, which)


@pytest.fixture(scope="module")
def sb_env(hello_artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> SbEnv:
    """Test keys made in a temporary folder, the enrolled vars, and hello's UKI in four forms."""
    tmp = tmp_path_factory.mktemp("sb")
    a = hello_artifacts
    keys = sb.ensure_keys(env={}, directory=tmp / "keys")
    other = sb.ensure_keys(env={}, directory=tmp / "other-keys")
    root_uuid, _ = ext4.read_ext4_identity(a["rootfs.ext4"])
    unsigned = disk.build_uki(a["vmlinuz"], a["initrd.img"], disk.kernel_cmdline(root_uuid), a["os-release"],
                              tmp / "unsigned.efi")
    signed = sb.sign(unsigned, tmp / "signed.efi", keys.db, epoch=EPOCH)
    tampered = tmp / "tampered.efi"
    data = bytearray(signed.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of the payload sections, which the Authenticode hash covers
    tampered.write_bytes(bytes(data))
    return SbEnv(tmp=tmp, root=a["rootfs.ext4"], unsigned=unsigned, signed=signed,
                 again=sb.sign(unsigned, tmp / "signed-again.efi", keys.db, epoch=EPOCH),
                 wrong=sb.sign(unsigned, tmp / "wrong.efi", other.db, epoch=EPOCH), tampered=tampered,
                 vars=sb.make_vars(keys, tmp / "OVMF_VARS.secboot.fd"), db_cert=keys.db.cert,
                 enroll=sb.enrollment_files(keys, tmp / "enroll", epoch=EPOCH))


def test_signing_is_reproducible_and_verifiable(sb_env: SbEnv) -> None:
    assert sb_env.signed.read_bytes() == sb_env.again.read_bytes()
    tmp = sb_env.tmp
    a = uefi_disk_with(sb_env.signed, sb_env.root, tmp / "a.img", enroll=sb_env.enroll)
    b = uefi_disk_with(sb_env.again, sb_env.root, tmp / "b.img", enroll=sb_env.enroll)
    assert file_digest(a) == file_digest(b)  # same inputs and key: the same signed disk
    a.unlink()
    b.unlink()
    assert sb.verify(sb_env.signed, sb_env.db_cert)
    assert not sb.verify(sb_env.wrong, sb_env.db_cert)
    assert not sb.verify(sb_env.tampered, sb_env.db_cert)
    assert not sb.verify(sb_env.unsigned, sb_env.db_cert)


def test_signed_uki_boots_under_enforced_secure_boot(sb_env: SbEnv) -> None:
    tmp = sb_env.tmp
    img = uefi_disk_with(sb_env.signed, sb_env.root, tmp / "signed.img", enroll=sb_env.enroll)
    result = boot(img, firmware.find_secboot_ovmf(sb_env.vars), tmp, until=logged_in)
    print(f"signed UKI, secboot OVMF: login prompt after {result.seconds:.1f}s")
    tail = result.console[-3000:]
    assert result.matched, tail
    assert sb.KERNEL_SECURE_BOOT_LINE in result.console, secure_boot_lines(result.console)
    assert sb.KERNEL_LOCKDOWN_LINE in result.console, tail  # Debian locks down under Secure Boot
    # lockdown demands signed modules: the root (virtio_blk, ext4 are modules) mounted, so they loaded
    assert "Loading of unsigned module is rejected" not in result.console
    assert "Loading of module with unavailable key is rejected" not in result.console


@pytest.mark.parametrize("which", ["unsigned", "wrong", "tampered"])
def test_firmware_refuses(sb_env: SbEnv, which: str) -> None:
    tmp = sb_env.tmp
    img = uefi_disk_with(sb_env.uki(which), sb_env.root, tmp / f"{which}.img")
    result = boot(img, firmware.find_secboot_ovmf(sb_env.vars), tmp, until=decided, timeout=300)
    print(f"{which} UKI, secboot OVMF: {sb.BootVerdict.of(result.console)} after {result.seconds:.1f}s")
    assert sb.BootVerdict.of(result.console) is sb.BootVerdict.REFUSED, result.console[-3000:]
    assert "Linux version" not in result.console


# ── the pipeline: [boot] secure_boot = true, through doit ───────────────────────────────


def signed_hello() -> dict[str, str]:
    """recipes/hello with [boot] secure_boot = true: its tgz, app, boot, ext4 and bios entries are
    the repository's (no setting of theirs changed), only the UEFI disk is new, and signed."""
    files = {f.name: f.read_text() for f in (ROOT / "recipes" / "hello").iterdir() if f.is_file()}
    toml = files["recipe.toml"]
    assert "\n[boot]\n" in toml
    files["recipe.toml"] = toml.replace("\n[boot]\n", "\n[boot]\nsecure_boot = true\n", 1)
    return files


def esp_file(img: Path, path: str, out: Path) -> Path:
    run(disk.mcopy_cmd(img, disk.ALIGN, Path(path), os.fspath(out)), env={"MTOOLS_SKIP_CHECK": "1"})
    return out


def test_check_boot_of_a_signed_recipe(hello_artifacts: dict[str, Path], tmp_path: Path) -> None:
    """`doit check_boot:hello` with secure_boot: the uefi row boots under enforced Secure Boot and
    says so; the keys are made on the first signed build, outside the project, never stored."""
    proj = make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}, "hello": signed_hello()})
    keys = tmp_path / "keys"
    env = {"LDT_SB_DIR": str(keys)}
    built = doit("build_efistub:hello", cwd=proj, env=env)
    text = built.stdout + built.stderr
    assert "made the Secure Boot db key pair" in text and "PRIVATE KEY" not in text
    img = (proj / "cache" / "recipes" / "hello" / "uefi.img").resolve()
    assert img.parent.parent.name == "uefi" and (img.parent / "sb-vars.fd").is_file()
    assert img.parent.name != hello_artifacts["uefi.img"].parent.name  # the signed disk is another entry
    uki = esp_file(img, disk.UKI_PATH, tmp_path / "BOOTX64.EFI")
    assert sb.verify(uki, keys / "db.crt")
    assert esp_file(img, "::/EFI/keys/db.cer", tmp_path / "db.cer").read_bytes() == sb.cert_der(keys / "db.crt")
    listing = run(["mdir", "-/", "-b", "-i", f"{img}@@{disk.ALIGN}", "::/"], capture=True,
                  env={"MTOOLS_SKIP_CHECK": "1"}).stdout.decode().split()
    assert sorted(f for f in listing if not f.endswith("/")) == sorted(
        ["::/EFI/BOOT/BOOTX64.EFI", *(dest for dest in sb.esp_enrollment_paths().values())])  # no key on the ESP
    secrets = [(keys / f"{role}.key").read_text().splitlines()[1].encode() for role in sb.Role]
    for f in (img.parent / "sb-vars.fd", *(img.parent / "sb-vars.fd").resolve().parent.iterdir()):
        assert not any(line in f.read_bytes() for line in secrets), f  # certificates only, never a key
    again = doit("build_efistub:hello", cwd=proj, env=env)
    assert "made the" not in again.stdout + again.stderr  # the keys are made once

    out = doit("check_boot:hello", cwd=proj, env=env)
    print(text := out.stdout + out.stderr)
    rows = {r.split()[1]: r for r in text.splitlines() if r.startswith("hello ")}
    assert rows["uefi"].split()[2] == "pass" and "secure boot" in rows["uefi"], text
    assert "booting uefi under Secure Boot" in text
    print(f"signed uefi row: {rows['uefi'].split()[3]}s")


# ── [disk] verity = true with secure_boot: firmware -> signed UKI -> root hash -> every block ──────────


def verity_hello() -> dict[str, str]:
    """signed_hello() with [disk] verity = true: the ext4, boot and uefi entries are new."""
    files = signed_hello()
    files["recipe.toml"] += "\n[disk]\nverity = true\n"
    return files


def root_partition_start(img: Path) -> int:
    table = json.loads(run(["sfdisk", "--json", img], capture=True).stdout)["partitiontable"]
    (root,) = [p for p in table["partitions"] if p["type"] == disk.ROOT_X86_64_TYPE]
    return root["start"] * disk.SECTOR


def login_or_verity_failure(console: str) -> bool:
    """The login prompt, or a whole ldt-verity line that is no success, or a block that failed its hash."""
    whole_lines = console.splitlines()[:-1]  # the last may still be arriving
    return logged_in(console) or "is corrupted" in console or any(
        "ldt-verity: " in line and verity.OPENED_LINE not in line for line in whole_lines)


def test_a_verity_root_boots_under_secure_boot_and_a_changed_byte_fails_its_read(tmp_path: Path) -> None:
    """`[disk] verity = true` and `secure_boot = true` through doit: the signed UKI's command line holds
    the root hash, hello's own initrd (a cpio appended by the boot stage) opens the root through
    dm-verity and says so, systemd reaches the login prompt on the read-only root; the same disk with
    one byte of the root partition changed (a copy) fails the read of that block."""
    proj = make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}, "hello": verity_hello()})
    env = {"LDT_SB_DIR": str(tmp_path / "keys")}
    built = doit("build_efistub:hello", cwd=proj, env=env)
    print(built.stdout + built.stderr)
    img = (proj / "cache" / "recipes" / "hello" / "uefi.img").resolve()
    ext4_entry = (proj / "cache" / "recipes" / "hello" / "rootfs.ext4").resolve().parent
    v = verity.Verity.from_json((ext4_entry / verity.INFO_FILE).read_text())
    assert verity.verify(ext4_entry / "rootfs.ext4", ext4_entry / verity.HASH_FILE, v.root_hash)
    again = verity.format_verity(ext4_entry / "rootfs.ext4", tmp_path / "again.verity",
                                 verity.VerityParams(salt=v.salt, uuid=v.uuid))
    assert again == v and (tmp_path / "again.verity").read_bytes() == (ext4_entry / verity.HASH_FILE).read_bytes()
    uki = esp_file(img, disk.UKI_PATH, tmp_path / "BOOTX64.EFI")
    assert sb.verify(uki, tmp_path / "keys" / "db.crt")
    assert f"ldt.verity=PARTUUID={v.partition_uuids[0]}".encode() in uki.read_bytes()  # the root hash is signed

    ovmf = firmware.find_secboot_ovmf(img.parent / "sb-vars.fd")
    result = boot(img, ovmf, tmp_path, until=login_or_verity_failure)
    print(f"verity root under Secure Boot: login prompt after {result.seconds:.1f}s")
    tail = result.console[-3000:]
    assert result.matched and logged_in(result.console), tail
    assert verity.OPENED_LINE in result.console and v.root_hash in result.console, tail
    assert sb.KERNEL_SECURE_BOOT_LINE in result.console, secure_boot_lines(result.console)
    assert "is corrupted" not in result.console

    tampered = tmp_path / "tampered.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.fspath(img), tampered])
    # ext4's volume name (superblock at 1024, s_volume_name at 0x78) in the root partition: the mount reads it
    where = root_partition_start(img) + 1024 + 0x78
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x58 {where} 1", tampered], capture=True)
    result = boot(tampered, ovmf, tmp_path, until=lambda c: "is corrupted" in c or logged_in(c), timeout=400)
    print(f"tampered verity root: {'read refused' if 'is corrupted' in result.console else '?'} "
          f"after {result.seconds:.1f}s")
    assert "is corrupted" in result.console, result.console[-3000:]  # device-mapper: verity: ... data block 0
    assert not logged_in(result.console)
