"""verity.py: the pure parts (parameters from a key, command lines, kernel command-line words, the
dm table) and, with the real veritysetup on small files, reproducibility and tamper detection."""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline import verity
from pipeline.errors import UserError
from pipeline.verity import Verity, VerityParams

FORMAT_OUTPUT = """\
VERITY header information for h.img
UUID:            \t12345678-1234-1234-1234-123456789abc
Hash type:       \t1
Data blocks:     \t4096
Data block size: \t4096
Hash blocks:     \t33
Hash block size: \t4096
Hash algorithm:  \tsha256
Salt:            \t00112233
Root hash:      \t072fc44f017464e65b0b74d806697c53523da3398e20f9005d47f63dafc74b78
Hash device size: \t139264 [bytes]
"""

SAMPLE = Verity(root_hash="ab" * 32, salt="cd" * 32, uuid=uuid.UUID(int=7), data_blocks=2048,
                data_block_size=4096, hash_block_size=4096, hash_alg="sha256", hash_size=90112)


def test_params_from_key_are_stable_and_distinct() -> None:
    a, b = VerityParams.from_key("k1"), VerityParams.from_key("k1")
    assert a == b and len(a.salt) == 64 and int(a.salt, 16) >= 0
    c = VerityParams.from_key("k2")
    assert c.salt != a.salt and c.uuid != a.uuid


def test_format_cmd() -> None:
    p = VerityParams(salt="00ff", uuid=uuid.UUID(int=1))
    assert verity.format_cmd(Path("root.ext4"), Path("root.verity"), p) == [
        "veritysetup", "format", "--hash", "sha256", "--salt", "00ff", "--uuid", str(uuid.UUID(int=1)),
        "--data-block-size", "4096", "--hash-block-size", "4096", "root.ext4", "root.verity"]
    assert verity.verify_cmd(Path("d"), Path("h"), "ab") == ["veritysetup", "verify", "d", "h", "ab"]


def test_parse_format_output() -> None:
    p = VerityParams(salt="00112233", uuid=uuid.UUID("12345678-1234-1234-1234-123456789abc"))
    v = verity.verity_of(verity.parse_format_output(FORMAT_OUTPUT), p)
    assert v.root_hash == "072fc44f017464e65b0b74d806697c53523da3398e20f9005d47f63dafc74b78"
    assert (v.data_blocks, v.hash_size, v.salt, v.uuid) == (4096, 139264, "00112233", p.uuid)
    assert v.data_sectors == 32768
    with pytest.raises(UserError, match="cannot read veritysetup's output"):
        verity.verity_of({"root hash": "x"}, p)


def test_dm_table() -> None:
    assert SAMPLE.dm_table("/dev/vda2", "/dev/vda3") == (
        f"0 16384 verity 1 /dev/vda2 /dev/vda3 4096 4096 2048 1 sha256 {'ab' * 32} {'cd' * 32}")


def test_partition_uuids_come_from_the_root_hash() -> None:
    v = dataclasses.replace(SAMPLE, root_hash="00112233445566778899aabbccddeeff" + "ff" * 16)
    root, hash_part = v.partition_uuids
    assert str(root) == "00112233-4455-6677-8899-aabbccddeeff"
    assert hash_part == uuid.UUID("ff" * 16)


def test_cmdline_words() -> None:
    assert SAMPLE.systemd_cmdline("PARTUUID=aa", "PARTUUID=bb") == [
        f"roothash={'ab' * 32}", "systemd.verity_root_data=PARTUUID=aa", "systemd.verity_root_hash=PARTUUID=bb",
        "root=/dev/mapper/root", "ro"]
    words = SAMPLE.ldt_cmdline("PARTUUID=aa", "PARTUUID=bb")
    assert words[0] == f"ldt.verity=PARTUUID=aa,PARTUUID=bb,2048,sha256,{'ab' * 32},{'cd' * 32}"
    assert words[1:] == ["root=/dev/mapper/root", "ro"]
    assert "rw" not in words
    with pytest.raises(ValueError, match="4 KiB"):
        dataclasses.replace(SAMPLE, data_block_size=1024).ldt_cmdline("/dev/vda", "/dev/vdb")


@pytest.fixture
def ext4(tmp_path: Path) -> Path:
    img = tmp_path / "root.ext4"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-U", str(uuid.UUID(int=3)), "-E",
                    "hash_seed=" + str(uuid.UUID(int=4)), img], check=True,
                   env={"E2FSPROGS_FAKE_TIME": "1700000000", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return img


def test_format_is_reproducible_and_verifies(ext4: Path, tmp_path: Path) -> None:
    p = VerityParams.from_key("stage-key")
    a = verity.format_verity(ext4, tmp_path / "a.verity", p)
    b = verity.format_verity(ext4, tmp_path / "b.verity", p)
    assert a == b
    assert (tmp_path / "a.verity").read_bytes() == (tmp_path / "b.verity").read_bytes()
    assert a.hash_size == (tmp_path / "a.verity").stat().st_size
    assert a.data_blocks == 2048 and a.salt == p.salt and a.uuid == p.uuid
    assert verity.verify(ext4, tmp_path / "a.verity", a.root_hash)
    other = verity.format_verity(ext4, tmp_path / "c.verity", VerityParams.from_key("another-key"))
    assert other.root_hash != a.root_hash  # the salt is part of every hash


def test_a_flipped_byte_fails_verification(ext4: Path, tmp_path: Path) -> None:
    v = verity.format_verity(ext4, tmp_path / "root.verity", VerityParams.from_key("k"))
    with open(ext4, "r+b") as f:  # a byte in the data area, far from the superblock
        f.seek(5 << 20)
        byte = f.read(1)
        f.seek(5 << 20)
        f.write(bytes([byte[0] ^ 0x01]))
    assert not verity.verify(ext4, tmp_path / "root.verity", v.root_hash)


def test_wrong_root_hash_fails(ext4: Path, tmp_path: Path) -> None:
    verity.format_verity(ext4, tmp_path / "root.verity", VerityParams.from_key("k"))
    assert not verity.verify(ext4, tmp_path / "root.verity", "00" * 32)


def test_partial_block_image_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(b"x" * 5000)
    with pytest.raises(UserError, match="not a whole number of 4096-byte blocks"):
        verity.format_verity(img, tmp_path / "odd.verity", VerityParams.from_key("k"))
    assert not (tmp_path / "odd.verity").exists()


def test_verity_json_round_trips() -> None:
    assert Verity.from_json(SAMPLE.to_json()) == SAMPLE


# ── the uefi disk of a [disk] verity recipe ─────────────────────────────────────────────


def uefi_verity_disk(ext4: Path, tmp_path: Path, name: str) -> tuple[Path, Verity]:
    from pipeline import disk

    v = verity.format_verity(ext4, tmp_path / "root.verity", VerityParams.from_key("stage-key"))
    kernel, os_release = tmp_path / "vmlinuz", tmp_path / "os-release"
    kernel.write_bytes(b"not really a kernel" * 100)
    os_release.write_text('ID=debian\n')
    out = tmp_path / name
    disk.build_uefi_disk(kernel, None, os_release, ext4, out, key="uefi-key", epoch=1_700_000_000,
                         extra_cmdline=["quiet"], verity=v, hash_img=tmp_path / "root.verity")
    return out, v


def test_a_verity_uefi_disk_has_the_hash_partition_and_the_root_hash_on_its_command_line(
        ext4: Path, tmp_path: Path) -> None:
    import hashlib
    import json

    from pipeline import disk

    a, v = uefi_verity_disk(ext4, tmp_path, "a.img")
    table = json.loads(subprocess.run(["sfdisk", "--json", a], capture_output=True, check=True).stdout)
    esp, root, tree = table["partitiontable"]["partitions"]
    root_uuid, hash_uuid = v.partition_uuids
    assert (root["type"], root["uuid"].lower(), root["name"]) == (disk.ROOT_X86_64_TYPE, str(root_uuid), "root")
    assert (tree["type"], tree["uuid"].lower(), tree["name"]) == (verity.ROOT_X86_64_VERITY_TYPE, str(hash_uuid),
                                                                 "root-verity")
    with open(a, "rb") as f:  # the partitions hold the root and its tree, byte for byte
        f.seek(tree["start"] * disk.SECTOR)
        assert f.read(v.hash_size) == (tmp_path / "root.verity").read_bytes()
        f.seek(root["start"] * disk.SECTOR)
        assert f.read(1 << 20) == ext4.read_bytes()[: 1 << 20]
    cmdline = disk.verity_cmdline(v, ["quiet"])
    assert f"ldt.verity=PARTUUID={root_uuid},PARTUUID={hash_uuid},{v.data_blocks}," in cmdline
    assert " root=/dev/mapper/root ro " in cmdline and " rw" not in cmdline and cmdline.endswith(" quiet")
    assert cmdline.encode() in a.read_bytes()  # in the UKI's .cmdline section
    b, _ = uefi_verity_disk(ext4, tmp_path, "b.img")  # same inputs and key: the same disk
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


# ── the initrds that open it ────────────────────────────────────────────────────────────

VERSION = "6.1.0-9-amd64"
MODULES = {
    "modules.dep": b"kernel/drivers/md/dm-mod.ko:\nkernel/drivers/md/dm-bufio.ko:\n"
                   b"kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko\n",
    "modules.dep.bin": b"bin", "modules.alias": b"", "modules.softdep": b"",
    "kernel/drivers/md/dm-mod.ko": b"MOD", "kernel/drivers/md/dm-bufio.ko": b"BUFIO",
    "kernel/drivers/md/dm-verity.ko": b"VERITY",
}
SCRIPTS = {"local-top": b"#!/bin/sh\ntop\n", "local-bottom": b"#!/bin/sh\nbottom\n"}


def members_of(data: bytes) -> dict[str, bytes]:
    from pipeline import initramfs

    return {m.name: initramfs.member_data(m) for a in initramfs.initrd_archives(data) for m in a}


def test_the_verity_overlay_adds_scripts_modules_and_orders_to_an_initramfs_tools_initrd() -> None:
    from pipeline import initramfs

    base = initramfs.make_cpio({"scripts/functions": b"x", "usr/sbin/dmsetup": b"ELF",
                                f"usr/lib/modules/{VERSION}/modules.dep": b"",
                                "scripts/local-bottom/ORDER": b'/scripts/local-bottom/lvm "$@"\nTAIL\n'})
    overlay = initramfs.verity_overlay(base, VERSION, MODULES.get, SCRIPTS)
    assert (len(base) + overlay.index(b"070701")) % 512 == 0
    got = members_of(base + overlay)
    moddir = f"usr/lib/modules/{VERSION}"  # the initrd's own (merged /usr) module folder
    assert got[f"{moddir}/kernel/drivers/md/dm-verity.ko"] == b"VERITY"
    assert got[f"{moddir}/modules.dep"] == MODULES["modules.dep"] and got[f"{moddir}/modules.dep.bin"] == b"bin"
    assert got["scripts/local-top/ldt-verity"] == SCRIPTS["local-top"]
    assert got["scripts/local-top/ORDER"] == b'/scripts/local-top/ldt-verity "$@"\n' + initramfs.ORDER_TAIL.encode()
    assert got["scripts/local-bottom/ORDER"] == (b'/scripts/local-bottom/ldt-verity "$@"\n'
                                                 b'/scripts/local-bottom/lvm "$@"\nTAIL\n')  # ours first, theirs kept
    assert got["usr/sbin/dmsetup"] == b"ELF"  # the initrd itself is left as it was


@pytest.mark.parametrize(("files", "why"), [
    ({"usr/sbin/dmsetup": b"ELF"}, "not made by initramfs-tools"),
    ({"scripts/functions": b"x"}, "no dmsetup"),
])
def test_an_initrd_that_cannot_open_verity_is_an_error(files: dict[str, bytes], why: str) -> None:
    from pipeline import initramfs

    with pytest.raises(ValueError, match=why):
        initramfs.verity_overlay(initramfs.make_cpio(files), VERSION, MODULES.get, SCRIPTS)
    no_verity = {**MODULES, "modules.dep": b"kernel/drivers/md/dm-mod.ko:\n"}
    with pytest.raises(ValueError, match="has no dm-verity"):
        initramfs.verity_overlay(initramfs.make_cpio({"scripts/functions": b"", "sbin/dmsetup": b""}), VERSION,
                                 no_verity.get, SCRIPTS)


def test_our_app_initrd_with_verity_loads_dm_verity_first_and_carries_dmsetup() -> None:
    from pipeline import initramfs

    data = initramfs.app_initrd(b"#!init", b"BB", MODULES.get, first=initramfs.VERITY_MODULES, more=(),
                                dm={"dmsetup": b"D", "ld.so": b"L"})
    got = members_of(data)
    assert got["lib/ldt/first"] == b"dm_mod.ko\ndm_bufio.ko\ndm_verity.ko\n"
    assert got["lib/ldt/dm/dmsetup"] == b"D" and got["lib/ldt/dm/ld.so"] == b"L"


def test_app_initrd_reads_a_partuuid_from_the_gpt_with_busybox(tmp_path: Path) -> None:
    """app-initrd.sh's guid_of_entry (busybox has no blkid): the unique GUID of a GPT entry as text."""
    import re

    from pipeline import app, disk

    img = tmp_path / "gpt.img"
    img.write_bytes(b"\0" * (4 << 20))
    parts = [disk.Partition(disk.MiB, disk.MiB, disk.ESP_TYPE, uuid=uuid.UUID("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9")),
             disk.Partition(2 * disk.MiB, disk.MiB, disk.ROOT_X86_64_TYPE,
                            uuid=uuid.UUID("f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f"))]
    subprocess.run(disk.sfdisk_cmd(img), input=disk.sfdisk_script("gpt", str(uuid.UUID(int=1)), parts).encode(),
                   check=True, capture_output=True)
    script = app.guest_script("app-initrd.sh").decode()
    func = re.search(r"^guid_of_entry\(\) \{\n.*?^\}\n", script, re.MULTILINE | re.DOTALL)
    assert func
    for n, p in enumerate(parts, start=1):
        out = subprocess.run([str(app.HOST_BUSYBOX), "sh", "-c", f'BB={app.HOST_BUSYBOX}\n{func.group(0)}'
                              f'guid_of_entry "{img}" {n}'], capture_output=True, text=True, check=True).stdout
        assert out.strip() == str(p.uuid)


def test_a_verity_recipe_whose_initrd_cannot_open_it_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """builders.add_verity (the boot stage): an initrd without dmsetup is a UserError with a hint,
    raised inside the build, so the store keeps nothing."""
    import io
    import tarfile

    from pipeline import builders, initramfs, kernel, rootfs
    from pipeline.artifacts import Artifact
    from pipeline.build import Build
    from pipeline.errors import UserError
    from pipeline.project import Project
    from pipeline.recipes import Recipe

    def fake_modules(tgz: Path, version: str, out: Path, *, recipe: str) -> int:
        with tarfile.open(out, "w") as tar:
            for name, data in MODULES.items():
                info = tarfile.TarInfo(f"lib/modules/{version}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return len(MODULES)

    monkeypatch.setattr(kernel, "release_of", lambda path: VERSION)
    monkeypatch.setattr(rootfs, "extract_modules", fake_modules)
    r = Recipe(name="img", dir=tmp_path, verity=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / Artifact.KERNEL).write_bytes(b"k")
    (work / Artifact.INITRD).write_bytes(initramfs.make_cpio({"scripts/functions": b"x"}))
    b = Build(Project(tmp_path, extra=(r,)), r, "key", work, {}, 0)
    with pytest.raises(UserError) as info:
        builders.add_verity(b, "img", tmp_path / "rootfs.tgz")
    assert info.value.message == ("recipe img: [disk] verity: the initrd of img cannot open a dm-verity root: "
                                  "its initrd has no dmsetup")
    assert "apt-get install dmsetup" in (info.value.hint or "")
    (work / Artifact.INITRD).write_bytes(initramfs.make_cpio({"scripts/functions": b"x", "usr/sbin/dmsetup": b"E"}))
    builders.add_verity(b, "img", tmp_path / "rootfs.tgz")  # with dmsetup: the opener appended
    assert "scripts/local-top/ldt-verity" in members_of((work / Artifact.INITRD).read_bytes())


@pytest.mark.parametrize("script", ["verity-local-top.sh", "app-initrd.sh"])
def test_both_initrds_say_the_root_opened_in_the_same_words(script: str) -> None:
    from pipeline import app

    assert f'echo "{verity.OPENED_LINE}$data_dev verified by $hash_dev' in app.guest_script(script).decode()
