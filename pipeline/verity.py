"""dm-verity for a read-only ext4 root: the hash tree beside it, and what the kernel command line
needs so an initrd can open the root through verity.

`veritysetup format` works on plain files (no root, no loop device). Its salt and UUID are
derived from the stage key, so the same root image and key give the same hash tree and root
hash. The hash device keeps veritysetup's superblock (block 0), so `veritysetup open` and
systemd-veritysetup read the salt and sizes from it; a dmsetup-only initrd gets the whole table.

    format_verity(data, hash, params)  -> Verity(root_hash, salt, uuid, data_blocks, hash_size, ...)
    Verity.systemd_cmdline(data, hash) -> roothash= systemd.verity_root_data= ... (systemd/dracut initrd)
    Verity.ldt_cmdline(data, hash)     -> ldt.verity=... (our initrds: dmsetup, no salt read needed)
    Verity.dm_table(data, hash)        -> the dm-verity target line (dmsetup create --table)
    Verity.to_json()/from_json()       -> verity.json, beside rootfs.ext4 and rootfs.verity in an ext4 entry
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import ids
from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.run import run

BLOCK = 4096
SECTOR = 512
HASH_ALG = "sha256"
MAPPER_NAME = "root"  # /dev/mapper/root, the name systemd-veritysetup-generator gives the root
HINT = "install cryptsetup-bin (run ./setup.sh)"
# Discoverable Partitions Specification: the x86-64 root's verity hash partition
ROOT_X86_64_VERITY_TYPE = "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5"
# What both initrds print on the console once /dev/mapper/root is there (what a boot check waits for)
OPENED_LINE = "ldt-verity: root opened: "
# In an ext4 entry of a `[disk] verity` recipe, beside rootfs.ext4: its hash device and what the uefi
# stage needs to name it (root hash, salt, sizes)
HASH_FILE = "rootfs.verity"
INFO_FILE = "verity.json"


@dataclass(frozen=True)
class VerityParams:
    """What `veritysetup format` is told: fixed block sizes and hash, a derived salt and UUID."""

    salt: str  # hex
    uuid: uuid.UUID
    data_block_size: int = BLOCK
    hash_block_size: int = BLOCK
    hash_alg: str = HASH_ALG

    @classmethod
    def from_key(cls, key: str) -> VerityParams:
        """Reproducible: the salt and UUID of the stage key (32-byte salt, like veritysetup's own)."""
        salt = hashlib.sha256(f"ldt\0verity-salt\0{key}".encode()).hexdigest()
        return cls(salt=salt, uuid=ids.derive_uuid(key, "verity"))


@dataclass(frozen=True)
class Verity:
    root_hash: str
    salt: str
    uuid: uuid.UUID
    data_blocks: int
    data_block_size: int
    hash_block_size: int
    hash_alg: str
    hash_size: int  # bytes of the hash device (superblock + tree)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "uuid": str(self.uuid)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Verity:
        d = json.loads(text)
        return cls(**{**d, "uuid": uuid.UUID(d["uuid"])})

    @property
    def data_sectors(self) -> int:
        return self.data_blocks * self.data_block_size // SECTOR

    @property
    def partition_uuids(self) -> tuple[uuid.UUID, uuid.UUID]:
        """(root, hash) partition UUIDs: the root hash's first and last 128 bits, systemd's
        convention (systemd-gpt-auto-generator finds the pair from roothash= alone)."""
        h = bytes.fromhex(self.root_hash)
        return uuid.UUID(bytes=h[:16]), uuid.UUID(bytes=h[-16:])

    def dm_table(self, data_dev: str, hash_dev: str) -> str:
        """`dmsetup create --readonly root --table ...`: format 1, the tree after the superblock."""
        hash_start = 1  # block 0 of the hash device is veritysetup's superblock
        return (f"0 {self.data_sectors} verity 1 {data_dev} {hash_dev} {self.data_block_size} "
                f"{self.hash_block_size} {self.data_blocks} {hash_start} {self.hash_alg} {self.root_hash} "
                f"{self.salt}")

    def systemd_cmdline(self, data_dev: str, hash_dev: str) -> list[str]:
        """For a systemd initrd (dracut, mkosi): systemd-veritysetup-generator opens /dev/mapper/root
        from these; data/hash as PARTUUID=… or a /dev path. The root is mounted read-only."""
        return [f"roothash={self.root_hash}", f"systemd.verity_root_data={data_dev}",
                f"systemd.verity_root_hash={hash_dev}", f"root=/dev/mapper/{MAPPER_NAME}", "ro"]

    def ldt_cmdline(self, data_dev: str, hash_dev: str) -> list[str]:
        """For our initrds (initramfs-tools hook, the busybox app initrd): one word with everything
        dmsetup needs, devices as PARTUUID=… (resolved in the initrd) or a /dev path. The scripts
        (pipeline/guest/verity-local-top.sh) assume 4 KiB blocks and the superblock."""
        if (self.data_block_size, self.hash_block_size) != (BLOCK, BLOCK):
            raise ValueError("ldt.verity= carries no block sizes: the initrd scripts use 4 KiB")
        fields = [data_dev, hash_dev, str(self.data_blocks), self.hash_alg, self.root_hash, self.salt]
        return [f"ldt.verity={','.join(fields)}", f"root=/dev/mapper/{MAPPER_NAME}", "ro"]


def format_cmd(data: Path, hash_dev: Path, p: VerityParams) -> list[str]:
    return ["veritysetup", "format", "--hash", p.hash_alg, "--salt", p.salt, "--uuid", str(p.uuid),
            "--data-block-size", str(p.data_block_size), "--hash-block-size", str(p.hash_block_size),
            os.fspath(data), os.fspath(hash_dev)]


def verify_cmd(data: Path, hash_dev: Path, root_hash: str) -> list[str]:
    return ["veritysetup", "verify", os.fspath(data), os.fspath(hash_dev), root_hash]


_FIELD = re.compile(r"^([A-Za-z ]+):\s*(.*?)\s*$")


def parse_format_output(text: str) -> dict[str, str]:
    """The `Name: value` lines of `veritysetup format` (and `dump`), names lowercased."""
    out = {}
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m:
            out[m.group(1).strip().lower()] = m.group(2)
    return out


def verity_of(fields: dict[str, str], params: VerityParams) -> Verity:
    try:
        hash_size = int(fields["hash device size"].split()[0])
        return Verity(root_hash=fields["root hash"], salt=fields["salt"], uuid=uuid.UUID(fields["uuid"]),
                      data_blocks=int(fields["data blocks"]), data_block_size=int(fields["data block size"]),
                      hash_block_size=int(fields["hash block size"]), hash_alg=fields["hash algorithm"],
                      hash_size=hash_size)
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"cannot read veritysetup's output ({e})", hint="is cryptsetup-bin 2.x installed?") from None


def format_verity(data: Path, hash_dev: Path, params: VerityParams) -> Verity:
    """Write the hash tree of `data` (an ext4 image, a whole number of blocks) to `hash_dev`."""
    size = data.stat().st_size
    if size == 0 or size % params.data_block_size:
        raise UserError(f"{data}: {size} bytes is not a whole number of {params.data_block_size}-byte blocks",
                        hint="the root image must be made in 4 KiB blocks")
    with atomic_path(hash_dev) as tmp:
        proc = run(format_cmd(data, tmp, params), capture=True)
        os.chmod(tmp, 0o644)  # veritysetup creates it 0600; it holds hashes, nothing secret
    v = verity_of(parse_format_output(proc.stdout.decode()), params)
    if v.salt != params.salt or v.uuid != params.uuid:
        raise UserError("veritysetup did not use the salt/UUID it was given")
    return v


def verify(data: Path, hash_dev: Path, root_hash: str) -> bool:
    """Whether every data block matches the tree (veritysetup verify, userspace, no device-mapper)."""
    return run(verify_cmd(data, hash_dev, root_hash), capture=True, check=False).returncode == 0


def cmdline_words(words: Sequence[str]) -> str:
    return " ".join(words)
