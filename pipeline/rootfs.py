"""The rootfs tgz: boot files out of it, and the ext4 root filesystem image built from it.

Both read the archive as one forward stream and never unpack it as a tree:

- extract_boot() keeps only the kernel, initrd and os-release candidates;
- build_ext4() stages regular files' bytes under numbered names and turns every entry into
  debugfs commands (mkdir, write, symlink, mknod, ln, sif, ea_set) in archive order.
  Ownership, modes, device nodes and xattrs come from the tar headers, so it needs neither
  root nor fakeroot, and the layout depends only on the archive (mkfs.ext4 -d would follow
  the readdir order and the ctimes of an unpacked tree, which differ between builds).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.parse
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipeline import ids
from pipeline.errors import UserError
from pipeline.files import atomic_path, link_or_copy, write_atomic
from pipeline.run import Step, run

MiB = 1 << 20

# --------------------------------------------------------------------------------------------
# Streaming tar reader
# --------------------------------------------------------------------------------------------


class _ForwardReader:
    """A decompressing file object that tarfile can use in its seekable mode, forward only.

    tarfile's own stream mode ('r|gz') copies its buffer on every small read; this keeps one
    bytearray and hands out memoryviews, which makes staging 10⁴ files much cheaper.
    """

    CHUNK = MiB
    KEEP = 4096  # bytes kept behind the read position for tarfile's one-byte look-back

    def __init__(self, raw: BinaryIO, gzip: bool) -> None:
        self.raw = raw
        self.gzip = gzip
        self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self.buf = bytearray()
        self.pos = 0  # index into buf
        self.off = 0  # offset in the uncompressed stream

    def _more(self) -> bool:
        if self.dec is None:
            data = self.raw.read(self.CHUNK)
            self.buf += data
            return bool(data)
        data = self.dec.unconsumed_tail or self.raw.read(self.CHUNK)
        if not data:
            return False
        self.buf += self.dec.decompress(data, 4 * self.CHUNK)
        if self.dec.eof and self.dec.unused_data:  # concatenated gzip members
            rest = self.dec.unused_data
            self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.buf += self.dec.decompress(rest, 4 * self.CHUNK)
        return True

    def _fill(self, n: int) -> int:
        """Make up to n bytes available at pos; return how many are."""
        while len(self.buf) - self.pos < n:
            if self.pos > 4 * self.CHUNK:
                drop = self.pos - self.KEEP
                del self.buf[:drop]
                self.pos -= drop
            if not self._more():
                break
        return min(n, len(self.buf) - self.pos)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while self._more():
                pass
            n = len(self.buf) - self.pos
        n = self._fill(n)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        self.off += n
        return data

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next n bytes to fd."""
        while n:
            avail = self._fill(min(n, self.CHUNK))
            if not avail:
                raise UserError("unexpected end of archive data")
            written = os.write(fd, memoryview(self.buf)[self.pos : self.pos + avail])
            self.pos += written
            self.off += written
            n -= written

    def tell(self) -> int:
        return self.off

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self.off
        elif whence != os.SEEK_SET:
            raise OSError("forward-only stream")
        delta = offset - self.off
        if delta < 0:
            if -delta > self.pos:
                raise OSError("forward-only stream cannot seek back that far")
            self.pos += delta
            self.off = offset
            return self.off
        while delta:
            k = self._fill(min(delta, self.CHUNK))
            if not k:
                break
            self.pos += k
            self.off += k
            delta -= k
        return self.off


class TarStream:
    """Members of a tar or tar.gz in archive order, with their data readable as they pass."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        magic = raw.read(2)
        raw.seek(0)
        self.reader = _ForwardReader(raw, gzip=magic == b"\x1f\x8b")
        try:
            self.tar = tarfile.open(name=name, fileobj=self.reader, mode="r:")
        except tarfile.TarError as e:
            raise UserError(f"{name}: not a tar or tar.gz archive ({e})") from e

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while True:
            try:
                member = self.tar.next()
            except (tarfile.TarError, zlib.error, EOFError) as e:
                raise UserError(f"{self.tar.name}: corrupt archive ({e})") from e
            if member is None:
                return
            self.tar.members.clear()  # stream: don't keep every header in memory
            yield member

    def copy_to(self, member: tarfile.TarInfo, fd: int) -> None:
        """Write a regular member's bytes to fd (call while it is the current member)."""
        if member.sparse is not None:
            src = self.tar.extractfile(member)
            assert src is not None
            while chunk := src.read(MiB):
                os.write(fd, chunk)
            return
        self.reader.seek(member.offset_data)
        self.reader.copy_to(fd, member.size)

    def read(self, member: tarfile.TarInfo) -> bytes:
        self.reader.seek(member.offset_data)
        return self.reader.read(member.size)


@contextlib.contextmanager
def open_tar(path: Path) -> Iterator[TarStream]:
    try:
        raw = open(path, "rb", buffering=0)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such archive") from e
    with raw:
        yield TarStream(raw, os.fspath(path))


def member_path(member: tarfile.TarInfo) -> str:
    """Archive name normalised to a relative path without ./ and trailing /; '' is the root."""
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UserError(f"unsafe path in archive: {member.name!r}")
    return "/".join(parts)


# --------------------------------------------------------------------------------------------
# Kernel versions and boot files
# --------------------------------------------------------------------------------------------


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def compare_versions(a: str, b: str) -> int:
    """dpkg's verrevcmp(): <0, 0, >0. '6.1.0-50-amd64' > '6.1.0-9-amd64', '6.1~rc1' < '6.1'."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


_KERNEL_RE = re.compile(r"^(?:boot/(?:vmlinuz|vmlinux)-(?P<v1>.+)|(?:usr/)?lib/modules/(?P<v2>[^/]+)/vmlinuz)$")
_INITRD_RE = re.compile(
    r"^(?:boot/(?:initrd\.img-(?P<v1>.+)|initramfs-(?P<v2>.+)\.img|initrd-(?P<v3>.+?)(?:\.img)?)"
    r"|(?:usr/)?lib/modules/(?P<v4>[^/]+)/initrd(?:\.img)?)$"
)
_OS_RELEASE = ("etc/os-release", "usr/lib/os-release")
# Unversioned names, used only when no versioned kernel is found (version then comes from the
# symlink target if there is one).
_PLAIN_KERNELS = ("vmlinuz", "boot/vmlinuz")
_PLAIN_INITRDS = ("initrd.img", "boot/initrd.img")


def kernel_version(path: str) -> str | None:
    m = _KERNEL_RE.match(path)
    return (m.group("v1") or m.group("v2")) if m else None


def initrd_version(path: str) -> str | None:
    m = _INITRD_RE.match(path)
    return next((v for v in m.groups() if v), None) if m else None


def resolve_link(path: str, symlinks: dict[str, str], limit: int = 40) -> str:
    """Resolve path inside the archive through its symlinks (any component), as a relative path."""
    parts = path.split("/")
    done: list[str] = []
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/".join([*done, part])
        target = symlinks.get(candidate)
        if target is None:
            done.append(part)
            continue
        limit -= 1
        if limit < 0:
            raise UserError(f"symlink loop in archive at /{candidate}")
        if target.startswith("/"):
            done = []
        parts = target.split("/") + parts
    return "/".join(done)


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            out[key] = value.strip().strip("\"'")
    return out


def kernel_install_hint(os_release: dict[str, str]) -> str:
    """What to add to the Dockerfile to get a kernel (and initrd) for this distribution."""
    family = {os_release.get("ID", "")} | set(os_release.get("ID_LIKE", "").split())
    if "ubuntu" in family:
        return "add `RUN apt-get update && apt-get install -y linux-image-virtual` to the Dockerfile"
    if "debian" in family:
        return "add `RUN apt-get update && apt-get install -y linux-image-amd64` to the Dockerfile"
    if family & {"fedora", "rhel", "centos"}:
        return "add `RUN dnf install -y kernel` to the Dockerfile"
    if "alpine" in family:
        return "add `RUN apk add linux-virt` to the Dockerfile"
    if "arch" in family:
        return "add `RUN pacman -Sy --noconfirm linux mkinitcpio` to the Dockerfile"
    if family & {"suse", "opensuse"}:
        return "add `RUN zypper install -y kernel-default` to the Dockerfile"
    return (
        "install a kernel package in the Dockerfile so /boot holds vmlinuz-<version> "
        "(on Debian: `RUN apt-get install -y linux-image-amd64`)"
    )


def initrd_install_hint(os_release: dict[str, str]) -> str:
    family = {os_release.get("ID", "")} | set(os_release.get("ID_LIKE", "").split())
    if family & {"debian", "ubuntu"}:
        return "add `RUN apt-get install -y initramfs-tools` before the kernel package in the Dockerfile"
    if family & {"fedora", "rhel", "centos"}:
        return "add `RUN dnf install -y dracut` and run `dracut --kver <version>` in the Dockerfile"
    return "generate an initramfs in the Dockerfile, or set initrd = false under [boot] in recipe.toml"


@dataclass(frozen=True)
class BootFiles:
    version: str
    kernel: Path
    initrd: Path | None
    os_release: Path

    @property
    def os_release_fields(self) -> dict[str, str]:
        return parse_os_release(self.os_release.read_text(errors="replace"))


DEFAULT_OS_RELEASE = 'NAME="Linux"\nID=linux\nPRETTY_NAME="Linux"\n'


def choose_version(available: list[str], wanted: str | None) -> str | None:
    """The recipe's version if given (None if absent), else the newest by dpkg order."""
    if wanted is not None:
        return wanted if wanted in available else None
    best: str | None = None
    for v in available:
        if best is None or compare_versions(v, best) > 0:
            best = v
    return best


def extract_boot(
    tgz: Path, out_dir: Path, *, recipe: str, version: str | None = None, require_initrd: bool = True
) -> BootFiles:
    """Write out_dir/vmlinuz, out_dir/initrd.img and out_dir/os-release from the rootfs archive.

    One pass over the archive: kernel/initrd/os-release candidates are spooled into a
    temporary directory inside out_dir, symlinks and hard links are recorded, and at the end
    the chosen version is renamed into place. On error nothing is written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spool = Path(os.fspath(out_dir / f".boot-spool-{os.getpid()}"))
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir()
    try:
        files: dict[str, Path] = {}  # archive path -> spooled copy
        symlinks: dict[str, str] = {}
        hardlinks: dict[str, str] = {}
        with open_tar(tgz) as stream:
            for member in stream:
                path = member_path(member)
                if member.issym():
                    symlinks[path] = member.linkname
                elif member.islnk():
                    hardlinks[path] = member_path(tarfile.TarInfo(member.linkname))
                elif member.isreg() and (
                    path in _OS_RELEASE or path in _PLAIN_KERNELS or path in _PLAIN_INITRDS
                    or kernel_version(path) or initrd_version(path)
                ):
                    dest = spool / str(len(files))
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        stream.copy_to(member, fd)
                    finally:
                        os.close(fd)
                    files[path] = dest

        def content(path: str) -> Path | None:
            real = resolve_link(path, symlinks)
            real = hardlinks.get(real, real)
            return files.get(real)

        os_rel_src = next((p for p in map(content, _OS_RELEASE) if p is not None), None)
        os_rel_text = os_rel_src.read_text(errors="replace") if os_rel_src else DEFAULT_OS_RELEASE
        fields = parse_os_release(os_rel_text)

        kernels = {v: p for p in [*files, *symlinks, *hardlinks] if (v := kernel_version(p))}
        kernels = {v: p for v, p in kernels.items() if content(p) is not None}
        initrds = {v: p for p in [*files, *symlinks, *hardlinks] if (v := initrd_version(p))}
        initrds = {v: p for v, p in initrds.items() if content(p) is not None}

        if not kernels:
            plain = next((p for p in _PLAIN_KERNELS if content(p) is not None), None)
            if plain is not None:
                v = kernel_version(resolve_link(plain, symlinks)) or "unknown"
                kernels[v] = plain
                initrd = next((p for p in _PLAIN_INITRDS if content(p) is not None), None)
                if initrd is not None:
                    initrds[v] = initrd
        chosen = choose_version(sorted(kernels), version)
        if chosen is None:
            if version is not None and kernels:
                raise UserError(
                    f"recipe {recipe}: no kernel {version} in the image "
                    f"(it has {', '.join(sorted(kernels))})",
                    hint="fix [boot] kernel in recipe.toml or install that kernel in the Dockerfile",
                )
            raise UserError(
                f"recipe {recipe}: no kernel in the image (no /boot/vmlinuz-<version>)",
                hint=kernel_install_hint(fields),
            )
        initrd_src = content(initrds[chosen]) if chosen in initrds else None
        if initrd_src is None and require_initrd:
            raise UserError(
                f"recipe {recipe}: kernel {chosen} has no initrd (no /boot/initrd.img-{chosen})",
                hint=initrd_install_hint(fields),
            )

        kernel_src = content(kernels[chosen])
        assert kernel_src is not None
        # A file spooled once may serve twice (kernel and hard link): copy, don't move.
        kernel = _place(kernel_src, out_dir / "vmlinuz")
        initrd = _place(initrd_src, out_dir / "initrd.img") if initrd_src else None
        if initrd is None:
            with contextlib.suppress(FileNotFoundError):
                (out_dir / "initrd.img").unlink()
        os_release = out_dir / "os-release"
        write_atomic(os_release, os_rel_text.encode())
        return BootFiles(version=chosen, kernel=kernel, initrd=initrd, os_release=os_release)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _place(src: Path, dest: Path) -> Path:
    """Link a spooled file into place (copy if it is already placed: kernel == initrd)."""
    if src.stat().st_nlink > 1:
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
        return dest
    return link_or_copy(src, dest)


def bzimage_release(kernel: Path) -> str | None:
    """The release of an x86 bzImage ("6.1.0-27-amd64"): the setup header (magic "HdrS" at
    0x202) points at the kernel's version string (kernel_version at 0x20E, relative to 0x200)."""
    with open(kernel, "rb") as f:
        head = f.read(0x210)
        if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
            return None
        pointer = int.from_bytes(head[0x20E:0x210], "little")
        if not pointer:
            return None
        f.seek(pointer + 0x200)
        text = f.read(256).split(b"\0")[0].decode(errors="replace")
    return text.split()[0] if text.strip() else None


MODULE_DIRS = ("lib/modules", "usr/lib/modules")


def extract_modules(tgz: Path, version: str, out: Path, *, recipe: str) -> int:
    """/lib/modules/<version> of a rootfs archive as an uncompressed tar whose entries are named
    lib/modules/<version>/… (build_ext4 places them through the target's own symlinks); returns
    how many entries. One forward pass; written atomically."""
    prefixes = tuple(f"{d}/{version}" for d in MODULE_DIRS)
    count = 0
    with atomic_path(out) as tmp, open_tar(tgz) as stream, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in stream:
            path = member_path(member)
            prefix = next((p for p in prefixes if path == p or path.startswith(p + "/")), None)
            if prefix is None or member.islnk():
                continue
            copy = tarfile.TarInfo(f"lib/modules/{version}{path[len(prefix):]}")
            for attr in ("mode", "uid", "gid", "mtime", "type", "linkname", "size"):
                setattr(copy, attr, getattr(member, attr))
            copy.uname = copy.gname = ""
            tar.addfile(copy, io.BytesIO(stream.read(member)) if member.isreg() else None)
            count += 1
    if not count:
        out.unlink()
        raise UserError(f"recipe {recipe}: no /lib/modules/{version} in the image",
                        hint="its kernel package installs them; rebuild the kernel recipe")
    return count


# --------------------------------------------------------------------------------------------
# ext4 root filesystem
# --------------------------------------------------------------------------------------------

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
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
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
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
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
        os.replace(tmp, out)
        return Ext4Image(out, params.uuid, params.label, blocks * params.block_size, inodes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_ext4_identity(image: Path) -> tuple[uuid.UUID, str]:
    """(UUID, label) from an ext4 superblock (offset 1024: magic at 0x38, uuid 0x68, label 0x78)."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 0x88 or sb[0x38:0x3A] != b"\x53\xef":
        raise UserError(f"{image}: not an ext2/3/4 filesystem image")
    return uuid.UUID(bytes=sb[0x68:0x78]), sb[0x78:0x88].rstrip(b"\0").decode(errors="replace")
