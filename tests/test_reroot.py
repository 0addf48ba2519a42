"""[build] rootfs: the re-rooting tar filter on archives made here, and the recipe.toml key."""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline import recipes
from pipeline.errors import UserError
from pipeline.reroot import header_bytes, reroot_filter, reroot_tar, rerooted
from pipeline.tarstream import TarStream
from pipeline.tgz import Fixups, write_tgz

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # cap_net_raw+ep
LONG = "mnt/usr/share/doc/" + "a-very-long-folder-name/" * 5 + "with-a-long-file-name.txt"  # > 100 and > 155
BIG = bytes(range(256)) * 40 + b"tail"  # spans several blocks and chunk boundaries


def member(name: str, kind: bytes = tarfile.REGTYPE, *, data: bytes = b"", mode: int = 0o644, uid: int = 0,
           gid: int = 0, link: str = "", pax: dict[str, str] | None = None, major: int = 0, minor: int = 0,
           mtime: float = 1_700_000_000) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.linkname, ti.mtime = kind, mode, uid, gid, link, mtime
    ti.uname, ti.gname = ("root", "root") if uid == 0 else ("user", "users")
    ti.devmajor, ti.devminor = major, minor
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.pax_headers = dict(pax or {})
    return ti, data if kind == tarfile.REGTYPE else None


def container_tar(fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A container's export: engine files at the top, a bootstrapped tree in mnt/."""
    members = [
        member(".dockerenv"),
        member("etc", tarfile.DIRTYPE, mode=0o755),
        member("etc/hostname", data=b"0123456789ab\n"),
        member("etc/resolv.conf", data=b"nameserver 10.0.0.1\n"),
        member("usr/bin/ls", data=b"outside"),
        member("mntx", tarfile.DIRTYPE, mode=0o700),
        member("mntx/file", data=b"not inside /mnt"),
        member("mnt", tarfile.DIRTYPE, mode=0o755, mtime=1_600_000_000),
        member("mnt/etc", tarfile.DIRTYPE, mode=0o755),
        member("mnt/etc/hostname", data=b"0123456789ab\n", mode=0o600),
        member("mnt/etc/resolv.conf", data=b"nameserver 10.255.255.53\n"),
        member("mnt/etc/localtime", tarfile.SYMTYPE, link="/usr/share/zoneinfo/Etc/UTC"),
        member("mnt/bin", tarfile.SYMTYPE, link="usr/bin"),
        member("mnt/usr/bin/perl", data=BIG, mode=0o755),
        member("mnt/usr/bin/perl5.36.0", tarfile.LNKTYPE, link="mnt/usr/bin/perl", mode=0o755),
        member("mnt/usr/bin/ping", data=b"\x7fELF", mode=0o4755,
               pax={"SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
                    "SCHILY.xattr.user.comment": "kept"}),
        member("mnt/home/user", tarfile.DIRTYPE, mode=0o700, uid=1000, gid=100),
        member("mnt/dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
        member("mnt/dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, major=8, minor=0),
        member("mnt/run/initctl", tarfile.FIFOTYPE, mode=0o600),
        member(LONG, data=b"long"),
        member(LONG + ".link", tarfile.LNKTYPE, link=LONG),
        member("mnt/precise", data=b"t", mtime=1_700_000_000.25),
        member("usr/share/after", data=b"outside again"),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def chunked(data: bytes, size: int = 1000):
    return [data[i:i + size] for i in range(0, len(data), size)]


def reroot(data: bytes, root: str = "/mnt", hostname: str = "debian-mnt", size: int = 1000) -> bytes:
    out = io.BytesIO()
    total = reroot_tar(chunked(data, size), out.write, Fixups(hostname), root=root)
    assert total == len(data)
    return out.getvalue()


def members_of(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as t:
        return {ti.name: (ti, t.extractfile(ti).read() if ti.isreg() else None) for ti in t}


@pytest.fixture(params=[tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def tree(request) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    return members_of(reroot(container_tar(request.param)))


def test_only_the_folder_is_kept_and_it_becomes_the_root(tree):
    names = list(tree)
    assert names[0] == "."  # tarfile's name for "./"
    assert all(n == "." or n.startswith("./") for n in names)
    assert not any(n.startswith(("./mnt", "./mntx")) or "dockerenv" in n or n.endswith("ls") for n in names)
    assert "./usr/share/after" not in names
    root, _ = tree["."]
    assert root.isdir() and root.mode == 0o755 and root.mtime == 1_600_000_000


def test_the_root_entry_is_written_as_dot_slash():
    raw = reroot(container_tar())
    first = raw[:512] if raw[156:157] != b"x" else raw[1024:1536]
    assert first[:3] == b"./\0"


def test_contents_and_metadata_are_kept(tree):
    perl, data = tree["./usr/bin/perl"]
    assert data == BIG and perl.mode == 0o755
    home, _ = tree["./home/user"]
    assert (home.uid, home.gid, home.uname, home.gname, home.mode) == (1000, 100, "user", "users", 0o700)
    ping, _ = tree["./usr/bin/ping"]
    assert ping.mode == 0o4755


def test_hard_links_point_at_the_rerooted_target(tree):
    link, _ = tree["./usr/bin/perl5.36.0"]
    assert link.islnk() and link.linkname == "./usr/bin/perl"
    long_link, _ = tree["./" + LONG[4:] + ".link"]
    assert long_link.islnk() and long_link.linkname == "./" + LONG[4:]


def test_symlinks_keep_their_targets(tree):
    assert tree["./etc/localtime"][0].linkname == "/usr/share/zoneinfo/Etc/UTC"
    assert tree["./bin"][0].issym() and tree["./bin"][0].linkname == "usr/bin"


def test_device_nodes_and_fifos_are_kept(tree):
    null, sda, fifo = tree["./dev/null"][0], tree["./dev/sda"][0], tree["./run/initctl"][0]
    assert null.ischr() and (null.devmajor, null.devminor, null.mode) == (1, 3, 0o666)
    assert sda.isblk() and (sda.devmajor, sda.devminor, sda.gid) == (8, 0, 6)
    assert fifo.isfifo()


def test_xattrs_are_kept_byte_for_byte():
    tree = members_of(reroot(container_tar(tarfile.PAX_FORMAT)))  # GNU archives carry no xattrs
    pax = tree["./usr/bin/ping"][0].pax_headers
    assert pax["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == CAP
    assert pax["SCHILY.xattr.user.comment"] == "kept"


def test_long_names_are_rerooted_without_a_stale_pax_path(tree):
    ti, data = tree["./" + LONG[4:]]
    assert data == b"long"
    assert "path" not in ti.pax_headers or ti.pax_headers["path"] == "./" + LONG[4:]


def test_sub_second_times_survive():
    tree = members_of(reroot(container_tar(tarfile.PAX_FORMAT)))
    assert tree["./precise"][0].mtime == 1_700_000_000.25


def test_inside_the_folder_only_the_hostname_is_fixed(tree):
    hostname, data = tree["./etc/hostname"]
    assert data == b"debian-mnt\n" and hostname.mode == 0o600  # the member's own metadata
    assert tree["./etc/resolv.conf"][1] == b"nameserver 10.255.255.53\n"  # the tree's own: kept


@pytest.mark.parametrize("size", [1, 512, 513, 1 << 20])
def test_any_chunking_gives_the_same_archive(size):
    data = container_tar()
    assert reroot(data, size=size) == reroot(data, size=777)


def test_gnu_tar_reads_the_result(tmp_path):
    out = tmp_path / "tree.tar"
    out.write_bytes(reroot(container_tar()))
    listing = subprocess.run(["tar", "--numeric-owner", "-tvf", out], capture_output=True, text=True, check=True)
    lines = listing.stdout.splitlines()
    assert lines[0].split()[-1] == "./"
    assert any(line.endswith("./usr/bin/perl5.36.0 link to ./usr/bin/perl") for line in lines)
    assert any(line.startswith("crw-rw-rw- 0/0") and line.endswith("./dev/null") for line in lines)


def test_a_deeper_folder_works():
    tree = members_of(reroot(container_tar(), root="/mnt/usr"))
    long = "./" + LONG.removeprefix("mnt/usr/")
    assert sorted(tree) == ["./bin/perl", "./bin/perl5.36.0", "./bin/ping", long, long + ".link"]  # no usr/ entry
    assert tree["./bin/perl5.36.0"][0].linkname == "./bin/perl"


def test_a_hard_link_across_the_edge_is_an_error():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in (member("usr/bin/perl", data=b"x"), member("mnt", tarfile.DIRTYPE),
                         member("mnt/perl", tarfile.LNKTYPE, link="usr/bin/perl")):
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    with pytest.raises(UserError, match="crosses the edge of /mnt") as info:
        reroot(buf.getvalue())
    assert "/usr/bin/perl" in info.value.message and info.value.hint


def test_an_empty_folder_in_the_image_is_an_error():
    with pytest.raises(UserError, match="nothing in /srv/root"):
        reroot(container_tar(), root="/srv/root")


def test_a_symlink_as_the_folder_is_an_error():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.addfile(member("mnt", tarfile.SYMTYPE, link="/srv")[0])
    with pytest.raises(UserError, match="not a folder"):
        reroot(buf.getvalue())


def test_a_truncated_stream_is_an_error():
    data = container_tar()
    with pytest.raises(UserError, match="ended early"):
        reroot(data[: len(data) // 2])


def test_rerooted_names():
    assert rerooted("mnt", "mnt") == "." and rerooted("./mnt/", "mnt") == "."
    assert rerooted("mnt/etc/passwd", "mnt") == "./etc/passwd"
    assert rerooted("/mnt/etc/", "mnt") == "./etc"
    assert rerooted("mntx/a", "mnt") is None and rerooted("etc/mnt/a", "mnt") is None
    assert rerooted("srv/root/x", "srv/root") == "./x" and rerooted("srv/x", "srv/root") is None


def parse_headers(blocks: bytes) -> tarfile.TarInfo:
    """One member's header blocks as the walker reads them."""
    return next(iter(TarStream.of_chunks([blocks + bytes(1024)])))


def test_header_bytes_drop_stale_pax_records():
    ti = tarfile.TarInfo("x" * 150)
    ti.pax_headers = {"path": "x" * 150, "linkpath": "old", "size": "5", "SCHILY.xattr.user.a": "b"}
    ti.name = "./short"
    again = parse_headers(header_bytes(ti))
    assert again.name == "./short" and again.size == 0 and again.pax_headers == {"SCHILY.xattr.user.a": "b"}


def test_write_tgz_with_the_reroot_filter(tmp_path):
    out = tmp_path / "rootfs.tgz"
    write_tgz(chunked(container_tar()), out, Fixups("debian-mnt"), "export test", reroot_filter("/mnt"))
    tree = members_of(gzip.decompress(out.read_bytes()))
    assert tree["./usr/bin/perl"][1] == BIG and "./etc/hostname" in tree


# -- recipe.toml [build] rootfs ---------------------------------------------------------------------


def recipe_dir(tmp_path: Path, toml: str, **files: str) -> Path:
    d = tmp_path / "debian-mnt"
    d.mkdir(parents=True)
    (d / "recipe.toml").write_text(toml)
    for name, text in (files or {"Dockerfile": "FROM ldt/debian-bookworm\n"}).items():
        (d / name).write_text(text)
    return d


def test_rootfs_key_is_read(tmp_path):
    r = recipes.load(recipe_dir(tmp_path, '[build]\nrootfs = "/mnt"\n'))
    assert r.rootfs == "/mnt" and r.settings()["rootfs"] == "/mnt"
    assert recipes.load(recipe_dir(tmp_path / "b", "[vm]\ncpus = 1\n")).rootfs is None


@pytest.mark.parametrize("value", ["mnt", "/", "/mnt/", "/mnt/../etc", "./mnt", "//mnt", ""])
def test_rootfs_must_be_an_absolute_folder(tmp_path, value):
    with pytest.raises(UserError) as info:
        recipes.load(recipe_dir(tmp_path, f'[vm]\ncpus = 1\n[build]\nrootfs = "{value}"\n'))
    assert info.value.message.endswith(f"rootfs '{value}' is not an absolute folder path")
    assert ":4:" in info.value.message and 'rootfs = "/mnt"' in info.value.hint


def test_rootfs_must_be_a_string(tmp_path):
    with pytest.raises(UserError, match="rootfs must be a string"):
        recipes.load(recipe_dir(tmp_path, "[build]\nrootfs = 1\n"))


def test_rootfs_in_a_bootstrap_recipe_is_an_error(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    (d / "recipe.toml").write_text('[build]\nrootfs = "/mnt"\n[bootstrap]\nsuite = "bookworm"\n')
    with pytest.raises(UserError, match="rootfs needs a Dockerfile"):
        recipes.load(d)


def test_rootfs_is_in_the_tgz_key(tmp_path):
    from pipeline.cache import key_of
    from pipeline.project import Project
    from pipeline.stages import STAGE, manifest

    scratch = {"Dockerfile": "FROM scratch\nCOPY . /mnt\n"}
    with_rootfs = recipes.load(recipe_dir(tmp_path / "a", '[build]\nrootfs = "/mnt"\n', **scratch))
    without = recipes.load(recipe_dir(tmp_path / "b", "[vm]\ncpus = 1\n", **scratch))
    p = Project(tmp_path, extra=(with_rootfs, without))
    assert manifest(p, with_rootfs, STAGE["tgz"])["settings"]["rootfs"] == "/mnt"
    assert manifest(p, without, STAGE["tgz"])["settings"]["rootfs"] is None
    assert key_of(manifest(p, with_rootfs, STAGE["tgz"])) != key_of(manifest(p, without, STAGE["tgz"]))


def test_a_global_pax_header_is_kept_once_and_not_repeated_per_member():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global"}) as t:
        for ti, data in (member("mnt", tarfile.DIRTYPE), member("mnt/a", data=b"a", pax={"SCHILY.xattr.user.x": "1"})):
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    out = reroot(buf.getvalue())
    assert out.count(b"comment=global") == 1 and out.count(b"SCHILY.xattr.user.x=1") == 1
    with tarfile.open(fileobj=io.BytesIO(out)) as t:
        a = t.getmember("./a")
        assert t.extractfile(a).read() == b"a"
        assert a.pax_headers == {"comment": "global", "SCHILY.xattr.user.x": "1"}
