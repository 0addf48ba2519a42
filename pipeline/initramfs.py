"""The initramfs, as bytes: pure parsing and building, no processes but the zstd/lz4
decompressors (compression.py).

- newc cpio archives: make_cpio() builds one, read_cpio()/initrd_archives() read a (possibly
  concatenated, possibly compressed) initramfs;
- slim_initrd(): the initramfs as one uncompressed archive without firmware and without the
  kernel modules a boot does not load (module_closure() over modules.dep/softdep/alias);
- app_initrd(): the initramfs of app images our init runs: busybox, a few modules, no udev.

Under TCG most of a boot is the guest decompressing (~2.5 s for a 130 MB initrd of which a
virt boot needs a few modules), so the fast_boot stage keeps the slim initrd in the store
(and kernel.extract_vmlinux's uncompressed kernel beside it).
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pipeline.compression import compression_of, decompress

# ── newc cpio archives ──────────────────────────────────────────────────────────────────

def _cpio_entry(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc ("070701") member: header, NUL-terminated name, data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0, len(data), 0, 0, *rdev, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + encoded
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def make_cpio(files: Mapping[str, bytes], *, mode: int = 0o755,
              char_devices: Mapping[str, tuple[int, int]] | None = None) -> bytes:
    """An uncompressed newc cpio archive of `files` (path → content), owned by root.

    Parent directories are added (0755); every file gets `mode`; char_devices are device nodes
    (path → (major, minor)), mode 0600. Deterministic: no mtimes.
    """
    devices = dict(char_devices or {})
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    seen: set[str] = set()
    for path in sorted({*files, *devices}):
        name = path.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad cpio member name {path!r}")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                entries.append((parent, stat.S_IFDIR | 0o755, b"", (0, 0)))
        seen.add(name)
        if path in devices:
            entries.append((name, stat.S_IFCHR | 0o600, b"", devices[path]))
        else:
            entries.append((name, stat.S_IFREG | mode, files[path], (0, 0)))
    out = [_cpio_entry(name, m, data, ino, rdev) for ino, (name, m, data, rdev) in enumerate(entries, start=1)]
    out.append(_cpio_entry("TRAILER!!!", 0, b"", 0))
    return b"".join(out)


def pad4(size: int) -> bytes:
    """Zeros that bring an archive to a 4-byte boundary (the kernel skips them between archives)."""
    return b"\0" * (-size % 4)


# ── initramfs slimming ───────────────────────────────────────────────────────────

INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")


@dataclass(frozen=True)
class CpioMember:
    name: str
    mode: int
    raw: bytes  # header, name, data and padding, exactly as in the archive


def read_cpio(data: bytes, pos: int = 0) -> tuple[list[CpioMember], int]:
    """The members of one newc archive starting at pos, and the offset after its trailer."""
    members = []
    while True:
        if data[pos : pos + 6] not in (b"070701", b"070702"):
            raise ValueError(f"no cpio header at offset {pos}")
        mode = int(data[pos + 14 : pos + 22], 16)
        filesize = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode(errors="surrogateescape")
        data_at = pos + 110 + namesize
        data_at += -data_at % 4
        end = data_at + filesize
        end += -end % 4
        if name == "TRAILER!!!":
            return members, end
        members.append(CpioMember(name, mode, data[pos:end]))
        pos = end


def initrd_archives(initrd: bytes) -> list[list[CpioMember]]:
    """Every archive of a (possibly concatenated, possibly compressed) initramfs."""
    archives = []
    pos = 0
    while pos < len(initrd):
        if initrd[pos] == 0:
            pos += 1
            continue
        if initrd[pos : pos + 6] in (b"070701", b"070702"):
            members, pos = read_cpio(initrd, pos)
            archives.append(members)
            continue
        method = compression_of(initrd[pos : pos + 8])
        if method is None:
            raise ValueError(f"unknown data at offset {pos} of the initrd")
        inner = decompress(initrd[pos:], method)
        archives.extend(initrd_archives(inner))
        break  # the kernel's unpacker also stops after a compressed archive's consumers
    return archives


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def module_closure(dep: str, softdep: str, alias: str, wanted: Sequence[str]) -> set[str]:
    """Paths (as in modules.dep) of `wanted` and everything they need, soft deps included."""
    return set(module_load_order(dep, softdep, alias, wanted))


def module_load_order(dep: str, softdep: str, alias: str, wanted: Sequence[str],
                      loaded: Sequence[str] = ()) -> list[str]:
    """Paths (as in modules.dep) of `wanted` and everything they need, soft deps included, in an
    order insmod can load them: each after what it needs. Built-in and absent modules are left
    out, and so are the paths in `loaded` (an earlier batch)."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep.splitlines():
        if ":" in line:
            path, _, rest = line.partition(":")
            deps[module_name(path)] = (path.strip(), rest.split())
    aliases: dict[str, list[str]] = {}
    for line in alias.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            aliases.setdefault(words[1], []).append(words[2].replace("-", "_"))
    soft: dict[str, list[str]] = {}
    for line in softdep.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            soft.setdefault(words[1].replace("-", "_"), []).extend(w for w in words[2:] if not w.endswith(":"))
    order: list[str] = []
    done: set[str] = set(loaded)

    def visit(name: str) -> None:
        for real in aliases.get(name, [name]):
            if real not in deps or deps[real][0] in done:
                continue  # built in, absent, done or being done (a cycle)
            path, needs = deps[real]
            done.add(path)
            for n in [*soft.get(real, []), *(module_name(n) for n in reversed(needs))]:
                visit(n)
            order.append(path)

    for w in wanted:
        visit(w.replace("-", "_"))
    return order


def member_data(m: CpioMember) -> bytes:
    """The content of one archive member (a file's bytes, a symlink's target)."""
    namesize = int(m.raw[94:102], 16)
    start = 110 + namesize
    start += -start % 4
    return m.raw[start : start + int(m.raw[54:62], 16)]


def slim_initrd(initrd: bytes, wanted: Sequence[str] = INITRD_MODULES) -> bytes:
    """The initrd as one uncompressed archive without firmware and the modules not wanted."""
    members = [m for archive in initrd_archives(initrd) for m in archive]
    by_name = {m.name: m for m in members}

    def text(suffix: str, moddir: str) -> str:
        m = by_name.get(f"{moddir}/{suffix}")
        return member_data(m).decode(errors="replace") if m is not None else ""

    keep: set[str] = set()
    moddirs = {m.name.rsplit("/", 1)[0] for m in members if m.name.endswith("/modules.dep")}
    for moddir in moddirs:
        closure = module_closure(
            text("modules.dep", moddir), text("modules.softdep", moddir), text("modules.alias", moddir), wanted
        )
        keep |= {f"{moddir}/{p}" for p in closure}

    def wanted_member(m: CpioMember) -> bool:
        if "/firmware/" in f"/{m.name}" and stat.S_ISREG(m.mode):
            return False
        if "/kernel/" in m.name and ".ko" in m.name and stat.S_ISREG(m.mode):
            return m.name in keep
        return True

    slim = [m.raw for m in members if wanted_member(m)]
    return b"".join(slim) + _cpio_entry("TRAILER!!!", 0, b"", 0)


# ── the initramfs of apps that run on our init ─────────────────────────────────────────

APP_INITRD_FORMAT = 1  # bump when app_initrd() lays its archive out differently
APP_INITRD_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "ext4")  # the run targets' VM
APP_INITRD_MORE = ("ahci", "sd_mod", "nvme", "xhci_pci", "usb_storage", "uas")  # the other disk buses
APP_INITRD_DIR = "lib/ldt"  # in the archive: the modules and the two lists the /init script reads


def app_initrd(init: bytes, busybox: bytes, read: Callable[[str], bytes | None],
               first: Sequence[str] = APP_INITRD_MODULES, more: Sequence[str] = APP_INITRD_MORE,
               dm: Mapping[str, bytes] | None = None) -> bytes:
    """The initramfs of an app image booted by our init (pipeline/guest/app-initrd.sh as /init):
    a static busybox, and the kernel's modules for `first` (always loaded) and `more` (loaded
    when the root is not found after the first), each list in load order. read(name) gives a
    file of the kernel's /lib/modules/<version>/ (modules.dep…, or a module, maybe compressed),
    None when absent. Uncompressed: the kernel unpacks it in no time, even under TCG.

    For a dm-verity root ([disk] verity): `first` also holds VERITY_MODULES, and `dm` is dmsetup
    with its libraries and their loader ({name: bytes}, the loader as "ld.so") for lib/ldt/dm/."""
    def text(name: str) -> str:
        data = read(name)
        return data.decode(errors="replace") if data is not None else ""

    dep, softdep, alias = text("modules.dep"), text("modules.softdep"), text("modules.alias")
    if not dep:
        raise ValueError("the kernel's /lib/modules has no modules.dep")
    batch1 = module_load_order(dep, softdep, alias, first)
    batch2 = module_load_order(dep, softdep, alias, more, loaded=batch1)
    files = {"init": init, "bin/busybox": busybox}
    files.update({f"{APP_INITRD_DIR}/dm/{name}": data for name, data in (dm or {}).items()})
    for list_name, batch in (("first", batch1), ("more", batch2)):
        names = []
        for path in batch:
            data = read(path)
            if data is None:
                raise ValueError(f"modules.dep names {path}, which is not there")
            name = module_name(path) + ".ko"
            method = compression_of(data)
            files[f"{APP_INITRD_DIR}/modules/{name}"] = decompress(data, method) if method else data
            names.append(name)
        files[f"{APP_INITRD_DIR}/{list_name}"] = "".join(f"{n}\n" for n in names).encode()
    return make_cpio(files, char_devices={"dev/console": (5, 1)})


# ── dm-verity in an initramfs-tools initrd ──────────────────────────────────────────────────

VERITY_MODULES = ("dm_mod", "dm_verity")  # and what they need (dm-bufio, reed_solomon), from modules.dep
# the whole tree's dependency indexes over the initrd's own: `modprobe dm-verity` finds the added modules
# (by name: the initrd's alias and builtin indexes stay; the big alias/symbol ones are not needed, and
# every byte of the initrd is hashed again by the firmware under Secure Boot)
MODULE_INDEXES = ("modules.dep", "modules.dep.bin", "modules.softdep")
DMSETUP = ("usr/sbin/dmsetup", "sbin/dmsetup")  # where initramfs-tools' dmsetup hook puts it
SCRIPT_PHASES = ("local-top", "local-bottom")  # verity-local-top.sh, verity-local-bottom.sh
VERITY_SCRIPT = "ldt-verity"  # their name under scripts/<phase>/


def order_line(phase: str) -> str:
    return f'/scripts/{phase}/{VERITY_SCRIPT} "$@"\n'


ORDER_TAIL = "[ -e /conf/param.conf ] && . /conf/param.conf\n"  # what mkinitramfs ends each ORDER with


def verity_overlay(initrd: bytes, version: str, read: Callable[[str], bytes | None],
                   scripts: Mapping[str, bytes]) -> bytes:
    """What opens a dm-verity root in an initramfs-tools initrd that has dmsetup (Debian's dmsetup
    hook), appended to it: a cpio with `scripts` ({phase: script}, run first in their phase: each
    ORDER is the initrd's own with our line in front), dm-verity and what it needs from the kernel's
    /lib/modules/<version>/ (read(name), as app_initrd's) and that tree's module indexes, so modprobe
    finds them. The kernel unpacks the archives of an initrd in turn, later files over earlier ones:
    the initrd itself is left as it is (compressed). ValueError when the initrd cannot open it."""
    members = {m.name: m for archive in initrd_archives(initrd) for m in archive}
    if "scripts/functions" not in members:
        raise ValueError("its initrd is not made by initramfs-tools (no /scripts/functions)")
    if not any(name in members for name in DMSETUP):
        raise ValueError("its initrd has no dmsetup")
    moddir = next((d for d in (f"usr/lib/modules/{version}", f"lib/modules/{version}")
                   if f"{d}/modules.dep" in members), f"lib/modules/{version}")

    def text(name: str) -> str:
        data = read(name)
        return data.decode(errors="replace") if data is not None else ""

    dep = text("modules.dep")
    if not dep:
        raise ValueError(f"the kernel's /lib/modules/{version} has no modules.dep")
    files: dict[str, bytes] = {}
    for path in [*module_load_order(dep, text("modules.softdep"), text("modules.alias"), VERITY_MODULES),
                 *MODULE_INDEXES]:
        data = read(path)
        if data is None:
            if path in MODULE_INDEXES:
                continue
            raise ValueError(f"modules.dep names {path}, which is not there")
        files[f"{moddir}/{path}"] = data  # as they are: compressed ones stay so (and keep their signature)
    if "/dm-verity.ko" not in dep and "/dm-verity.ko" not in text("modules.builtin"):
        raise ValueError(f"the kernel {version} has no dm-verity")
    for phase, script in scripts.items():
        order = members.get(f"scripts/{phase}/ORDER")
        files[f"scripts/{phase}/{VERITY_SCRIPT}"] = script
        files[f"scripts/{phase}/ORDER"] = (order_line(phase) + (member_data(order).decode() if order is not None
                                                                 else ORDER_TAIL)).encode()
    return b"\0" * (-len(initrd) % 512) + make_cpio(files)
