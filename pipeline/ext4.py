"""The ext4 root filesystem image of a rootfs archive, written by mke2fs and debugfs.

build_ext4() reads the archive once (tarstream), stages regular files' bytes under numbered
names and turns every entry into debugfs commands (mkdir, write, symlink, mknod, ln, sif,
ea_set) in archive order. Ownership, modes, device nodes and xattrs come from the tar
headers, so it needs neither root nor fakeroot, and the layout depends only on the archive
(mkfs.ext4 -d would follow the readdir order and the ctimes of an unpacked tree, which differ
between builds).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import ids
from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.run import Step, run
from pipeline.tarstream import TarStream, member_path, open_tar, resolve_link

MiB = 1 << 20

# Pinned so the image does not depend on the host's /etc/mke2fs.conf. No orphan_file or
# metadata_csum_seed: kernels older than 5.15 could not mount the image read-write.
MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	hash_alg = half_md4

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""


@dataclass(frozen=True)
class Ext4Params:
    """Identity and sizing of a root filesystem image.

    The size is content × (1 + headroom_ratio) + headroom_bytes + metadata, rounded up to a
    MiB, unless size_bytes is given. Inodes: the entries × (1 + headroom_ratio) + 1024, at
    least one per bytes_per_inode.
    """

    label: str
    uuid: uuid.UUID
    hash_seed: uuid.UUID
    epoch: int
    headroom_ratio: float = 0.2
    headroom_bytes: int = 256 * MiB
    size_bytes: int | None = None
    block_size: int = 4096
    bytes_per_inode: int = 16384
    reserved_percent: int = 1

    @classmethod
    def for_key(cls, key: str, *, epoch: int, label: str = "root", **kw: object) -> Ext4Params:
        """UUID and directory-hash seed derived from the artifact key."""
        return cls(
            label=label,
            uuid=ids.derive_uuid(key, "root-fs"),
            hash_seed=ids.derive_uuid(key, "root-fs-hash-seed"),
            epoch=epoch,
            **kw,  # type: ignore[arg-type]
        )


@dataclass
class ContentStats:
    """What the archive needs on disk, gathered while streaming it."""

    block_size: int = 4096
    data_blocks: int = 0
    inodes: int = 0
    entries_per_dir: dict[str, int] = field(default_factory=dict)

    def add_file(self, size: int) -> None:
        self.inodes += 1
        self.data_blocks += -(-size // self.block_size)
        if size > 512 * MiB:  # extent tree leaves beyond the 4 in-inode extents
            self.data_blocks += size // (128 * MiB * 340) + 1

    def add_dirent(self, parent: str, name: str) -> None:
        self.entries_per_dir[parent] = self.entries_per_dir.get(parent, 0) + 8 + (len(name) + 3) // 4 * 4

    def dir_blocks(self) -> int:
        return sum(max(1, -(-(n + 24) * 4 // 3 // self.block_size)) for n in self.entries_per_dir.values())


def journal_blocks(fs_blocks: int) -> int:
    """e2fsprogs' ext2fs_default_journal_size() for 4 KiB blocks."""
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if fs_blocks < limit:
            return size
    return 262144


def ext4_geometry(stats: ContentStats, params: Ext4Params) -> tuple[int, int]:
    """(filesystem size in blocks, inode count) for the content plus headroom."""
    bs = params.block_size
    inodes = max(int((stats.inodes + 11) * (1 + params.headroom_ratio)) + 1024, 2048)
    if params.size_bytes is not None:
        blocks = params.size_bytes // bs
    else:
        content = (stats.data_blocks + stats.dir_blocks()) * bs
        grown = int(content * (1 + params.headroom_ratio)) + params.headroom_bytes
        inode_tables = inodes * 256
        base = grown + inode_tables
        base += journal_blocks(base // bs) * bs
        base = int(base * (1 + params.reserved_percent / 100) * 1.02)  # reserve, bitmaps, GDT
        blocks = -(-base // MiB) * (MiB // bs)
    inodes = max(inodes, blocks * bs // params.bytes_per_inode)
    return blocks, inodes


def mkfs_ext4_cmd(image: Path, params: Ext4Params, blocks: int, inodes: int) -> list[str]:
    """mke2fs for an empty, reproducible ext4: fixed UUID, hash seed, label, owner; no lazy init.

    Run with MKE2FS_CONFIG pointing at MKE2FS_CONF and E2FSPROGS_FAKE_TIME=epoch.
    """
    extended = ",".join([
        f"hash_seed={params.hash_seed}",
        "root_owner=0:0",
        "lazy_itable_init=0",
        "lazy_journal_init=0",
        "nodiscard",
    ])
    return [
        "mkfs.ext4", "-q", "-F",
        "-T", "default",
        "-b", str(params.block_size),
        "-N", str(inodes),
        "-m", str(params.reserved_percent),
        "-L", params.label,
        "-U", str(params.uuid),
        "-E", extended,
        os.fspath(image), str(blocks),
    ]  # fmt: skip


def debugfs_cmd(image: Path, script: Path) -> list[str]:
    return ["debugfs", "-w", "-f", os.fspath(script), os.fspath(image)]


def _q(s: str) -> str:
    """Quote one argument for debugfs' (libss) command parser."""
    return '"' + s.replace('"', '""') + '"'


def _ref(name: str) -> str:
    """A name in the current directory as debugfs namei sees it ('<12>' would be inode 12)."""
    return _q("./" + name if name.startswith(("<", "-")) else name)


def type_bits(member: tarfile.TarInfo) -> int:
    """The S_IFMT bits of a member (GNU sparse and contiguous files are regular files)."""
    if member.isreg():
        return stat.S_IFREG
    for test, bits in ((member.isdir, stat.S_IFDIR), (member.issym, stat.S_IFLNK), (member.ischr, stat.S_IFCHR),
                       (member.isblk, stat.S_IFBLK), (member.isfifo, stat.S_IFIFO)):  # fmt: skip
        if test():
            return bits
    return 0


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """Extended attributes a tar carries in PAX headers (GNU/docker SCHILY.*, libarchive)."""
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
    return out


class DebugfsScript:
    """Turns archive members, in order, into debugfs commands that recreate them.

    Pure: regular files' and xattr values' bytes are referred to by the staging paths the
    caller wrote them to. New inodes get atime/ctime/crtime from E2FSPROGS_FAKE_TIME; the
    script sets mode, owner and mtime from the header.
    """

    def __init__(self, block_size: int = 4096) -> None:
        self.lines: list[str] = []
        self.cwd: str | None = None
        self.kinds: dict[str, str] = {"": "dir", "lost+found": "dir"}  # path -> "dir" | "other"
        self.links: dict[str, int] = {}  # hard-link target path -> extra names
        self.stats = ContentStats(block_size=block_size)

    def _cd(self, directory: str) -> None:
        if directory != self.cwd:
            self.lines.append(f"cd {_q('/' + directory)}")
            self.cwd = directory

    def _ensure_parents(self, directory: str) -> None:
        if directory in self.kinds:
            return
        parent, _, name = directory.rpartition("/")
        self._ensure_parents(parent)
        if self.kinds.get(parent) != "dir":
            raise UserError(f"archive entry /{directory} lies under a non-directory")
        self._cd(parent)
        self.lines.append(f"mkdir {_q(name)}")
        self.kinds[directory] = "dir"
        self.stats.inodes += 1
        self.stats.add_dirent(parent, name)

    def add(self, member: tarfile.TarInfo, path: str, staged: str | None = None,
            xattr_files: dict[str, str] | None = None) -> None:
        """One archive member; `staged` is the file holding a regular member's bytes."""
        if "\n" in path or "\r" in path:
            raise UserError(f"archive entry name with a line break is not supported: {path!r}")
        if path == "":
            self._cd("")
            self._meta(".", member, xattr_files)
            return
        parent, _, name = path.rpartition("/")
        self._ensure_parents(parent)
        self._cd(parent)
        existing = self.kinds.get(path)
        if existing == "dir" and member.isdir():
            self._meta(_ref(name), member, xattr_files)
            return
        if existing is not None:  # a later entry replaces an earlier one, as tar -x does
            self.lines.append(f"{'rmdir' if existing == 'dir' else 'rm'} {_ref(name)}")
        else:
            self.stats.add_dirent(parent, name)
        if member.islnk():
            target = member_path(tarfile.TarInfo(member.linkname))
            if self.kinds.get(target) != "other":
                raise UserError(f"hard link /{path} points to missing /{target}")
            self.lines.append(f"ln {_q('/' + target)} {_q(name)}")
            self.links[target] = self.links.get(target, 0) + 1
            self.kinds[path] = "other"
            return
        if member.isdir():
            self.lines.append(f"mkdir {_q(name)}")
            self.stats.inodes += 1
        elif member.isreg():
            if staged is None:
                raise ValueError("regular member without staged bytes")
            self.lines.append(f"write {_q(staged)} {_q(name)}")
            self.stats.add_file(member.size)
        elif member.issym():
            self.lines.append(f"symlink {_q(name)} {_q(member.linkname)}")
            self.stats.inodes += 1
            if len(member.linkname.encode("utf-8", "surrogateescape")) >= 60:
                self.stats.data_blocks += 1
        elif member.ischr() or member.isblk():
            self._mknod(name, "c" if member.ischr() else "b", member.devmajor, member.devminor)
        elif member.isfifo():
            self.lines.append(f"mknod {_q(name)} p")
            self.stats.inodes += 1
        else:
            raise UserError(f"unsupported archive entry type {member.type!r} for /{path}")
        self.kinds[path] = "dir" if member.isdir() else "other"
        self._meta(_ref(name), member, xattr_files)

    def _mknod(self, name: str, kind: str, major: int, minor: int) -> None:
        self.stats.inodes += 1
        if major < 256 and minor < 256:
            self.lines.append(f"mknod {_q(name)} {kind} {major} {minor}")
            return
        # debugfs' mknod stops at 65535; write the kernel's "new" encoding into i_block[1].
        self.lines.append(f"mknod {_q(name)} {kind} 0 0")
        encoded = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
        self.lines.append(f"sif {_ref(name)} block[1] {encoded:#x}")

    def _meta(self, ref: str, member: tarfile.TarInfo, xattr_files: dict[str, str] | None) -> None:
        mode = type_bits(member) | (member.mode & 0o7777)
        self.lines.append(f"sif {ref} mode 0{mode:o}")
        if member.uid:
            self.lines.append(f"sif {ref} uid {member.uid}")
        if member.gid:
            self.lines.append(f"sif {ref} gid {member.gid}")
        self.lines.append(f"sif {ref} mtime @{int(member.mtime)}")
        for name, staged in sorted((xattr_files or {}).items()):
            self.lines.append(f"ea_set -f {_q(staged)} {ref} {_q(name)}")
            self.stats.data_blocks += 1  # upper bound: most fit in the inode

    def finish(self) -> str:
        """The script; hard-linked inodes get their link counts last (ln does not count)."""
        tail = [f"sif {_q('/' + target)} links_count {extra + 1}" for target, extra in self.links.items()]
        return "\n".join([*self.lines, *tail]) + "\n"


def _stage_archive(tgz: Path, staging: Path, block_size: int, extra: Sequence[Path] = ()) -> DebugfsScript:
    """The archive's members, then each extra archive's on top (a later entry replaces an earlier
    one). An extra entry's directories are looked up through the symlinks before it, so
    lib/modules/… lands in usr/lib/modules/… of a merged-/usr image."""
    script = DebugfsScript(block_size)
    symlinks: dict[str, str] = {}
    n = 0
    for i, archive in enumerate((tgz, *extra)):
        with open_tar(archive) as stream:
            for member in stream:
                path = member_path(member)
                if i and "/" in path:
                    parent, _, name = path.rpartition("/")
                    path = f"{resolve_link(parent, symlinks)}/{name}".lstrip("/")
                if member.issym():
                    symlinks[path] = member.linkname
                else:
                    symlinks.pop(path, None)
                n = _stage_member(stream, member, path, staging, n, script)
    return script


def _stage_member(stream: TarStream, member: tarfile.TarInfo, path: str, staging: Path, n: int,
                  script: DebugfsScript) -> int:
    """Stage one member's bytes and xattrs under numbered names, add it to the script; the next n."""
    staged = None
    if member.isreg():
        n += 1
        staged = os.fspath(staging / f"f{n}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            stream.copy_to(member, fd)
        finally:
            os.close(fd)
    xattr_files = {}
    for name, value in member_xattrs(member).items():
        n += 1
        xattr_files[name] = os.fspath(staging / f"x{n}")
        Path(xattr_files[name]).write_bytes(value)
    script.add(member, path, staged, xattr_files)
    return n


_DEBUGFS_NOISE = re.compile(r"^debugfs \d[\w.\-]* \(.*\)$")


def debugfs_errors(stderr: str) -> list[str]:
    """debugfs exits 0 whatever its commands did: anything on stderr but the banner is an error."""
    return [line for line in stderr.splitlines() if line.strip() and not _DEBUGFS_NOISE.match(line)]


@dataclass(frozen=True)
class Ext4Image:
    path: Path
    uuid: uuid.UUID
    label: str
    size_bytes: int
    inodes: int


def build_ext4(tgz: Path, out: Path, params: Ext4Params, extra: Sequence[Path] = ()) -> Ext4Image:
    """The ext4 root filesystem image of the archive (and the extra archives on top), written
    sparse and atomically to out.

    Rootless: no mount, loop device or fakeroot. Reproducible: the layout follows archive
    order, ids come from params, times from params.epoch.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with Step(f"staging {tgz.name}"):
            script = _stage_archive(tgz, staging, params.block_size, extra)
        script_path = staging / "debugfs.script"
        script_path.write_text(script.finish(), encoding="utf-8", errors="surrogateescape")
        conf = staging / "mke2fs.conf"
        conf.write_text(MKE2FS_CONF)
        blocks, inodes = ext4_geometry(script.stats, params)
        env = {**ids.source_date_env(params.epoch), "MKE2FS_CONFIG": os.fspath(conf)}
        with atomic_path(out) as tmp:
            with Step(f"writing {out.name} ({blocks * params.block_size // MiB} MiB)"):
                run(mkfs_ext4_cmd(tmp, params, blocks, inodes), env=env, capture=True)
                proc = run(debugfs_cmd(tmp, script_path), env=env, capture=True, stdout=subprocess.DEVNULL)
            errors = debugfs_errors(proc.stderr.decode(errors="replace"))
            if errors:
                full = any("No free space" in e or "Could not allocate" in e for e in errors)
                raise UserError(
                    f"building {out.name} failed: " + "; ".join(errors[:5]),
                    hint="raise [disk] headroom_mib (or size_mib) in recipe.toml" if full else None,
                )
            # mkfs writes the journal and inode tables out as zeros (no lazy init, for reproducibility):
            # turn those zero blocks back into holes, the bytes read back the same
            run(["fallocate", "--dig-holes", tmp])
        return Ext4Image(out, params.uuid, params.label, blocks * params.block_size, inodes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_ext4_identity(image: Path) -> tuple[uuid.UUID, str]:
    """(UUID, label) from an ext4 superblock (offset 1024: magic at 0x38, uuid 0x68, label 0x78)."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 0x88 or sb[0x38:0x3A] != b"\x53\xef":
        raise UserError(f"{image}: not an ext2/3/4 filesystem image")
    return uuid.UUID(bytes=sb[0x68:0x78]), sb[0x78:0x88].rstrip(b"\0").decode(errors="replace")
