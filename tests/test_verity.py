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
