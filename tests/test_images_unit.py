"""Pure parts of the image stages: ids, version order, command lines, scripts, layouts."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import pytest

from pipeline import disk, ext4, ids, kernel, rootfs, tarstream
from pipeline.errors import UserError

# ---------------------------------------------------------------------------------------- ids


def test_derive_uuid_is_stable_and_purpose_specific():
    a = ids.derive_uuid("hello:abc", "root-fs")
    assert a == ids.derive_uuid("hello:abc", "root-fs")
    assert a != ids.derive_uuid("hello:abc", "gpt-disk")
    assert a != ids.derive_uuid("hello:abd", "root-fs")
    assert a.version == 5 and a.variant == uuid.RFC_4122


def test_derive_u32_is_stable_nonzero_32bit():
    v = ids.derive_u32("k", "mbr-disk-id")
    assert v == ids.derive_u32("k", "mbr-disk-id")
    assert 0 < v < 2**32
    assert v != ids.derive_u32("k", "esp-fat")


def test_source_date_env():
    assert ids.source_date_env(42) == {"SOURCE_DATE_EPOCH": "42", "E2FSPROGS_FAKE_TIME": "42"}


# ------------------------------------------------------------------------------ versions, boot


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        ("6.1.0-50-amd64", "6.1.0-9-amd64", 1),
        ("6.1.0-9-amd64", "6.1.0-10-amd64", -1),
        ("6.1.0-9-amd64", "6.1.0-9-amd64", 0),
        ("6.1~rc1", "6.1", -1),
        ("5.10.0-28-amd64", "6.1.0-9-amd64", -1),
        ("6.1.0-9-cloud-amd64", "6.1.0-9-amd64", 1),
        ("1.0a", "1.0+", -1),  # letters sort before non-letters
        ("1.01", "1.1", 0),
    ],
)
def test_compare_versions_like_dpkg(a, b, sign):
    result = kernel.compare_versions(a, b)
    assert (result > 0) - (result < 0) == sign


def test_choose_version():
    vs = ["6.1.0-9-amd64", "6.1.0-50-amd64", "5.10.0-1-amd64"]
    assert kernel.choose_version(vs, None) == "6.1.0-50-amd64"
    assert kernel.choose_version(vs, "6.1.0-9-amd64") == "6.1.0-9-amd64"
    assert kernel.choose_version(vs, "7.0") is None
    assert kernel.choose_version([], None) is None


@pytest.mark.parametrize(
    ("path", "kernel_v", "initrd_v"),
    [
        ("boot/vmlinuz-6.1.0-50-amd64", "6.1.0-50-amd64", None),
        ("boot/initrd.img-6.1.0-50-amd64", None, "6.1.0-50-amd64"),
        ("boot/initramfs-6.8.5-301.fc40.x86_64.img", None, "6.8.5-301.fc40.x86_64"),
        ("usr/lib/modules/6.8.5-301.fc40.x86_64/vmlinuz", "6.8.5-301.fc40.x86_64", None),
        ("boot/config-6.1.0-50-amd64", None, None),
        ("vmlinuz", None, None),
    ],
)
def test_boot_file_patterns(path, kernel_v, initrd_v):
    assert kernel.kernel_name_version(path) == kernel_v
    assert kernel.initrd_name_version(path) == initrd_v


def test_resolve_link_follows_relative_absolute_and_directory_links():
    links = {"vmlinuz": "boot/vmlinuz-1", "etc/os-release": "../usr/lib/os-release", "b": "/boot"}
    assert tarstream.resolve_link("vmlinuz", links) == "boot/vmlinuz-1"
    assert tarstream.resolve_link("etc/os-release", links) == "usr/lib/os-release"
    assert tarstream.resolve_link("b/vmlinuz-2", links) == "boot/vmlinuz-2"
    with pytest.raises(UserError, match="loop"):
        tarstream.resolve_link("x", {"x": "y", "y": "x"})


def test_kernel_install_hint_by_distribution():
    assert "linux-image-amd64" in rootfs.kernel_install_hint({"ID": "debian"})
    assert "linux-image-virtual" in rootfs.kernel_install_hint({"ID": "ubuntu", "ID_LIKE": "debian"})
    assert "dnf install -y kernel" in rootfs.kernel_install_hint({"ID": "fedora"})
    assert "linux-image-amd64" in rootfs.kernel_install_hint({})


def test_parse_os_release():
    text = 'NAME="Debian GNU/Linux"\n# comment\nID=debian\nVERSION_ID="12"\n'
    assert rootfs.parse_os_release(text) == {"NAME": "Debian GNU/Linux", "ID": "debian", "VERSION_ID": "12"}


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]], gzip: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _sym(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


@pytest.mark.parametrize("gzip", [True, False])
def test_extract_boot_small_archive(tmp_path: Path, gzip: bool):
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes([
        _reg("usr/lib/os-release", b"ID=debian\n"),
        _sym("etc/os-release", "../usr/lib/os-release"),
        _reg("boot/vmlinuz-6.1.0-9-amd64", b"old kernel"),
        _reg("boot/initrd.img-6.1.0-9-amd64", b"old initrd"),
        _reg("boot/vmlinuz-6.1.0-10-amd64", b"new kernel" * 100000),
        _reg("boot/initrd.img-6.1.0-10-amd64", b"new initrd"),
        _sym("vmlinuz", "boot/vmlinuz-6.1.0-9-amd64"),
    ], gzip=gzip))  # fmt: skip
    out = tmp_path / "out"
    boot = rootfs.extract_boot(tgz, out, recipe="hello")
    assert boot.version == "6.1.0-10-amd64"
    assert (out / "vmlinuz").read_bytes() == b"new kernel" * 100000
    assert (out / "initrd.img").read_bytes() == b"new initrd"
    assert boot.os_release_fields["ID"] == "debian"
    pinned = rootfs.extract_boot(tgz, out, recipe="hello", version="6.1.0-9-amd64")
    assert pinned.version == "6.1.0-9-amd64"
    assert (out / "vmlinuz").read_bytes() == b"old kernel"
    assert sorted(p.name for p in out.iterdir()) == ["initrd.img", "os-release", "vmlinuz"]


def test_extract_boot_kernel_through_symlink(tmp_path: Path):
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes([
        _reg("usr/lib/modules/6.8.5/vmlinuz", b"K"),
        _sym("boot/vmlinuz-6.8.5", "../usr/lib/modules/6.8.5/vmlinuz"),
        _reg("boot/initramfs-6.8.5.img", b"I"),
    ]))  # fmt: skip
    boot = rootfs.extract_boot(tgz, tmp_path / "o", recipe="f")
    assert (boot.version, boot.kernel.read_bytes(), boot.initrd.read_bytes()) == ("6.8.5", b"K", b"I")


def test_extract_boot_without_kernel_names_recipe_and_fix(tmp_path: Path):
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes([_reg("etc/os-release", b"ID=debian\n"), _reg("bin/sh", b"x")]))
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        rootfs.extract_boot(tgz, out, recipe="hello")
    assert "hello" in e.value.message and "no kernel" in e.value.message
    assert "apt-get install -y linux-image-amd64" in e.value.hint
    assert list(out.iterdir()) == []


def test_extract_boot_initrd_required_unless_disabled(tmp_path: Path):
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes([_reg("boot/vmlinuz-6.1", b"K")]))
    with pytest.raises(UserError, match="no initrd"):
        rootfs.extract_boot(tgz, tmp_path / "o", recipe="hello")
    boot = rootfs.extract_boot(tgz, tmp_path / "o", recipe="hello", require_initrd=False)
    assert boot.initrd is None and not (tmp_path / "o" / "initrd.img").exists()
    assert "ID=linux" in boot.os_release.read_text()


def test_extract_boot_unknown_pinned_version(tmp_path: Path):
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes([_reg("boot/vmlinuz-6.1", b"K"), _reg("boot/initrd.img-6.1", b"I")]))
    with pytest.raises(UserError, match="no kernel 9.9 .*6.1"):
        rootfs.extract_boot(tgz, tmp_path / "o", recipe="hello", version="9.9")


def test_tar_stream_reads_many_members_in_order(tmp_path: Path):
    entries = [_reg(f"d/f{i}", bytes([i % 256]) * (i * 37)) for i in range(300)]
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes(entries))
    seen = []
    with tarstream.open_tar(tgz) as stream:
        for m in stream:
            seen.append((m.name, stream.read(m)))
    assert seen == [(i.name, d) for i, d in entries]


# ------------------------------------------------------------------------------ ext4 (pure)


def _params(**kw) -> ext4.Ext4Params:
    return ext4.Ext4Params.for_key("hello:1", epoch=1700000000, **kw)


def test_ext4_params_for_key_derives_ids():
    p = _params()
    assert p.uuid == ids.derive_uuid("hello:1", "root-fs")
    assert p.hash_seed == ids.derive_uuid("hello:1", "root-fs-hash-seed")
    assert p.uuid != p.hash_seed and p.label == "root"


def test_mkfs_ext4_cmd():
    p = _params()
    cmd = ext4.mkfs_ext4_cmd(Path("/x/root.ext4"), p, 1000, 4096)
    assert cmd[0] == "mkfs.ext4" and cmd[-2:] == ["/x/root.ext4", "1000"]
    assert cmd[cmd.index("-U") + 1] == str(p.uuid)
    assert cmd[cmd.index("-L") + 1] == "root"
    assert cmd[cmd.index("-N") + 1] == "4096"
    ext = cmd[cmd.index("-E") + 1].split(",")
    assert f"hash_seed={p.hash_seed}" in ext and "root_owner=0:0" in ext and "lazy_itable_init=0" in ext


def test_ext4_geometry_sized_from_content():
    stats = ext4.ContentStats()
    for _ in range(1000):
        stats.add_file(100_000)
    stats.add_dirent("", "etc")
    blocks, inodes = ext4.ext4_geometry(stats, _params())
    size = blocks * 4096
    content = 1000 * 25 * 4096
    assert content + 256 * ext4.MiB < size < content * 1.5 + 400 * ext4.MiB
    assert size % ext4.MiB == 0
    assert inodes >= 1000 * 1.2
    fixed, _ = ext4.ext4_geometry(stats, _params(size_bytes=2 << 30))
    assert fixed * 4096 == 2 << 30
    small, _ = ext4.ext4_geometry(stats, _params(headroom_ratio=0.0, headroom_bytes=0))
    assert small < blocks


def test_debugfs_script_for_each_entry_type():
    s = ext4.DebugfsScript()
    d = tarfile.TarInfo("./usr/bin")
    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 100
    f = tarfile.TarInfo("./usr/bin/su")
    f.mode, f.uid, f.gid, f.mtime, f.size = 0o4755, 0, 42, 200, 5
    ln = tarfile.TarInfo("usr/bin/su2")
    ln.type, ln.linkname = tarfile.LNKTYPE, "usr/bin/su"
    sym = tarfile.TarInfo('usr/bin/a "q"')
    sym.type, sym.linkname, sym.mode = tarfile.SYMTYPE, "su", 0o777
    dev = tarfile.TarInfo("dev/null")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.CHRTYPE, 1, 3, 0o666
    for m in (d, f, ln, sym, dev):
        s.add(m, tarstream.member_path(m), "/stage/f1" if m.isreg() else None,
              {"security.capability": "/stage/x1"} if m is f else None)
    script = s.finish().splitlines()
    assert script[:3] == ['cd "/"', 'mkdir "usr"', 'cd "/usr"']  # parent created on demand
    assert 'write "/stage/f1" "su"' in script
    assert 'sif "su" mode 0104755' in script and 'sif "su" gid 42' in script
    assert 'sif "su" uid 0' not in script
    assert 'sif "su" mtime @200' in script
    assert 'ea_set -f "/stage/x1" "su" "security.capability"' in script
    assert 'ln "/usr/bin/su" "su2"' in script
    assert 'symlink "a ""q""" "su"' in script
    assert 'mknod "null" c 1 3' in script and 'sif "null" mode 020666' in script
    assert script[-1] == 'sif "/usr/bin/su" links_count 2'
    assert s.stats.inodes == 6  # usr and dev (implicit), bin, su, the symlink, null; not the hard link


def test_debugfs_script_rejects_unsafe_names():
    s = ext4.DebugfsScript()
    bad = tarfile.TarInfo("etc/a\nb")
    with pytest.raises(UserError, match="line break"):
        s.add(bad, tarstream.member_path(bad), "/s/f1")
    with pytest.raises(UserError, match="unsafe"):
        tarstream.member_path(tarfile.TarInfo("../etc/passwd"))


def test_debugfs_refs_that_namei_would_misread():
    assert ext4._ref("<12>") == '"./<12>"'
    assert ext4._ref("-f") == '"./-f"'
    assert ext4._ref("ok") == '"ok"'


def test_member_xattrs_from_pax():
    info = tarfile.TarInfo("usr/bin/ping")
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    info.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "LIBARCHIVE.xattr.user.x%3Dy": "aGk",
        "mtime": "1.5",
    }
    assert ext4.member_xattrs(info) == {"security.capability": cap, "user.x=y": b"hi"}


def test_debugfs_errors_ignore_banner():
    assert ext4.debugfs_errors("debugfs 1.47.0 (5-Feb-2023)\n") == []
    assert ext4.debugfs_errors("debugfs 1.47.0 (5-Feb-2023)\nwrite: No free space\n") == [
        "write: No free space"
    ]


def test_journal_blocks_matches_e2fsprogs_table():
    assert ext4.journal_blocks(20000) == 1024
    assert ext4.journal_blocks(300_000) == 8192
    assert ext4.journal_blocks(100_000_000) == 262144


def test_read_ext4_identity_rejects_non_ext4(tmp_path: Path):
    p = tmp_path / "x.img"
    p.write_bytes(b"\0" * 4096)
    with pytest.raises(UserError, match="not an ext"):
        ext4.read_ext4_identity(p)


# ------------------------------------------------------------------------------ disk (pure)


def test_layout_is_mib_aligned():
    parts, size = disk.layout([5 * disk.MiB + 1, 100 * disk.MiB], tail=disk.MiB)
    assert parts == [(disk.MiB, 6 * disk.MiB), (7 * disk.MiB, 100 * disk.MiB)]
    assert size == 108 * disk.MiB


def test_sfdisk_script_dos():
    boot = disk.Partition(disk.MiB, 64 * disk.MiB, type="c", bootable=True)
    root = disk.Partition(65 * disk.MiB, 100 * disk.MiB, type="83")
    script = disk.sfdisk_script("dos", "0x12345678", [boot, root])
    assert script.splitlines() == [
        "label: dos",
        "label-id: 0x12345678",
        "unit: sectors",
        "sector-size: 512",
        "",
        "start=2048, size=131072, type=c, bootable",
        "start=133120, size=204800, type=83",
    ]


def test_sfdisk_script_gpt_has_types_uuids_names():
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    esp = disk.Partition(disk.MiB, 64 * disk.MiB, type=disk.ESP_TYPE, name="ESP", uuid=u)
    script = disk.sfdisk_script("gpt", "AAAA-1", [esp])
    assert f"type={disk.ESP_TYPE}, uuid=12345678-1234-5678-1234-567812345678, name=\"ESP\"" in script
    assert "label: gpt" in script


def test_kernel_cmdline_and_syslinux_cfg():
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    line = disk.kernel_cmdline(u, ["quiet"])
    assert line == f"root=UUID={u} rw console=tty0 console=ttyS0,115200 quiet"
    cfg = disk.syslinux_cfg(line).splitlines()
    assert cfg[0] == "SERIAL 0 115200"
    assert "  LINUX /vmlinuz" in cfg and "  INITRD /initrd.img" in cfg
    assert f"  APPEND {line}" in cfg
    assert "  INITRD /initrd.img" not in disk.syslinux_cfg(line, initrd=False)


def test_fat_commands():
    part = disk.Partition(disk.MiB, 64 * disk.MiB, type="c")
    cmd = disk.mformat_cmd(Path("d.img"), part, serial=0xABCDEF01, label="BOOT")
    assert cmd[:3] == ["mformat", "-i", "d.img@@1048576"]
    assert cmd[cmd.index("-N") + 1] == "ABCDEF01"
    assert cmd[cmd.index("-T") + 1] == "131072"
    assert cmd[cmd.index("-H") + 1] == "2048"
    assert "-F" in cmd and cmd[cmd.index("-R") + 1] == "32"
    assert disk.mformat_cmd(Path("d.img"), part, serial=1, label="B", reserved=36)[cmd.index("-R") + 1] == "36"
    assert disk.syslinux_install_cmd(Path("d.img"), 1048576) == [
        "syslinux", "--install", "--offset", "1048576", "d.img"
    ]  # fmt: skip
    assert disk.mcopy_cmd(Path("d.img"), 512, Path("k"), "::/vmlinuz") == [
        "mcopy", "-i", "d.img@@512", "k", "::/vmlinuz"
    ]  # fmt: skip
    assert disk.mtools_env(5)["SOURCE_DATE_EPOCH"] == "5"


def test_fat32_clusters_are_whole_blocks_and_enough():
    smallest = disk.fat_min_size(1000)
    assert smallest == 276 * disk.MiB  # 70000 clusters of 4 KiB and the FATs
    for size in (smallest, 300 * disk.MiB, 2048 * disk.MiB):
        spc = disk.fat32_cluster_sectors(size)
        assert spc * 512 % disk.BLOCK == 0  # a file's data starts on a 4 KiB block
        assert size // 512 // spc >= 65525  # still FAT32 by its cluster count
    assert disk.fat_min_size(400 * disk.MiB) % disk.MiB == 0 and disk.fat_min_size(400 * disk.MiB) > 440 * disk.MiB


def test_fat_data_start_from_the_boot_sector():
    bs = bytearray(512)
    bs[14:16] = (36).to_bytes(2, "little")
    bs[16] = 2
    bs[36:40] = (554).to_bytes(4, "little")
    assert disk.fat_data_start(bytes(bs)) == 36 + 2 * 554


def test_pads_go_before_the_named_sections():
    payload = [(".osrel", Path("o")), (".linux", Path("k")), (".initrd", Path("i"))]
    assert disk.with_pads(payload, {}) == payload
    assert disk.with_pads(payload, {".linux": Path("p"), ".initrd": Path("q")}) == [
        (".osrel", Path("o")), (".pad1", Path("p")), (".linux", Path("k")),
        (".pad2", Path("q")), (".initrd", Path("i"))]
    assert disk.pe_file_offsets(OBJDUMP_H) == {".text": 0x400, ".sbat": 0x11000, ".sdmagic": 0x11200}


OBJDUMP_H = """
/usr/lib/systemd/boot/efi/linuxx64.efi.stub:     file format pei-x86-64

Sections:
Idx Name          Size      VMA               LMA               File off  Algn
  0 .text         0000bff0  0000000000004000  0000000000004000  00000400  2**4
                  CONTENTS, ALLOC, LOAD, READONLY, CODE
  6 .sbat         000000e2  0000000000019000  0000000000019000  00011000  2**2
                  CONTENTS, ALLOC, LOAD, READONLY, DATA
  7 .sdmagic      00000034  0000000000019100  0000000000019100  00011200  2**2
                  CONTENTS, ALLOC, LOAD, READONLY, DATA
"""


def test_uki_section_layout_after_stub():
    sections = disk.pe_sections(OBJDUMP_H)
    assert sections[".sdmagic"] == (0x34, 0x19100)
    align = disk.pe_section_alignment("Magic\t\t020b\nSectionAlignment\t00000200\n")
    assert align == 0x200
    vmas = disk.uki_section_vmas(sections, align, [(".osrel", 267), (".cmdline", 80), (".linux", 0x401)])
    assert vmas == [(".osrel", 0x19200), (".cmdline", 0x19400), (".linux", 0x19600)]
    cmd = disk.objcopy_uki_cmd(Path("stub"), Path("out.efi"), [(".osrel", Path("os"), 0x19200)])
    assert cmd == ["objcopy", "--preserve-dates", "--add-section", ".osrel=os",
                   "--change-section-vma", ".osrel=0x19200", "stub", "out.efi"]  # fmt: skip


def test_ukify_and_qemu_img_commands():
    cmd = disk.ukify_cmd(Path("s"), Path("o"), Path("k"), Path("i"), Path("c"), Path("r"))
    assert cmd[:2] == ["ukify", "build"] and "--initrd" in cmd and "@c" in cmd
    assert disk.qemu_img_convert_cmd(Path("a.raw"), Path("a.qcow2"), compress=True) == [
        "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "a.raw", "a.qcow2"
    ]  # fmt: skip


def test_sparse_copy_into_keeps_holes(tmp_path: Path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    with open(src, "wb") as f:
        f.truncate(8 * disk.MiB)
        f.seek(4 * disk.MiB)
        f.write(b"data")
    with open(dest, "wb") as f:
        f.truncate(16 * disk.MiB)
    disk.sparse_copy_into(src, dest, disk.MiB)
    blob = dest.read_bytes()
    assert blob[5 * disk.MiB : 5 * disk.MiB + 4] == b"data"
    assert blob.count(0) == len(blob) - 4
    assert dest.stat().st_blocks * 512 < 2 * disk.MiB


def test_extract_boot_unversioned_kernel_via_symlink_name(tmp_path: Path):
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(_tar_bytes([_reg("boot/vmlinuz", b"K"), _reg("boot/initrd.img", b"I")]))
    boot = rootfs.extract_boot(tgz, tmp_path / "o", recipe="plain")
    assert (boot.version, boot.kernel.read_bytes(), boot.initrd.read_bytes()) == ("unknown", b"K", b"I")


def test_debugfs_script_big_device_numbers_and_lost_found():
    s = ext4.DebugfsScript()
    dev = tarfile.TarInfo("dev/big")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 300, 70000
    lf = tarfile.TarInfo("lost+found")
    lf.type, lf.mode = tarfile.DIRTYPE, 0o700
    s.add(dev, "dev/big")
    s.add(lf, "lost+found")
    script = s.finish().splitlines()
    encoded = (70000 & 0xFF) | (300 << 8) | ((70000 & ~0xFF) << 12)
    assert 'mknod "big" c 0 0' in script and f'sif "big" block[1] {encoded:#x}' in script
    assert 'mkdir "lost+found"' not in script  # mke2fs made it: only its metadata is set
    assert 'sif "lost+found" mode 040700' in script


def test_esp_dirs_are_made_parents_first_once():
    from pipeline.secureboot import esp_enrollment_paths

    dests = list(esp_enrollment_paths().values())
    assert disk.esp_dirs(dests) == ["::/EFI/keys", "::/loader", "::/loader/keys", "::/loader/keys/ldt"]
    assert disk.esp_dirs([disk.UKI_PATH]) == []  # \\EFI\\BOOT: every disk has it
