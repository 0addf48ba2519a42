"""pipeline/tgz.py: the block-level tar filter, progress, and the command lines it runs."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import mmdebstrap, tgz
from pipeline.errors import UserError
from pipeline.recipes import Bootstrap
from pipeline.tgz import Fixups, filter_tar, hosts_file

CAP = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # cap_net_raw+ep
LONG = "usr/share/" + "d" * 70 + "/" + "f" * 70 + ".txt"
MTIME = 1_700_000_000


def member(name: str, type=tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.mtime = MTIME
    ti.uname = ti.gname = "root"
    ti.mode = 0o755 if type == tarfile.DIRTYPE else 0o644
    for k, v in attrs.items():
        setattr(ti, k, v)
    if type == tarfile.REGTYPE:
        ti.size = len(data)
        return ti, data
    return ti, None


def make_tar(members, format=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def engine_tree(hosts: bytes = b""):
    """What `docker export` gives: engine files mixed with every kind of member worth keeping."""
    return [
        member(".dockerenv"),
        member("etc", tarfile.DIRTYPE),
        member("etc/hostname", data=b"a1b2c3d4e5f6\n"),
        member("etc/hosts", data=hosts),
        member("etc/resolv.conf", data=b"nameserver 10.0.0.1\n",
               pax_headers={"SCHILY.xattr.user.comment": "dropped with its pax header"}),
        member("etc/motd", data=b"hello\n" * 200),  # > 512 bytes: data spans blocks
        member("etc/block", data=b"x" * 512),  # exactly one block
        member("usr/bin/prog", data=b"\x7fELF" + bytes(range(256)) * 3, mode=0o4755),  # setuid
        member("usr/bin/ping", data=b"ping", mode=0o755, pax_headers={"SCHILY.xattr.security.capability": CAP}),
        member("usr/bin/hardlink", tarfile.LNKTYPE, linkname="usr/bin/prog"),
        member("usr/bin/symlink", tarfile.SYMTYPE, linkname="prog"),
        member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6, gname="disk"),
        member("run/fifo", tarfile.FIFOTYPE),
        member(LONG, data=b"long name\n", uid=1000, gid=1000, uname="user", gname="user"),
        member("home/" + "u" * 120, tarfile.DIRTYPE),
        member("home/link-to-long", tarfile.SYMTYPE, linkname="/" + LONG),  # long link name: pax linkpath
        member("etc/hosts.allow", data=b""),
        member("./" + "var/ünïcødé", data=b"utf-8 name\n"),
    ]


DROPPED = {".dockerenv", "etc/resolv.conf"}
REPLACED = {"etc/hostname", "etc/hosts"}


def chunked(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def run_filter(data: bytes, size: int, hostname: str = "myhost") -> bytes:
    out = io.BytesIO()
    assert filter_tar(chunked(data, size), out.write, Fixups(hostname)) == len(data)
    return out.getvalue()


def members_of(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {ti.name: (ti, tf.extractfile(ti).read() if ti.isreg() else None) for ti in tf.getmembers()}


def raw_bytes(data: bytes) -> dict[str, bytes]:
    """Each member's raw bytes in the archive: its pax/GNU headers, header block and data."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {ti.name: data[ti.offset:ti.offset_data + -(-ti.size // 512) * 512 if ti.isreg() else ti.offset_data]
                for ti in tf.getmembers()}


ATTRS = ("name", "type", "size", "mode", "uid", "gid", "uname", "gname", "mtime", "linkname", "devmajor", "devminor",
         "pax_headers")


@pytest.mark.parametrize("size", [1, 7, 512, 1000, 1 << 20])
def test_filter_keeps_every_other_member_byte_for_byte(size):
    src = make_tar(engine_tree())
    out = run_filter(src, size)
    before, after = members_of(src), members_of(out)
    kept = set(before) - DROPPED - REPLACED
    assert set(after) == kept | REPLACED
    for name in kept:
        (a, da), (b, db) = before[name], after[name]
        assert {k: getattr(a, k) for k in ATTRS} == {k: getattr(b, k) for k in ATTRS}, name
        assert da == db, name
    raw_in, raw_out = raw_bytes(src), raw_bytes(out)
    for name in kept:
        assert raw_out[name] == raw_in[name], f"{name} was not copied byte for byte"
    assert out.endswith(bytes(1024))
    assert len(out) % 512 == 0


def test_filter_keeps_special_attributes():
    after = members_of(run_filter(make_tar(engine_tree()), 7))
    assert after["usr/bin/prog"][0].mode == 0o4755
    assert after["usr/bin/ping"][0].pax_headers["SCHILY.xattr.security.capability"] == CAP
    assert after["usr/bin/hardlink"][0].islnk() and after["usr/bin/hardlink"][0].linkname == "usr/bin/prog"
    assert after["usr/bin/symlink"][0].issym() and after["usr/bin/symlink"][0].linkname == "prog"
    assert after["dev/null"][0].ischr() and (after["dev/null"][0].devmajor, after["dev/null"][0].devminor) == (1, 3)
    assert after[LONG][1] == b"long name\n" and len(LONG) > 100
    assert after["home/link-to-long"][0].linkname == "/" + LONG


@pytest.mark.parametrize("size", [7, 1000])
def test_filter_drops_engine_files_and_sets_hostname(size):
    after = members_of(run_filter(make_tar(engine_tree()), size, hostname="myhost"))
    assert ".dockerenv" not in after and "./.dockerenv" not in after
    assert "etc/resolv.conf" not in after
    ti, data = after["etc/hostname"]
    assert data == b"myhost\n"
    assert ti.isreg() and ti.mode == 0o644 and ti.mtime == MTIME and ti.uid == ti.gid == 0
    assert after["etc/hosts"][1] == hosts_file("myhost")
    assert b"127.0.1.1\tmyhost\n" in after["etc/hosts"][1]
    assert after["etc/hosts.allow"][1] == b""  # only etc/hosts itself is a fixup


def test_filter_keeps_a_non_empty_hosts_file():
    hosts = b"127.0.0.1 localhost\n10.1.2.3 server\n"
    after = members_of(run_filter(make_tar(engine_tree(hosts=hosts)), 1000))
    assert after["etc/hosts"][1] == hosts


def test_filter_recognises_dot_slash_names():
    # mmdebstrap's tar names members ./etc/hostname
    src = make_tar([member("./", tarfile.DIRTYPE), member("./.dockerenv"), member("./etc/hostname", data=b"x\n"),
                    member("./etc/resolv.conf", data=b"nameserver 1.1.1.1\n"), member("./etc/hosts", data=b""),
                    member("./etc/issue", data=b"Debian\n")])
    after = members_of(run_filter(src, 7))
    names = {n.removeprefix("./") for n in after}
    assert names == {".", "etc/hostname", "etc/hosts", "etc/issue"}  # tarfile reads "./" as "."
    by_name = {n.removeprefix("./"): v for n, v in after.items()}
    assert by_name["etc/hostname"][1] == b"myhost\n"
    assert by_name["etc/hosts"][1] == hosts_file("myhost")


def test_filter_gnu_long_names():
    src = make_tar([member(LONG, data=b"gnu\n"), member(".dockerenv"), member("etc/hostname", data=b"h\n")],
                   format=tarfile.GNU_FORMAT)
    out = run_filter(src, 7)
    after = members_of(out)
    assert set(after) == {LONG, "etc/hostname"}
    assert raw_bytes(out)[LONG] == raw_bytes(src)[LONG]


def test_filter_stops_at_the_end_of_archive_and_reads_the_rest():
    src = make_tar([member("a", data=b"a")]) + b"\0" * 10240  # tar's record padding
    out = io.BytesIO()
    assert filter_tar(chunked(src, 1000), out.write, Fixups("h")) == len(src)
    assert list(members_of(out.getvalue())) == ["a"]


# member a: header 0..512, data 512..1536; member b: header 1536..2048, data 2048..5120; then the end blocks
@pytest.mark.parametrize("cut", [100, 600, 1536 + 100, 2048 + 300, 5120], ids=[
    "in the first header", "in the first data", "in the second header", "in the second data",
    "after a whole member, no end-of-archive blocks"])
def test_truncated_stream_is_a_user_error(cut):
    src = make_tar([member("a", data=b"a" * 1000), member("b", data=b"b" * 3000)])
    assert src[5120:6144] == bytes(1024)  # the layout the cuts are chosen for
    for size in (7, 1000):
        with pytest.raises(UserError) as info:
            run_filter(src[:cut], size)
        assert "truncated" in info.value.message


# -- write_tgz: the filter feeding the real compressor --------------------------------------------


def test_write_tgz_round_trip(tmp_path):
    out = tmp_path / "rootfs.tgz"
    tgz.write_tgz(chunked(make_tar(engine_tree()), 1000), out, Fixups("myhost"), "test")
    with tarfile.open(out, "r:gz") as tf:
        names = set(tf.getnames())
        assert tf.extractfile("etc/hostname").read() == b"myhost\n"
    assert ".dockerenv" not in names and "etc/resolv.conf" not in names and LONG in names


def test_write_tgz_truncated_input_raises_user_error(tmp_path):
    src = make_tar([member("a", data=b"a" * 5000)])
    with pytest.raises(UserError, match="truncated"):
        tgz.write_tgz(chunked(src[:3000], 1000), tmp_path / "rootfs.tgz", Fixups("h"), "test")


# -- progress ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_nothing_when_not_a_tty(capsys, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tgz.time, "monotonic", clock)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    p = tgz.Progress("export hello")
    for i in range(5):
        clock.now += 1
        p.update(i << 20)
    err = capsys.readouterr().err
    assert err == ""
    p.done(5 << 20)
    err = capsys.readouterr().err
    assert "\r" not in err and "\033" not in err
    assert err.splitlines() == ["ldt: export hello: 5.0 MiB in 5.0s"]  # the one summary line of a long step


def test_progress_updates_a_terminal_line(capsys, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tgz.time, "monotonic", clock)
    p = tgz.Progress("export hello", enabled=True)
    clock.now += 0.1
    p.update(1 << 20)  # too soon: nothing
    assert capsys.readouterr().err == ""
    clock.now += 1
    p.update(10 << 20)
    assert capsys.readouterr().err.startswith("\rldt: export hello:     10.0 MiB")


# -- command lines ------------------------------------------------------------------------------------


def test_compressor_prefers_igzip_then_pigz_then_gzip(monkeypatch):
    def having(*names: str):
        monkeypatch.setattr(tgz.shutil, "which", lambda name: f"/usr/bin/{name}" if name in names else None)

    having("igzip", "pigz", "gzip")
    assert tgz.compressor_cmd() == ["igzip", "-1", "-n", "-c"]
    having("pigz", "gzip")
    assert tgz.compressor_cmd() == ["pigz", "-1", "-n"]
    having("gzip")
    assert tgz.compressor_cmd() == ["gzip", "-1", "-n"]
    having()
    assert tgz.compressor_cmd() == ["gzip", "-1", "-n"]  # its missing-tool error comes from run()


def test_mmdebstrap_cmd_defaults():
    assert mmdebstrap.tar_cmd(Bootstrap()) == [
        "mmdebstrap", "--variant=minbase", "--format=tar", "--quiet", "bookworm", "-", "http://deb.debian.org/debian"]


def test_mmdebstrap_cmd_with_packages():
    b = Bootstrap(suite="trixie", variant="apt", packages=("systemd-sysv", "udev"), mirror="http://mirror/debian")
    assert mmdebstrap.tar_cmd(b) == [
        "mmdebstrap", "--variant=apt", "--format=tar", "--quiet", "--include=systemd-sysv,udev", "trixie", "-",
        "http://mirror/debian"]


def test_bootstrap_without_mmdebstrap_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tgz.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as info:
        tgz.bootstrap(Bootstrap(), Path(tmp_path / "x.tgz"), "h", None)
    assert "mmdebstrap" in info.value.message and "setup.sh" in info.value.hint
