"""Image stages with the real tools: boot files, ext4 fidelity, disks, UKI, reproducibility, rootless.

Read back with debugfs, sfdisk --json, mtools and objdump; the big fixture is built once per
module (twice, in separate directories, for the reproducibility checks).
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import disk, ext4, ids, rootfs

pytestmark = pytest.mark.integration

EPOCH = 1700000000
KEY = "hello:test"
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # v2, permitted cap_net_raw


def sh(*cmd: str | os.PathLike, **kw) -> str:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "DEBUGFS_PAGER": "__none__"}
    return subprocess.run([os.fspath(c) for c in cmd], check=True, capture_output=True, env=env, **kw).stdout.decode(
        errors="surrogateescape"
    )


# --------------------------------------------------------------------------------------------
# Expected entries from the archive (read with tarfile itself, not the pipeline's reader)
# --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    kind: str  # reg dir sym chr blk fifo
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    hardlink_of: str | None = None
    xattrs: dict[str, bytes] | None = None


KINDS = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "sym", tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk",
         tarfile.FIFOTYPE: "fifo"}  # fmt: skip


def archive_entries(tgz: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    with tarfile.open(tgz, "r|*") as tf:
        for m in tf:
            path = "/" + "/".join(p for p in m.name.split("/") if p not in ("", "."))
            if m.islnk():
                target = "/" + m.linkname.strip("./").lstrip("/")
                out[path] = Entry(**{**out[target].__dict__, "hardlink_of": target})
                continue
            out[path] = Entry(
                kind=KINDS.get(m.type, "reg"), mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, mtime=int(m.mtime),
                size=m.size if m.isreg() else 0, link=m.linkname if m.issym() else "",
                dev=(m.devmajor, m.devminor) if m.ischr() or m.isblk() else (0, 0),
                xattrs=ext4.member_xattrs(m),
            )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# What the ext4 image holds, through one debugfs run
# --------------------------------------------------------------------------------------------

TYPE_NAMES = {"regular": "reg", "directory": "dir", "symlink": "sym", "character special": "chr",
              "block special": "blk", "FIFO": "fifo"}  # fmt: skip


def debugfs_q(path: str) -> str:
    return '"' + path.replace('"', '""') + '"'


def image_stats(image: Path, paths: list[str], tmp: Path) -> dict[str, dict]:
    """debugfs `stat` of every path, parsed."""
    script = tmp / "stat.debugfs"
    script.write_text("".join(f"stat {debugfs_q(p)}\n" for p in paths), errors="surrogateescape")
    text = sh("debugfs", "-f", script, image)
    chunks = re.split(r"^debugfs: stat .*$", text, flags=re.MULTILINE)[1:]
    assert len(chunks) == len(paths)
    out = {}
    for path, chunk in zip(paths, chunks, strict=True):
        m = re.search(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)", chunk)
        assert m, f"{path}: {chunk[:200]}"
        info = {"ino": int(m.group(1)), "kind": TYPE_NAMES[m.group(2)], "mode": int(m.group(3), 8)}
        m = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size: (\d+)", chunk)
        info.update(uid=int(m.group(1)), gid=int(m.group(2)), size=int(m.group(3)))
        info["links"] = int(re.search(r"Links: (\d+)", chunk).group(1))
        info["mtime"] = int(re.search(r"mtime: 0x([0-9a-f]+)", chunk).group(1), 16)
        info["ctime"] = int(re.search(r"ctime: 0x([0-9a-f]+)", chunk).group(1), 16)
        if m := re.search(r'Fast link dest: "(.*)"', chunk):
            info["link"] = m.group(1)
        if m := re.search(r"Device major/minor number: (\d+):(\d+)", chunk):
            info["dev"] = (int(m.group(1)), int(m.group(2)))
        out[path] = info
    return out


def assert_faithful(image: Path, expected: dict[str, Entry], tmp: Path) -> dict[str, dict]:
    paths = [p for p in expected if p != "/"]
    got = image_stats(image, paths, tmp)
    slow_links = []
    for path in paths:
        want, have = expected[path], got[path]
        assert have["kind"] == want.kind, path
        assert have["mode"] == want.mode, (path, oct(have["mode"]), oct(want.mode))
        assert (have["uid"], have["gid"]) == (want.uid, want.gid), path
        assert have["mtime"] == want.mtime, path
        assert have["ctime"] == EPOCH, path
        if want.kind == "reg":
            assert have["size"] == want.size, path
        if want.kind == "sym":
            if "link" in have:
                assert have["link"] == want.link, path
            else:
                slow_links.append(path)
        if want.kind in ("chr", "blk"):
            assert have["dev"] == want.dev, path
        if want.hardlink_of:
            assert have["ino"] == got[want.hardlink_of]["ino"], path
    names_per_ino: dict[int, int] = {}
    for path in paths:
        if expected[path].kind != "dir":
            names_per_ino[got[path]["ino"]] = names_per_ino.get(got[path]["ino"], 0) + 1
    for path in paths:
        if expected[path].kind != "dir":
            assert got[path]["links"] == names_per_ino[got[path]["ino"]], path
    for path in slow_links:  # targets of 60+ bytes live in a block: read them back
        assert sh("debugfs", "-R", f"cat {debugfs_q(path)}", image) == expected[path].link, path
    return got


def e2fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# A small archive with every kind of entry
# --------------------------------------------------------------------------------------------


def crafted_tgz(path: Path) -> None:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name, type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, data=None, link="", dev=(0, 0), pax=None):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = type, mode, uid, gid
        info.mtime = 1600000000 + len(entries) * 1000
        info.linkname = link
        info.devmajor, info.devminor = dev
        info.size = len(data) if data is not None else 0
        if pax:
            info.pax_headers = pax
        entries.append((info, data))

    add("./", tarfile.DIRTYPE, 0o755)
    add("bin/", tarfile.DIRTYPE, 0o755)
    add("bin/su", mode=0o4755, data=b"setuid binary\n")
    add("bin/sg", mode=0o2755, gid=42, data=b"setgid binary\n")
    add("bin/su-again", tarfile.LNKTYPE, link="bin/su")
    add("bin/ping", mode=0o755, data=b"ping\n",
        pax={"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape"),
             "SCHILY.xattr.user.comment": "hello"})  # fmt: skip
    add("tmp/", tarfile.DIRTYPE, 0o1777)
    add("var/", tarfile.DIRTYPE, 0o755)
    add("var/mail/", tarfile.DIRTYPE, 0o2775, gid=8)
    add("dev/", tarfile.DIRTYPE, 0o755)
    add("dev/null", tarfile.CHRTYPE, 0o666, dev=(1, 3))
    add("dev/sda", tarfile.BLKTYPE, 0o660, gid=6, dev=(8, 0))
    add("dev/big", tarfile.CHRTYPE, 0o600, dev=(300, 70000))
    add("run/initctl", tarfile.FIFOTYPE, 0o600)  # parent run/ only implied
    add("etc/", tarfile.DIRTYPE, 0o755)
    add("etc/su-link", tarfile.SYMTYPE, 0o777, link="../bin/su")
    add("etc/long-link", tarfile.SYMTYPE, 0o777, link="/usr/share/" + "x" * 120)
    add('etc/name with space "quoted"', data=b"odd name\n")
    add("etc/-dash", data=b"dash\n")
    add("etc/<7>", data=b"angle\n")
    add("etc/shadow", mode=0o000, gid=42, data=b"root:*:1::::::\n")
    add("etc/empty", data=b"")
    add("etc/caf\udce9-latin1", data=b"not utf-8 name\n")
    add("home/", tarfile.DIRTYPE, 0o755)
    add("home/user/", tarfile.DIRTYPE, 0o700, uid=1000, gid=1000)
    add("home/user/notes", mode=0o600, uid=1000, gid=1000, data=b"notes\n")
    add("srv/high-ids", mode=0o640, uid=100000, gid=200000, data=b"ids above 65535\n")
    add("usr/lib/zeros", data=b"\0" * (1 << 20) + b"end")
    add("usr/lib/random", data=os.urandom(300_000))
    add("usr/share/many/", tarfile.DIRTYPE, 0o755)
    for i in range(400):
        add(f"usr/share/many/file-{i:03d}-" + "n" * 40, data=f"{i}\n".encode())
    add("etc/replaced", data=b"first\n")
    add("etc/replaced", data=b"second\n")  # a later entry wins, as with tar -x

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crafted") / "crafted.tgz"
    crafted_tgz(path)
    return path


def test_crafted_archive_carries_pax_xattrs(crafted):
    with tarfile.open(crafted) as tf:
        ping = tf.getmember("bin/ping")
    assert ext4.member_xattrs(ping)["security.capability"] == CAP_NET_RAW


def test_ext4_fidelity_on_crafted_archive(crafted, tmp_path):
    image = tmp_path / "root.ext4"
    info = ext4.build_ext4(crafted, image, ext4.Ext4Params.for_key(KEY, epoch=EPOCH))
    assert ext4.read_ext4_identity(image) == (ids.derive_uuid(KEY, "root-fs"), "root")
    assert info.uuid == ids.derive_uuid(KEY, "root-fs")
    e2fsck_clean(image)
    expected = archive_entries(crafted)
    got = assert_faithful(image, expected, tmp_path)

    assert got["/bin/su"]["mode"] == 0o4755 and got["/bin/sg"]["mode"] == 0o2755
    assert got["/tmp"]["mode"] == 0o1777 and got["/var/mail"]["mode"] == 0o2775
    assert got["/bin/su-again"]["ino"] == got["/bin/su"]["ino"] and got["/bin/su"]["links"] == 2
    assert got["/dev/big"]["dev"] == (300, 70000) and got["/dev/sda"]["kind"] == "blk"
    assert got["/run/initctl"]["kind"] == "fifo"
    assert (got["/srv/high-ids"]["uid"], got["/srv/high-ids"]["gid"]) == (100000, 200000)
    assert got["/etc/shadow"]["mode"] == 0
    root = image_stats(image, ["/"], tmp_path)["/"]
    assert (root["mode"], root["mtime"]) == (0o755, expected["/"].mtime)

    cap = tmp_path / "cap"
    sh("debugfs", "-R", f"ea_get -f {cap} /bin/ping security.capability", image)
    assert cap.read_bytes() == CAP_NET_RAW
    assert "hello" in sh("debugfs", "-R", "ea_get /bin/ping user.comment", image)

    dump = tmp_path / "dump"
    with tarfile.open(crafted) as tf:
        for m in tf.getmembers():
            if m.isreg() and m.name != "etc/replaced":
                sh("debugfs", "-R", f"dump {debugfs_q('/' + m.name)} {dump}", image)
                assert dump.read_bytes() == tf.extractfile(m).read(), m.name
    assert sh("debugfs", "-R", "cat /etc/replaced", image) == "second\n"
    # 1 MiB of zeros stays a hole in the image
    assert "Blockcount: 8\n" in sh("debugfs", "-R", "stat /usr/lib/zeros", image)


def _python_for(uid: int) -> str | None:
    """An interpreter the unprivileged user can run (pyenv under /root is not readable)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", candidate, "-c",
             "import sys; assert sys.version_info >= (3, 11)"],
            capture_output=True,
        )  # fmt: skip
        if probe.returncode == 0:
            return candidate
    return None


def test_build_as_unprivileged_user_is_identical(crafted, tmp_path):
    """As an ordinary user (nobody), the ext4 and both disks come out byte-identical."""
    if os.geteuid() != 0:
        uid = os.geteuid()
        python = sys.executable
    else:
        uid = 65534
        python = _python_for(uid)
        if python is None or not shutil.which("setpriv"):
            pytest.skip("no python interpreter runnable as nobody (or no setpriv)")
    repo = Path(__file__).resolve().parent.parent
    shared = Path(tempfile.mkdtemp(prefix="ldt-nonroot-"))
    try:
        shared.chmod(0o777)
        src = shared / "crafted.tgz"
        shutil.copyfile(crafted, src)
        src.chmod(0o644)
        kernel, initrd, osrel = shared / "vmlinuz", shared / "initrd.img", shared / "os-release"
        kernel.write_bytes(b"K" * 100_000)
        initrd.write_bytes(b"I" * 50_000)
        osrel.write_text("ID=debian\n")
        code = f"""
import os
from pathlib import Path
from pipeline import disk, ext4
d = Path({os.fspath(shared)!r})
out = Path(d / ("user" if os.geteuid() else "root"))
out.mkdir()
ext4.build_ext4(d / "crafted.tgz", out / "root.ext4", ext4.Ext4Params.for_key({KEY!r}, epoch={EPOCH}))
disk.build_bios_disk(d / "vmlinuz", d / "initrd.img", out / "root.ext4", out / "bios.img", key={KEY!r}, epoch={EPOCH})
disk.build_uefi_disk(d / "vmlinuz", d / "initrd.img", d / "os-release", out / "root.ext4", out / "uefi.img",
                     key={KEY!r}, epoch={EPOCH})
"""
        env = {**os.environ, "PYTHONPATH": os.fspath(repo)}
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, python, "-c", code], check=True, env=env, cwd=shared)
        if os.geteuid() == 0:
            subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=shared)
            for name in ("root.ext4", "bios.img", "uefi.img"):
                assert (shared / "user" / name).stat().st_uid == uid
                assert filecmp.cmp(shared / "user" / name, shared / "root" / name, shallow=False), name
        got = image_stats(shared / "user" / "root.ext4", ["/bin/su", "/dev/null", "/home/user/notes"], tmp_path)
        assert (got["/bin/su"]["mode"], got["/bin/su"]["uid"]) == (0o4755, 0)
        assert got["/dev/null"]["dev"] == (1, 3)
        assert got["/home/user/notes"]["uid"] == 1000
        cap = tmp_path / "cap"
        sh("debugfs", "-R", f"ea_get -f {cap} /bin/ping security.capability", shared / "user" / "root.ext4")
        assert cap.read_bytes() == CAP_NET_RAW
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The real rootfs (hello): each image built once per module, twice for reproducibility
# --------------------------------------------------------------------------------------------


@dataclass
class Built:
    boot: rootfs.BootFiles
    root: Path
    bios: Path
    uefi: Path


def build_all(tgz: Path, work: Path) -> Built:
    boot = rootfs.extract_boot(tgz, work / "boot", recipe="hello")
    root = work / "root.ext4"
    ext4.build_ext4(tgz, root, ext4.Ext4Params.for_key(KEY, epoch=EPOCH))
    bios = work / "bios.img"
    disk.build_bios_disk(boot.kernel, boot.initrd, root, bios, key=KEY, epoch=EPOCH)
    uefi = work / "uefi.img"
    disk.build_uefi_disk(boot.kernel, boot.initrd, boot.os_release, root, uefi, key=KEY, epoch=EPOCH)
    return Built(boot, root, bios, uefi)


@pytest.fixture(scope="module")
def built(hello_tgz, tmp_path_factory) -> Built:
    return build_all(hello_tgz, tmp_path_factory.mktemp("build-a"))


@pytest.fixture(scope="module")
def built_again(hello_tgz, tmp_path_factory) -> Built:
    return build_all(hello_tgz, tmp_path_factory.mktemp("build-b"))


@pytest.fixture(scope="module")
def hello_entries(hello_tgz) -> dict[str, Entry]:
    return archive_entries(hello_tgz)


def sha256_members(tgz: Path, names: set[str]) -> dict[str, str]:
    out = {}
    with tarfile.open(tgz, "r|*") as tf:
        for m in tf:
            if m.name in names and m.isreg():
                out[m.name] = hashlib.sha256(tf.extractfile(m).read()).hexdigest()
    return out


def test_extract_boot_from_real_rootfs(built, hello_tgz):
    boot = built.boot
    assert boot.version == "6.1.0-50-amd64"
    want = sha256_members(hello_tgz, {f"boot/vmlinuz-{boot.version}", f"boot/initrd.img-{boot.version}"})
    assert hashlib.sha256(boot.kernel.read_bytes()).hexdigest() == want[f"boot/vmlinuz-{boot.version}"]
    assert hashlib.sha256(boot.initrd.read_bytes()).hexdigest() == want[f"boot/initrd.img-{boot.version}"]
    assert boot.os_release_fields["ID"] == "debian"


def test_root_ext4_faithful_to_real_rootfs(built, hello_entries, hello_tgz, tmp_path):
    e2fsck_clean(built.root)
    got = assert_faithful(built.root, hello_entries, tmp_path)
    assert got["/usr/bin/passwd"]["mode"] == 0o4755
    assert got["/dev/null"]["dev"] == (1, 3)
    sample = sorted(p for p, e in hello_entries.items() if e.kind == "reg" and e.size)[::300]
    want = sha256_members(hello_tgz, {p[1:] for p in sample})
    out = tmp_path / "f"
    for path in sample:
        sh("debugfs", "-R", f"dump {debugfs_q(path)} {out}", built.root)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == want[path[1:]], path


def test_root_ext4_sized_to_content_and_sparse(built, hello_entries):
    content = sum(e.size for e in hello_entries.values() if e.kind == "reg" and not e.hardlink_of)
    size = built.root.stat().st_size
    assert content < size < content * 1.5 + 512 * disk.MiB
    assert built.root.stat().st_blocks * 512 < content * 1.2
    out = sh("debugfs", "-R", "stats", built.root)
    assert f"Filesystem UUID:          {ids.derive_uuid(KEY, 'root-fs')}" in out
    assert f"Directory Hash Seed:      {ids.derive_uuid(KEY, 'root-fs-hash-seed')}" in out
    assert "Filesystem volume name:   root" in out


def sfdisk_json(image: Path) -> dict:
    return json.loads(sh("sfdisk", "--json", image))["partitiontable"]


def test_bios_disk_partitions(built):
    table = sfdisk_json(built.bios)
    assert table["label"] == "dos"
    assert table["id"] == f"{ids.derive_u32(KEY, 'mbr-disk-id'):#010x}"
    boot, root = table["partitions"]
    assert boot["start"] == 2048 and boot["type"] == "c" and boot.get("bootable")
    assert root["type"] == "83" and not root.get("bootable")
    assert root["size"] * 512 == built.root.stat().st_size
    assert root["start"] * 512 % disk.MiB == 0
    with open(built.bios, "rb") as f:
        head = f.read(512)
    assert head[:440] == disk.SYSLINUX_MBR.read_bytes()[:440]
    assert head[510:512] == b"\x55\xaa"
    assert built.bios.stat().st_blocks * 512 < built.bios.stat().st_size * 0.9


def _same_bytes(image: Path, part_start_sectors: int, root: Path) -> None:
    size = root.stat().st_size
    subprocess.run(["cmp", "-n", str(size), f"--ignore-initial=0:{part_start_sectors * 512}", root, image],
                   check=True)  # fmt: skip


def test_bios_disk_fat_contents_and_root_copy(built, tmp_path):
    table = sfdisk_json(built.bios)
    fat = f"{built.bios}@@{table['partitions'][0]['start'] * 512}"
    listing = sh("mdir", "-a", "-b", "-i", fat, "::/")
    for name in ("vmlinuz", "initrd.img", "syslinux.cfg", "ldlinux.sys", "ldlinux.c32"):
        assert f"::/{name}" in listing.lower(), listing
    cfg = sh("mtype", "-i", fat, "::/syslinux.cfg")
    root_uuid, _ = ext4.read_ext4_identity(built.root)
    assert "SERIAL 0 115200" in cfg
    assert f"root=UUID={root_uuid}" in cfg and "console=tty0 console=ttyS0,115200" in cfg
    sh("mcopy", "-n", "-i", fat, "::/vmlinuz", tmp_path / "k")
    assert filecmp.cmp(tmp_path / "k", built.boot.kernel, shallow=False)
    assert "BOOT" in sh("minfo", "-i", fat, "::")
    _same_bytes(built.bios, table["partitions"][1]["start"], built.root)


def test_uefi_disk_partitions_and_esp(built, tmp_path):
    table = sfdisk_json(built.uefi)
    assert table["label"] == "gpt"
    assert table["id"] == str(ids.derive_uuid(KEY, "gpt-disk")).upper()
    esp, root = table["partitions"]
    assert esp["type"] == disk.ESP_TYPE and esp["uuid"] == str(ids.derive_uuid(KEY, "gpt-esp")).upper()
    assert root["type"] == disk.ROOT_X86_64_TYPE and root["name"] == "root"
    assert root["uuid"] == str(ids.derive_uuid(KEY, "gpt-root")).upper()
    fat = f"{built.uefi}@@{esp['start'] * 512}"
    assert 'disk type="FAT32' in sh("minfo", "-i", fat, "::")
    assert "::/EFI/BOOT/BOOTX64.EFI" in sh("mdir", "-b", "-i", fat, "::/EFI/BOOT").upper()
    _same_bytes(built.uefi, root["start"], built.root)
    assert built.uefi.stat().st_blocks * 512 < built.uefi.stat().st_size * 0.9


def test_uki_sections(built, tmp_path):
    table = sfdisk_json(built.uefi)
    fat = f"{built.uefi}@@{table['partitions'][0]['start'] * 512}"
    uki = tmp_path / "BOOTX64.EFI"
    sh("mcopy", "-n", "-i", fat, "::/EFI/BOOT/BOOTX64.EFI", uki)
    sections = disk.pe_sections(sh("objdump", "-h", uki))
    for name in (".osrel", ".cmdline", ".linux", ".initrd"):
        assert name in sections
    spans = sorted((vma, vma + size) for size, vma in sections.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))

    def section(name: str) -> bytes:
        out = tmp_path / name.strip(".")
        sh("objcopy", "-O", "binary", f"--only-section={name}", uki, out)
        return out.read_bytes()

    root_uuid, _ = ext4.read_ext4_identity(built.root)
    assert section(".cmdline").decode().strip() == disk.kernel_cmdline(root_uuid)
    assert section(".osrel") == built.boot.os_release.read_bytes()
    assert section(".linux") == built.boot.kernel.read_bytes()
    assert section(".initrd") == built.boot.initrd.read_bytes()


def test_builds_are_reproducible(built, built_again):
    for a, b in ((built.root, built_again.root), (built.bios, built_again.bios), (built.uefi, built_again.uefi)):
        assert a != b
        subprocess.run(["cmp", a, b], check=True)


def test_to_qcow2(built, tmp_path):
    out = disk.to_qcow2(built.bios, tmp_path / "bios.qcow2")
    info = json.loads(sh("qemu-img", "info", "--output=json", out))
    assert info["format"] == "qcow2" and info["virtual-size"] == built.bios.stat().st_size
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", built.bios, out], check=True,
                   capture_output=True)  # fmt: skip
    assert out.stat().st_size < built.bios.stat().st_size * 0.9

