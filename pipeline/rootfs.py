"""What the later stages read out of a rootfs archive, in one forward pass each (tarstream):

- extract_boot(): the kernel, initrd and os-release the image boots with (the boot stage);
- extract_modules(): a kernel's /lib/modules/<version>, for images that borrow that kernel;
- scan_rootfs(): the facts the app stage resolves an image's app against (app.RootfsFacts).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.app import RootfsFacts
from pipeline.errors import UserError
from pipeline.files import atomic_path, link_or_copy, write_atomic
from pipeline.kernel import PLAIN_INITRDS, PLAIN_KERNELS, choose_version, initrd_name_version, kernel_name_version
from pipeline.tarstream import member_path, open_tar, resolve_link

_OS_RELEASE = ("etc/os-release", "usr/lib/os-release")


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
                    path in _OS_RELEASE or path in PLAIN_KERNELS or path in PLAIN_INITRDS
                    or kernel_name_version(path) or initrd_name_version(path)
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

        kernels = {v: p for p in [*files, *symlinks, *hardlinks] if (v := kernel_name_version(p))}
        kernels = {v: p for v, p in kernels.items() if content(p) is not None}
        initrds = {v: p for p in [*files, *symlinks, *hardlinks] if (v := initrd_name_version(p))}
        initrds = {v: p for v, p in initrds.items() if content(p) is not None}

        if not kernels:
            plain = next((p for p in PLAIN_KERNELS if content(p) is not None), None)
            if plain is not None:
                v = kernel_name_version(resolve_link(plain, symlinks)) or "unknown"
                kernels[v] = plain
                initrd = next((p for p in PLAIN_INITRDS if content(p) is not None), None)
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


def scan_rootfs(tgz: Path) -> RootfsFacts:
    """One pass over a rootfs archive: its executables, symlinks, /etc/passwd, /etc/group, kernels."""
    files: set[str] = set()
    symlinks: dict[str, str] = {}
    texts: dict[str, str] = {}
    kernels: set[str] = set()
    with open_tar(tgz) as tar:
        for member in tar:
            path = member_path(member)
            if (member.isreg() or member.issym()) and (version := kernel_name_version(path)):
                kernels.add(version)
            if member.issym():
                symlinks[path] = member.linkname
            elif (member.isreg() or member.islnk()) and member.mode & 0o111:
                files.add(path)
            if path in ("etc/passwd", "etc/group") and member.isreg():
                texts[path] = tar.read(member).decode(errors="replace")
    return RootfsFacts(frozenset(files), symlinks, texts.get("etc/passwd"), texts.get("etc/group"),
                       tuple(sorted(kernels)))
