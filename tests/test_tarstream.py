"""pipeline.tarstream: the one tar walker under the tgz filter, reroot, the boot and ext4 stages."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.tarstream import BLOCK, TarStream, member_path, norm_name, open_tar


def tar_bytes(members, format=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format, pax_headers=pax_headers) as tf:
        for name, data, extra in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.pax_headers = len(data), 1_700_000_000, extra
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def chunked(data: bytes, size: int):
    return (data[i : i + size] for i in range(0, len(data), size))


def raw_copies(data: bytes, size: int) -> bytes:
    out = io.BytesIO()
    stream = TarStream.of_chunks(chunked(data, size))
    for member in stream:
        stream.copy_raw(member, out.write)
    assert stream.total == len(data)  # read to the end, record padding included
    return out.getvalue()


@pytest.mark.parametrize("size", [1, 511, 1000, 1 << 20])
def test_raw_copies_of_every_member_are_the_archive(size):
    big_xattr = {"SCHILY.xattr.user.big": "x" * 9000}  # a PAX header of several blocks
    data = tar_bytes([("a", b"a" * 1000, {}), ("usr/" + "d" * 120 + "/f", b"long name", {}),
                      ("b", b"b", big_xattr)], pax_headers={"comment": "a global header"})
    copies = raw_copies(data, size)
    assert data.startswith(copies) and data[len(copies):] == bytes(len(data) - len(copies))


def test_raw_copy_reaches_back_over_a_big_header_after_megabytes_of_data():
    data = tar_bytes([("big", bytes(range(256)) * 24_000, {}), ("x", b"x", {"SCHILY.xattr.user.v": "v" * 20_000})],
                     format=tarfile.PAX_FORMAT)
    copies = raw_copies(data, 1 << 16)
    assert data.startswith(copies)


def test_gnu_long_names_are_copied_as_they_are():
    data = tar_bytes([("l" * 200, b"gnu", {})], format=tarfile.GNU_FORMAT)
    assert data.startswith(raw_copies(data, 7))


@pytest.mark.parametrize("cut", [0, 100, 512 + 10, 1536, 2048])
def test_an_archive_without_its_end_is_truncated(tmp_path: Path, cut):
    data = tar_bytes([("a", b"a" * 1000, {}), ("b", b"b" * 100, {})], format=tarfile.GNU_FORMAT)
    tgz = tmp_path / "r.tgz"
    tgz.write_bytes(gzip.compress(data[:cut]))
    with pytest.raises(UserError, match="truncated"):
        with open_tar(tgz) as stream:
            for _ in stream:
                pass
    with pytest.raises(UserError, match="truncated"):
        for _ in TarStream.of_chunks(chunked(data[:cut], 100)):
            pass


def test_copy_data_is_the_padded_data_blocks():
    data = tar_bytes([("a", b"abc", {})])
    stream = TarStream.of_chunks([data])
    out = io.BytesIO()
    for member in stream:
        stream.copy_data(member, out.write)
    assert out.getvalue() == b"abc" + bytes(BLOCK - 3)


def test_names():
    assert member_path(tarfile.TarInfo("./etc//passwd")) == "etc/passwd"
    assert member_path(tarfile.TarInfo("./")) == ""
    with pytest.raises(UserError, match="unsafe path"):
        member_path(tarfile.TarInfo("a/../../etc"))
    assert norm_name("././etc/hostname") == "etc/hostname" and norm_name("/etc/") == "etc/"
