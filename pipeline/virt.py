"""virt: run one command as root in a throwaway VM that sees the current directory at /work.

Reading order: VirtOptions → the pure builders (make_cpio, argv_script, init_script,
virt_kernel_cmdline, virt_qemu_cmd) → fast boot (extract_vmlinux, slim_initrd, cached by
fast_boot_files) → checks → the executor run_virt() and its relay.

How a run works. The image's own kernel boots with its own initrd plus a small appended
cpio (the kernel unpacks concatenated archives): `rdinit=/ldt-virt-init` starts our script
instead of initramfs-tools' /init. The script (the initrd's klibc sh) mounts the root image
(a throwaway snapshot) at /root, loads the 9p and virtio-serial modules from it, mounts the
host directory at /root/work over 9p and chroots into /root to run argv in /work. The
command's stdin, stdout and stderr are FIFOs relayed to three virtio-serial ports, each a
socketpair to this process, so the streams stay separate and free of kernel messages (the
kernel console goes to a log shown only on failure). The exit status and the byte count of
each output port come back on a fourth port; once every byte has arrived, QEMU is stopped.

Every process goes through pipeline.run.spawn()/run(); nothing here changes the images.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.qemu import Accel, find_qemu, qemu_opt, reap, select_accel
from pipeline.run import log, run, spawn, verbose

INIT = "ldt-virt-init"  # path of the init script inside the appended cpio
CONF = "ldt-virt-conf"  # sourced by the init script: settings and `set -- argv`
MOUNT_TAG = "ldtwork"
PORTS = ("stdin", "stdout", "stderr", "control")  # virtio-serial port names are "ldt.<port>"
ERROR_TAG = "ldt-virt-error:"  # the init script's failure lines on the kernel console
STATUS_LINE = re.compile(rb"status (\d+) (\d+|-) (\d+|-)\n")
EXIT_TIMEOUT = 124  # like timeout(1)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PIPE = 141  # 128 + SIGPIPE: the host's stdout reader went away
EXIT_TERMINATED = 143  # 128 + SIGTERM
MSIZE = 512 * 1024  # 9p message size: the largest virtio transport size, for throughput
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REFUSED_WORKDIRS = ("/", "/proc", "/sys", "/dev", "/run", "/boot")


# ── settings ────────────────────────────────────────────────────────────────────────────


def virtio_pci(kind: str, opts: str) -> list[str]:
    """A -device for a virtio PCI device ("blk", "9p", …); no option ROM (no firmware boots them)."""
    return ["-device", f"virtio-{kind}-pci,{opts},romfile="]


@dataclass(frozen=True)
class VirtOptions:
    """How the throwaway VM looks. memory in MiB; timeout in seconds (None: no limit)."""

    memory: int = 1024
    cpus: int = 1
    timeout: float | None = None
    net: bool = False  # user-mode networking (-nic user): outbound TCP/UDP, DNS at 10.0.2.3
    ro: bool = False  # /work read-only
    accel: Accel = Accel.AUTO

    def __post_init__(self) -> None:
        if self.memory < 256:
            raise UserError(f"VM memory {self.memory} MiB is too small", hint="use at least 256 MiB")
        if self.cpus < 1:
            raise UserError(f"VM cpus must be at least 1, not {self.cpus}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"timeout must be positive, not {self.timeout:g}")


# ── pure builders ───────────────────────────────────────────────────────────────────────


def _cpio_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    """One newc ("070701") member: header, NUL-terminated name, data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1 if not stat.S_ISDIR(mode) else 2, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + encoded
    return head + b"\0" * (-len(head) % 4) + data + b"\0" * (-len(data) % 4)


def make_cpio(files: Mapping[str, bytes], *, mode: int = 0o755) -> bytes:
    """An uncompressed newc cpio archive of `files` (path → content), owned by root.

    Parent directories are added (0755); every file gets `mode`. Deterministic: no mtimes.
    """
    entries: list[tuple[str, int, bytes]] = []
    seen: set[str] = set()
    for path in sorted(files):
        name = path.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad cpio member name {path!r}")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                entries.append((parent, stat.S_IFDIR | 0o755, b""))
        seen.add(name)
        entries.append((name, stat.S_IFREG | mode, files[path]))
    out = [_cpio_entry(name, m, data, ino) for ino, (name, m, data) in enumerate(entries, start=1)]
    out.append(_cpio_entry("TRAILER!!!", 0, b"", 0))
    return b"".join(out)


def argv_script(argv: Sequence[str], *, ro: bool, net: bool, term: str | None, debug: bool = False) -> str:
    """The settings file the init script sources: POSIX-quoted, so any argv is safe in it."""
    if not argv:
        raise ValueError("virt needs a command")
    words = " ".join(shlex.quote(os.fsdecode(a)) for a in argv)
    return "\n".join([
        f"LDT_RO={int(ro)}",
        f"LDT_NET={int(net)}",
        f"LDT_TERM={shlex.quote(term or '')}",
        f"LDT_DEBUG={int(debug)}",
        f"set -- {words}",
        "",
    ])  # fmt: skip


# The init script runs as PID 1 under the initrd's shell (klibc's dash on Debian: mount,
# modprobe, mkfifo, cat, chroot, sleep — no busybox needed), so it sticks to POSIX sh and
# the tools every initramfs-tools initrd has. Failures are "ldt-virt-error: <kind> <what>"
# lines on the console, which run_virt() turns into a UserError.
_INIT_TEMPLATE = r"""#!/bin/sh
# ldt-virt-init: boot straight into one command, then reset (QEMU runs with -no-reboot).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
R=/root
F=/root/run/ldt-virt

fail() {
    echo "@ERROR_TAG@ $*" > /dev/console
    sync
    echo b > /proc/sysrq-trigger
    sleep 10
}

say() {
    [ "$LDT_DEBUG" = 1 ] || return 0
    read -r up _ < /proc/uptime
    echo "ldt-virt: [$up] $*" > /dev/console
}

# wait_for <test> <path>: up to 10 s for a device node or file to appear
wait_for() {
    n=0
    while ! test "$1" "$2"; do
        n=$((n + 1))
        [ $n -gt 200 ] && return 1
        sleep 0.05
    done
}

mkdir -p /proc /sys /dev /tmp $R
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk 2>/dev/null

. /@CONF@

say root modules
# The root image: virtio transport, disk and file system modules from the initrd.
for m in virtio_pci virtio_blk ext4; do
    modprobe -q "$m" || fail initrd-module "$m"
done
wait_for -b /dev/vda || fail no-disk /dev/vda
mount -t ext4 /dev/vda $R || fail mount-root /dev/vda
[ -x $R/bin/sh ] || fail no-shell /bin/sh

say root mounted
# The rest only ship with the image's kernel, in the root image.
for m in virtio_console 9pnet_virtio 9p; do
    modprobe -q "$m" 2>/dev/null || modprobe -q -d $R "$m" || fail root-module "$m"
done
if [ "$LDT_NET" = 1 ]; then
    modprobe -q virtio_net 2>/dev/null || modprobe -q -d $R virtio_net || fail root-module virtio_net
fi

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
ln -s /proc/self/fd $R/dev/fd  # what udev would add to devtmpfs
ln -s /proc/self/fd/0 $R/dev/stdin
ln -s /proc/self/fd/1 $R/dev/stdout
ln -s /proc/self/fd/2 $R/dev/stderr
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
say mounting work
mkdir -p $R/work
opts=trans=virtio,version=9p2000.L,msize=@MSIZE@,cache=mmap
[ "$LDT_RO" = 1 ] && opts=$opts,ro
mount -t 9p -o $opts @MOUNT_TAG@ $R/work || fail mount-work @MOUNT_TAG@

echo ldt-virt > /proc/sys/kernel/hostname
ipconfig -c none -d lo > /dev/null 2>&1
if [ "$LDT_NET" = 1 ]; then
    wait_for -d /sys/class/net/eth0 || fail no-device eth0
    ipconfig -t 10 -c none -d 10.0.2.15::10.0.2.2:255.255.255.0:ldt-virt:eth0:off > /dev/null 2>&1 \
        || fail network eth0
    rm -f $R/etc/resolv.conf 2>/dev/null
    echo "nameserver 10.0.2.3" > $R/etc/resolv.conf
fi

say finding ports
# The virtio-serial ports, by name (no udev here to make /dev/virtio-ports/ links).
n=0
while :; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        read -r name < "$p/name"
        case "$name" in
            ldt.stdin) IN=/dev/${p##*/} ;;
            ldt.stdout) OUT=/dev/${p##*/} ;;
            ldt.stderr) ERR=/dev/${p##*/} ;;
            ldt.control) CTL=/dev/${p##*/} ;;
        esac
    done
    [ -n "$IN" ] && [ -n "$OUT" ] && [ -n "$ERR" ] && [ -n "$CTL" ] && break
    n=$((n + 1))
    [ $n -gt 200 ] && fail no-ports ldt.stdin
    sleep 0.05
done
for d in "$IN" "$OUT" "$ERR" "$CTL"; do wait_for -c "$d" || fail no-ports "$d"; done

# A port opens only once: the command gets FIFOs (reopening /dev/stderr works), and cat
# relays them to the ports.
say starting relays
mkdir -p $F
mkfifo $F/in $F/out $F/err
cat "$IN" > $F/in &
cat $F/out > "$OUT" &
o=$!
cat $F/err > "$ERR" &
e=$!

HOME=/root
USER=root
LOGNAME=root
PATH=@GUEST_PATH@
export HOME USER LOGNAME PATH
if [ -n "$LDT_TERM" ]; then TERM=$LDT_TERM; export TERM; else unset TERM; fi
say running command
# In the background, so the FIFOs open in a child: the init shell's own blocking opens
# could be interrupted (EINTR), and dash's `wait` retries where open does not.
chroot $R /bin/sh -c 'cd /work && exec "$@"' virt "$@" < $F/in > $F/out 2> $F/err &
wait $!
status=$?

say command done, cleaning up
# The command is done: stop whatever it left behind (and the stdin relay), let the
# output relays drain, then report.
for p in /proc/[0-9]*; do
    p=${p#/proc/}
    case " 1 $o $e " in *" $p "*) ;; *) kill -9 "$p" 2> /dev/null ;; esac
done
: <> $F/out  # a relay still waiting for a writer gets one, and then EOF
: <> $F/err
wait $o $e
sync
say reporting

# A port write returns once the data is queued, not once QEMU took it: a reset now could
# drop output QEMU holds back while the host reads slowly. So the host learns how many
# bytes each port sent (virtio_console's debugfs statistics) and ends the VM itself when it
# has them all. Without the statistics the guest resets after a grace period.
sent() {
    f=/sys/kernel/debug/virtio-ports/${1#/dev/}
    [ -r "$f" ] || { echo -; return; }
    while read -r key value; do
        [ "$key" = bytes_sent: ] && { echo "$value"; return; }
    done < "$f"
    echo -
}
mkdir -p /sys/kernel/debug
mount -t debugfs debugfs /sys/kernel/debug 2> /dev/null
out=$(sent "$OUT")
err=$(sent "$ERR")
echo "status $status $out $err" > "$CTL"
if [ "$out" = - ] || [ "$err" = - ]; then sleep 1; echo b > /proc/sysrq-trigger; fi
while :; do sleep 3600; done
"""


def init_script() -> str:
    """The guest's PID 1 (see _INIT_TEMPLATE); the per-run settings live in CONF."""
    values = {
        "ERROR_TAG": ERROR_TAG,
        "CONF": CONF,
        "MSIZE": str(MSIZE),
        "MOUNT_TAG": MOUNT_TAG,
        "GUEST_PATH": GUEST_PATH,
    }
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], _INIT_TEMPLATE)


def virt_cpio(argv: Sequence[str], *, options: VirtOptions, term: str | None) -> bytes:
    """The archive appended to the image's initrd: the init script and this run's settings."""
    return make_cpio({
        INIT: init_script().encode(),
        CONF: argv_script(argv, ro=options.ro, net=options.net, term=term, debug=verbose()).encode(),
    })  # fmt: skip


def pad4(size: int) -> bytes:
    """Zeros that bring an archive to a 4-byte boundary (the kernel skips them between archives)."""
    return b"\0" * (-size % 4)


# Kernel arguments that only save boot time in a VM without keyboard, one serial port and
# nothing to audit: about 0.5 s under TCG (the crypto self-tests are most of it).
FAST_BOOT_ARGS = "cryptomgr.notests no_timer_check 8250.nr_uarts=1 i8042.noaux i8042.nokbd audit=0 apparmor=0"


def virt_kernel_cmdline() -> str:
    # quiet: the console log stays short; panic=-1 with -no-reboot: a crash ends QEMU at once.
    return f"console=ttyS0 rdinit=/{INIT} panic=-1 quiet {FAST_BOOT_ARGS}"


def virt_qemu_cmd(
    *,
    kernel: Path,
    initrd: Path,
    rootfs: Path,
    workdir: Path,
    options: VirtOptions,
    accel: Accel,
    fds: Mapping[str, int],
    console_log: Path,
    qemu: str = "qemu-system-x86_64",
    bios: Path | None = None,
) -> list[str]:
    """The qemu argv for one virt run. Pure. `initrd` is the combined one (virt_cpio appended);
    `fds` maps each of PORTS to an inherited, connected socket; `accel` is resolved; `bios`
    (qboot) replaces SeaBIOS, which only costs time before a -kernel boot."""
    missing = [p for p in PORTS if p not in fds]
    if missing:
        raise ValueError(f"no socket for port(s) {', '.join(missing)}")
    ro = ",readonly=on" if options.ro else ""
    cmd = [
        qemu,
        "-machine", "q35",
        *accel.qemu_args(options.cpus),
        "-smp", str(options.cpus),
        "-m", str(options.memory),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none", "-monitor", "none",
        "-serial", f"file:{console_log}",
        *(["-bios", os.fspath(bios)] if bios is not None else []),
        "-kernel", os.fspath(kernel),
        "-initrd", os.fspath(initrd),
        "-append", virt_kernel_cmdline(),
        "-drive", f"if=none,id=root,file={qemu_opt(rootfs)},format=raw,snapshot=on,cache=unsafe",
        *virtio_pci("blk", "drive=root"),
        "-fsdev", f"local,id=work,path={qemu_opt(workdir)},security_model=none{ro}",
        *virtio_pci("9p", f"fsdev=work,mount_tag={MOUNT_TAG}"),
        *virtio_pci("serial", "id=ports"),
    ]  # fmt: skip
    for port in PORTS:
        cmd += [
            "-chardev", f"socket,id={port},fd={fds[port]}",
            "-device", f"virtserialport,bus=ports.0,chardev={port},name=ldt.{port}",
        ]  # fmt: skip
    if options.net:
        cmd += ["-netdev", "user,id=net0", *virtio_pci("net", "netdev=net0")]
    return cmd


# ── fast boot: an uncompressed kernel and a slim initrd ────────────────────────────────
#
# Under TCG most of a boot is the guest decompressing: ~3.5 s for an xz bzImage, ~2.5 s for a
# 130 MB initrd of which the script needs a few modules. So the host decompresses the kernel
# once (QEMU boots the ELF vmlinux through its PVH entry, CONFIG_PVH) and keeps from the
# initrd everything but the kernel modules the script does not load; both are cached by
# content. Whatever cannot be done (no PVH note, an unknown compression) falls back to the
# original file: slower, same result.

INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
SLIM_VERSION = 1  # bump when extract_vmlinux() or slim_initrd() change their output

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


def compression_of(data: bytes) -> str | None:
    return next((name for magic, name in _MAGICS if data.startswith(magic)), None)


def decompress(data: bytes, method: str) -> bytes:
    """One compressed stream (trailing bytes ignored); zstd and lz4 through their tools."""
    import bz2
    import lzma
    import zlib

    if method == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if method in ("xz", "lzma"):
        fmt = lzma.FORMAT_XZ if method == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress(data)
    if method == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if method in ("zstd", "lz4"):
        return run([method, "-dcq"], input=data, capture=True).stdout
    raise ValueError(f"unknown compression {method}")


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage when it has a PVH entry point, else None."""
    import struct

    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    method = compression_of(payload)
    if method is None:
        return None
    try:
        elf = decompress(payload, method)
    except (OSError, EOFError, ValueError, UserError):
        return None
    return elf if has_pvh_note(elf) else None


def has_pvh_note(elf: bytes) -> bool:
    """A 64-bit ELF with a Xen PHYS32_ENTRY note (type 18): QEMU can boot it directly."""
    import struct

    if elf[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


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
    found: set[str] = set()
    todo = [w.replace("-", "_") for w in wanted]
    while todo:
        name = todo.pop()
        for real in aliases.get(name, [name]):
            if real not in deps or deps[real][0] in found:
                continue  # built in, absent, or done
            path, needs = deps[real]
            found.add(path)
            todo += [module_name(n) for n in needs]
            todo += soft.get(real, [])
    return found


def slim_initrd(initrd: bytes, wanted: Sequence[str] = INITRD_MODULES) -> bytes:
    """The initrd as one uncompressed archive without firmware and the modules not wanted."""
    members = [m for archive in initrd_archives(initrd) for m in archive]
    by_name = {m.name: m for m in members}

    def text(suffix: str, moddir: str) -> str:
        m = by_name.get(f"{moddir}/{suffix}")
        if m is None:
            return ""
        namesize = int(m.raw[94:102], 16)
        start = 110 + namesize
        start += -start % 4
        return m.raw[start : start + int(m.raw[54:62], 16)].decode(errors="replace")

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


def fast_boot_key(kernel: Path, initrd: Path) -> str:
    """Identity of the inputs by path and stat, not content: store artifacts never change in
    place, and hashing 50 MB on every run would cost more than it protects. Stdlib only, so
    virt runs from any Python 3.11 (as another user, say)."""
    import hashlib
    import json

    def ident(p: Path) -> list[object]:
        st = p.stat()
        return [os.fspath(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]

    manifest = {"kernel": ident(kernel), "initrd": ident(initrd), "version": SLIM_VERSION}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def fast_boot_files(kernel: Path, initrd: Path, cache: Path) -> tuple[Path, Path]:
    """(kernel, initrd) to boot: the cached uncompressed/slim versions, or the originals."""
    key = fast_boot_key(kernel, initrd)
    entry = cache / key
    vmlinux, slim, failed = entry / "vmlinux", entry / "initrd.cpio", entry / "unsupported"
    if not entry.is_dir():
        start = time.monotonic()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{entry}.{os.getpid()}.tmp")
        tmp.mkdir()
        elf = extract_vmlinux(kernel.read_bytes())
        if elf is not None:
            (tmp / "vmlinux").write_bytes(elf)
        try:
            (tmp / "initrd.cpio").write_bytes(slim_initrd(initrd.read_bytes()))
        except (ValueError, OSError, EOFError, UserError) as e:
            (tmp / "unsupported").write_text(f"{e}\n")
        try:
            os.rename(tmp, entry)
        except OSError:  # another run got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        if verbose():
            log(f"virt: prepared the fast-boot kernel and initrd in {time.monotonic() - start:.1f}s")
    if verbose() and failed.exists():
        log(f"virt: booting the original initrd: {failed.read_text().strip()}")
    return (vmlinux if vmlinux.exists() else kernel, slim if slim.exists() else initrd)


QBOOT_CANDIDATES = ("/usr/share/qemu/qboot.rom", "/usr/share/qemu-firmware/qboot.rom", "/usr/share/qboot/bios.bin")


def find_qboot(candidates: Sequence[str] = QBOOT_CANDIDATES) -> Path | None:
    """qboot, the minimal firmware for -kernel boots (≈0.3 s faster than SeaBIOS), if installed."""
    return next((Path(c) for c in candidates if os.path.isfile(c)), None)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldt" / "virt"


# ── checks ──────────────────────────────────────────────────────────────────────────────


def check_workdir(workdir: Path) -> Path:
    """The directory to share, resolved; UserError when it may not or cannot be shared."""
    try:
        resolved = workdir.resolve(strict=True)
    except PermissionError:
        raise UserError(f"{workdir} is not accessible for this user", hint="cd into a directory you can read") from None
    except (OSError, RuntimeError):
        raise UserError(
            f"the current directory {workdir} does not exist", hint="cd into the directory to share"
        ) from None
    if not resolved.is_dir():
        raise UserError(f"{resolved} is not a directory", hint="cd into the directory to share")
    if os.fspath(resolved) in REFUSED_WORKDIRS:
        raise UserError(
            f"refusing to share {resolved} with the VM (it sees the current directory at /work)",
            hint="cd into a project directory first",
        )
    if not os.access(resolved, os.R_OK | os.X_OK):
        raise UserError(f"{resolved} is not readable for this user", hint="cd into a directory you can read")
    return resolved


def check_artifacts(**paths: Path) -> None:
    for what, path in paths.items():
        if not path.is_file():
            raise UserError(f"{what} {path} not found", hint="build the image first")
        if not os.access(path, os.R_OK):
            raise UserError(f"{what} {path} is not readable for this user")


_HINTS = {
    "initrd-module": "the initrd lacks module {what}: build it with MODULES=most in "
    "/etc/initramfs-tools/initramfs.conf (Debian's default) or list {what} in /etc/initramfs-tools/modules",
    "root-module": "the image's kernel has no module {what}: add a kernel package that ships it to the recipe "
    "(Debian: linux-image-amd64)",
    "no-shell": "virt runs the command through the image's /bin/sh: keep a shell (dash or bash) in the image",
    "mount-root": "the root image must be an ext4 file system",
}


def guest_error(console: str) -> UserError | None:
    """The init script's failure line on the console, as a UserError with a hint."""
    found = re.search(rf"{re.escape(ERROR_TAG)} (\S+) ?(.*)", console)
    if not found:
        return None
    kind, what = found.group(1), found.group(2).strip()
    messages = {
        "initrd-module": f"module {what} is missing from the image's initrd",
        "root-module": f"module {what} is missing from the image",
        "no-shell": "the image has no /bin/sh",
        "mount-root": "the root image could not be mounted as ext4",
        "mount-work": "the guest could not mount the shared directory over 9p",
        "no-disk": "the guest found no root disk",
        "no-ports": "the guest found no virtio-serial ports",
        "network": "the guest could not configure its network",
    }
    hint = _HINTS.get(kind, "run with LDT_VERBOSE=1 for the guest console")
    return UserError(messages.get(kind, f"guest setup failed: {kind} {what}"), hint=hint.format(what=what))


# ── the executor ────────────────────────────────────────────────────────────────────────


def run_virt(
    argv: list[str],
    *,
    kernel: Path,
    initrd: Path,
    rootfs: Path,
    workdir: Path,
    options: VirtOptions,
    cache_dir: Path | None = None,
) -> int:
    """Run argv as root in a throwaway VM with workdir at /work; return its exit status.

    stdin, stdout and stderr are relayed separately. Other exits: 124 when options.timeout
    (counted from QEMU's start, boot included) passed and the VM was killed, 130 on Ctrl-C,
    143 on SIGTERM, 141 when the host's stdout/stderr pipe has no reader any more.
    UserError for what the user can fix (directory, image, qemu). `cache_dir` (the project's
    cache/) keeps the KVM probe's answer and the fast-boot files under virt/; without it
    they go to $XDG_CACHE_HOME/ldt/virt (~/.cache/ldt/virt).
    """
    import tempfile

    if not argv:
        raise UserError("no command given", hint="virt -- COMMAND [ARGS…]")
    share = check_workdir(workdir)
    check_artifacts(kernel=kernel, initrd=initrd, **{"root image": rootfs})
    qemu = find_qemu()
    accel = select_accel(options.accel, cache_dir=cache_dir, notice=verbose()).accel
    term = os.environ.get("TERM") if os.isatty(1) else None
    with tempfile.TemporaryDirectory(prefix="ldt-virt-") as tmp:
        cache = cache_dir / "virt" if cache_dir is not None else default_cache()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            cache = Path(tmp) / "cache"
        kernel, initrd = fast_boot_files(kernel, initrd, cache)
        combined = Path(tmp) / "initrd"
        _write_initrd(combined, initrd, virt_cpio(argv, options=options, term=term))
        console_log = Path(tmp) / "console.log"
        pairs = {port: socket.socketpair() for port in PORTS}
        ours = {port: a for port, (a, _) in pairs.items()}
        theirs = {port: b for port, (_, b) in pairs.items()}
        try:
            cmd = virt_qemu_cmd(
                kernel=kernel, initrd=combined, rootfs=rootfs, workdir=share, options=options, accel=accel,
                fds={p: s.fileno() for p, s in theirs.items()}, console_log=console_log, qemu=qemu,
                bios=find_qboot(),
            )  # fmt: skip
            proc = spawn(
                cmd,
                pass_fds=[s.fileno() for s in theirs.values()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # Ctrl-C is ours to handle, not QEMU's
            )
        finally:
            for s in theirs.values():
                s.close()
        return _supervise(proc, ours, console_log, options.timeout)


def _write_initrd(dest: Path, initrd: Path, extra: bytes) -> None:
    import shutil

    shutil.copyfile(initrd, dest)
    with dest.open("ab") as f:
        f.write(pad4(f.tell()))
        f.write(extra)


def _supervise(
    proc: subprocess.Popen, socks: dict[str, socket.socket], console_log: Path, timeout: float | None
) -> int:
    """Relay the streams until QEMU exits; the exit status, 124 or 130. QEMU never outlives this."""
    start = time.monotonic()
    deadline = start + timeout if timeout is not None else None
    relay = _Relay(proc, socks)
    old_term = _on_sigterm()
    try:
        finished = relay.pump(deadline)
    except KeyboardInterrupt:
        reap(proc)
        return EXIT_INTERRUPTED
    except _PipeClosed:
        reap(proc)
        return EXIT_PIPE
    except _Terminated:
        reap(proc)
        return EXIT_TERMINATED
    finally:
        reap(proc)
        relay.close()
        _restore_sigterm(old_term)
    if verbose():
        log(f"virt: VM ran {time.monotonic() - start:.1f}s")
    console = console_log.read_text(errors="replace") if console_log.exists() else ""
    if verbose():
        log("virt: guest console:\n" + console)
    if not finished:
        log(f"virt: timed out after {timeout:g}s, VM killed")
        return EXIT_TIMEOUT
    if relay.status is not None:
        return relay.status
    error = guest_error(console)
    if error is not None:
        raise error
    qemu_err = relay.qemu_stderr().strip()
    if qemu_err:
        raise UserError(f"qemu failed: {qemu_err.splitlines()[-1]}", hint="run with LDT_VERBOSE=1 to see its command")
    tail = "\n".join("  " + line for line in console.strip().splitlines()[-20:])
    raise UserError(f"the VM stopped before the command finished; its console ended with:\n{tail}")


class _PipeClosed(Exception):
    """The host's stdout or stderr is a pipe whose reader is gone."""


class _Terminated(Exception):
    """SIGTERM: stop the VM like Ctrl-C does, then exit 143."""


def _raise_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _on_sigterm():
    try:
        return signal.signal(signal.SIGTERM, _raise_sigterm)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(old) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)


class _Relay:
    """Host stdin → the stdin port; the stdout/stderr ports → fds 1/2; the control port → status."""

    CHUNK = 65536
    MAX_PENDING = 1 << 20  # stop reading host stdin while this much waits for the guest

    def __init__(self, proc: subprocess.Popen, socks: dict[str, socket.socket]) -> None:
        import selectors

        self.sel = selectors.PollSelector()  # unlike epoll, poll takes regular files and /dev/null
        self.proc = proc
        self.socks = socks
        self.status: int | None = None
        self.control = b""
        self.err = bytearray()
        self.pending = b""  # host stdin not yet taken by the guest
        self.stdin_eof = False
        self.stdin_closed = False
        self.sinks = {"stdout": 1, "stderr": 2}
        self.received = {"stdout": 0, "stderr": 0}
        self.expected: dict[str, int | None] = {}  # bytes each output port sent, from the status line
        for s in socks.values():
            s.setblocking(False)
        self.sel.register(socks["stdout"], selectors.EVENT_READ, "stdout")
        self.sel.register(socks["stderr"], selectors.EVENT_READ, "stderr")
        self.sel.register(socks["control"], selectors.EVENT_READ, "control")
        assert proc.stderr is not None
        self.sel.register(proc.stderr, selectors.EVENT_READ, "qemu")
        self.stdin_fd = self._host_stdin()
        if self.stdin_fd is None:
            self._close_stdin()
        else:
            self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    @staticmethod
    def _host_stdin() -> int | None:
        try:
            os.fstat(0)
        except OSError:
            return None
        return 0

    def _open_streams(self) -> set[str]:
        return {key.data for key in self.sel.get_map().values()} & {"stdout", "stderr", "control", "qemu"}

    def complete(self) -> bool:
        """The status arrived and so did every byte the guest sent (or its reader went away)."""
        if self.status is None or len(self.expected) < 2:
            return False
        for port, count in self.expected.items():
            if count is None:
                return False  # unknown: wait for the guest's reset
            if port in self.sinks and self.received[port] < count:
                return False
        return True

    def pump(self, deadline: float | None) -> bool:
        """Relay until the command's output is complete or QEMU has closed every stream;
        False when the deadline passed first."""
        while self._open_streams() and not self.complete():
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return False
            for key, events in self.sel.select(wait):
                self._handle(key.data, events)
        return True

    def _handle(self, what: str, events: int) -> None:
        if what == "host-stdin":
            self._read_host_stdin()
        elif what == "guest-stdin":
            self._write_guest_stdin()
        elif what == "qemu":
            assert self.proc.stderr is not None
            data = os.read(self.proc.stderr.fileno(), self.CHUNK)
            if data:
                self.err += data
            else:
                self.sel.unregister(self.proc.stderr)
        else:
            self._read_port(what)

    def _read_port(self, port: str) -> None:
        sock = self.socks[port]
        try:
            data = sock.recv(self.CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            return
        if port == "control":
            self.control += data
            found = STATUS_LINE.search(self.control)
            if found:
                self.status = int(found.group(1))
                for name, count in zip(("stdout", "stderr"), found.group(2, 3), strict=True):
                    self.expected[name] = int(count) if count != b"-" else None
            return
        self.received[port] += len(data)
        fd = self.sinks.get(port)
        if fd is None:
            return
        try:
            _write_all(fd, data)
        except BrokenPipeError:
            raise _PipeClosed from None  # `virt -- yes | head`: end like the writer of a pipe
        except OSError:  # a closed descriptor (2>&-): discard, like /dev/null
            del self.sinks[port]

    def _read_host_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, self.CHUNK)
        except OSError:
            data = b""
        if not data:
            self.stdin_eof = True
            self.sel.unregister(self.stdin_fd)
            if not self.pending:
                self._close_stdin()
            return
        self.pending += data
        self._write_guest_stdin()
        if len(self.pending) >= self.MAX_PENDING and self.stdin_fd in self.sel.get_map():
            self.sel.unregister(self.stdin_fd)

    def _write_guest_stdin(self) -> None:
        import selectors

        sock = self.socks.get("stdin")
        if sock is None or self.stdin_closed:
            self.pending = b""
            return
        try:
            sent = sock.send(self.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the guest is gone
            self.pending = b""
            self._close_stdin()
            return
        self.pending = self.pending[sent:]
        registered = sock in {k.fileobj for k in self.sel.get_map().values()}
        if self.pending and not registered:
            self.sel.register(sock, selectors.EVENT_WRITE, "guest-stdin")
        elif not self.pending and registered:
            self.sel.unregister(sock)
        if not self.pending:
            if self.stdin_eof:
                self._close_stdin()
            elif self.stdin_fd is not None and self.stdin_fd not in self.sel.get_map():
                self.sel.register(self.stdin_fd, selectors.EVENT_READ, "host-stdin")

    def _close_stdin(self) -> None:
        """EOF for the guest command, after everything sent before it.

        shutdown(), not close(): QEMU reads the socket only as fast as the guest takes the
        data and sees the end of the stream after it; a closed socket is a hang-up that QEMU
        acts on at once, dropping what it has not read yet.
        """
        sock = self.socks.get("stdin")
        if sock is None or self.stdin_closed:
            return
        self.stdin_closed = True
        if sock in {k.fileobj for k in self.sel.get_map().values()}:
            self.sel.unregister(sock)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def qemu_stderr(self) -> str:
        return self.err.decode(errors="replace")

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
        self.sel.close()
        for s in self.socks.values():
            s.close()
        if self.err and verbose():
            sys.stderr.write(self.qemu_stderr())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [])
            continue
        view = view[n:]


# ── development entry point (the console script lives in pipeline/cli.py) ──────────────
