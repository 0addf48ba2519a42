"""The block layer (blocks.py, packs.py, regzip.py) on files made here: byte counts, not only success."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import sqlite3
import subprocess
import tarfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import packs as packs_module
from pipeline import regzip
from pipeline.blocks import BLOCK, HOLE, BlockCorrupt, Index, Layout, digest, fixed_pieces, tar_pieces
from pipeline.errors import UserError
from pipeline.packs import BlockStore, PackReader, block_of, decompress_frame, read_trailer, verify_pack

MiB = 1 << 20
NEEDS_IGZIP = pytest.mark.skipif(not shutil.which("igzip"), reason="igzip is not installed (./setup.sh installs isal)")
NEEDS_PIGZ = pytest.mark.skipif(not shutil.which("pigz"), reason="pigz is not installed (./setup.sh installs it)")


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def packs(store: BlockStore) -> list[Path]:
    return sorted(store.packs.glob("*.pack"))


def test_round_trip_is_byte_identical(tmp_path: Path):
    data = rand(3 * MiB + 123, 1) + bytes(5 * BLOCK) + b"tail"
    src = write(tmp_path / "a.img", data)
    store = BlockStore(tmp_path / "store")
    index = store.put_file(src)
    assert index.size == len(data)
    out = store.materialize(Index.from_bytes(index.to_bytes()), tmp_path / "out.img")
    assert out.read_bytes() == data
    assert store.verify() == []


def test_blocks_shared_by_two_files_are_stored_once(tmp_path: Path):
    common = rand(64 * BLOCK, 2)
    a = write(tmp_path / "a", common)
    b = write(tmp_path / "b", rand(8 * BLOCK, 3) + common + rand(8 * BLOCK, 4))
    store = BlockStore(tmp_path / "store")
    store.put_file(a)
    after_a = store.stats()
    assert after_a.blocks == 64
    assert 64 * BLOCK <= after_a.stored < 64 * BLOCK + 4096  # random data: no compression, small overhead
    index_b = store.put_file(b)
    after_b = store.stats()
    assert after_b.blocks == 64 + 16
    assert after_b.stored - after_a.stored < 16 * BLOCK + 4096
    assert store.missing(index_b) == set()
    store.materialize(index_b, tmp_path / "b.out")
    assert (tmp_path / "b.out").read_bytes() == b.read_bytes()


def test_zeros_cost_nothing_and_stay_holes(tmp_path: Path):
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(rand(BLOCK, 5))
    store = BlockStore(tmp_path / "store")
    index = store.put_file(src)
    assert [(d == HOLE, n) for d, n in index] == [(True, 32 * MiB), (False, BLOCK), (True, 32 * MiB - BLOCK)]
    assert store.stats().blocks == 1
    assert store.stats().stored < 2 * BLOCK
    out = store.materialize(index, tmp_path / "out.img")
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 < 1 * MiB  # written sparse


def tar_of(files: dict[str, bytes], **extra: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1700000000
            tar.addfile(ti, io.BytesIO(data))
        for ti in extra.values():
            tar.addfile(ti)
    return buf.getvalue()


def test_tar_is_cut_per_member_like_the_files_themselves(tmp_path: Path):
    files = {"a": rand(10000, 6), "b" * 150: rand(3 * BLOCK, 7), "empty": b"", "c": rand(100, 8)}
    link = tarfile.TarInfo("sym")
    link.type, link.linkname = tarfile.SYMTYPE, "a"
    tar = tar_of(files, link=link)
    pieces = list(tar_pieces(io.BytesIO(tar)))
    assert b"".join(pieces) == tar
    digests = {digest(p) for p in pieces}
    for data in files.values():  # each file's blocks, zero-padded like an ext4 file's last block
        assert {digest(p) for p in fixed_pieces(io.BytesIO(data))} <= digests


def test_a_tar_members_tail_and_an_ext4_files_padded_block_are_one_block(tmp_path: Path):
    data = rand(5000, 9)
    ext4_like = write(tmp_path / "fs.img", bytes(BLOCK) + data + bytes(3 * BLOCK - len(data)))
    tar = write(tmp_path / "t.tar", tar_of({"etc/file": data}))
    store = BlockStore(tmp_path / "store")
    store.put_file(ext4_like)
    before = store.stats().blocks
    index = store.put_file(tar, Layout.TAR)
    assert store.stats().blocks - before == 1  # the headers; the file's two blocks were there
    assert [n for d, n in index if d != HOLE] == [512, BLOCK, 5000 - BLOCK]  # the header, the data
    store.materialize(index, tmp_path / "t.out")
    assert (tmp_path / "t.out").read_bytes() == tar.read_bytes()


@pytest.mark.parametrize("cmd", [
    pytest.param(("igzip", "-1", "-n", "-c"), id="igzip",  # what a tgz build makes (tgz.compressor_cmd)
                 marks=NEEDS_IGZIP),
    pytest.param(("pigz", "-1", "-n", "-p", "2"), id="pigz",  # ... in stores written before igzip
                 marks=NEEDS_PIGZ),
])
def test_a_tgz_is_stored_as_its_tar_and_made_again_exactly(tmp_path: Path, cmd: tuple[str, ...]):
    """The probe names the command that made it, the tgz adds no block to its tar's, and the
    materialized tgz is the file."""
    files = {f"f{i}": rand(20000 + i, 10 + i) for i in range(40)}
    tar = write(tmp_path / "t.tar", tar_of(files))
    tgz = tmp_path / "t.tgz"
    with open(tar, "rb") as i, open(tgz, "wb") as o:
        subprocess.run(cmd, stdin=i, stdout=o, check=True)
    store = BlockStore(tmp_path / "store")
    store.put_file(tar, Layout.TAR)
    before = store.stats()
    index = store.put(tgz)
    assert index.layout is Layout.TAR and index.gzip is not None
    assert index.gzip.cmd == cmd
    assert store.stats() == before  # every block of the tgz is a block of the tar
    out = store.materialize(index, tmp_path / "out.tgz")
    assert out.read_bytes() == tgz.read_bytes()


@NEEDS_IGZIP
def test_igzip_gives_the_same_bytes_however_its_input_arrives(tmp_path: Path):
    """What remaking a tgz relies on: one pipe write or many small ones, one thread or two."""
    data = b"".join(rand(70000, i) + bytes(90000) for i in range(12))
    whole = subprocess.run(["igzip", "-1", "-n", "-c"], input=data, capture_output=True, check=True).stdout
    with subprocess.Popen(["igzip", "-1", "-n", "-c", "-T", "2"], stdin=subprocess.PIPE,
                          stdout=open(tmp_path / "pieces.gz", "wb")) as proc:
        assert proc.stdin is not None
        for i in range(0, len(data), 777):
            proc.stdin.write(data[i:i + 777])
        proc.stdin.close()
    assert proc.returncode == 0 and (tmp_path / "pieces.gz").read_bytes() == whole
    assert gzip.decompress(whole) == data


def test_pigz_is_made_again_on_every_core_only_where_that_gives_the_same_bytes(monkeypatch):
    from pipeline import regzip

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert regzip.on_all_cores(("pigz", "-1", "-n", "-p", "2")) == ("pigz", "-1", "-n", "-p", "8")
    assert regzip.on_all_cores(("pigz", "-1", "-n", "-p", "1")) == ("pigz", "-1", "-n", "-p", "1")  # one stream
    assert regzip.on_all_cores(("gzip", "-1", "-n")) == ("gzip", "-1", "-n")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert regzip.on_all_cores(("pigz", "-1", "-n", "-p", "2")) == ("pigz", "-1", "-n", "-p", "2")


@NEEDS_PIGZ
def test_pigz_with_two_threads_or_more_gives_the_same_bytes(tmp_path: Path):
    """What on_all_cores relies on (128 KiB blocks, each ending in a sync flush, whatever the threads)."""
    data = b"".join(rand(70000, i) + bytes(90000) for i in range(12))
    outs = {n: subprocess.run(["pigz", "-1", "-n", "-p", str(n)], input=data, capture_output=True, check=True).stdout
            for n in (2, 3, 8)}
    assert outs[2] == outs[3] == outs[8]


def test_a_gzip_no_candidate_reproduces_is_stored_as_compressed_bytes(tmp_path: Path):
    tar = tar_of({"a": rand(50000, 20)})
    tgz = write(tmp_path / "t.tgz", gzip.compress(tar, compresslevel=9, mtime=0))
    store = BlockStore(tmp_path / "store")
    index = store.put(tgz)
    assert index.gzip is None and index.layout is Layout.FIXED
    assert store.materialize(index, tmp_path / "out").read_bytes() == tgz.read_bytes()


def flip(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_in_a_pack_is_one_line_and_nothing_written(tmp_path: Path):
    src = write(tmp_path / "a", rand(40 * BLOCK, 11))
    store = BlockStore(tmp_path / "store")
    index = store.put_file(src)
    (pack,) = packs(store)
    flip(pack, 100)  # inside the first frame
    with pytest.raises(BlockCorrupt) as e:
        store.materialize(index, tmp_path / "out")
    assert "\n" not in e.value.message and pack.name[:12] in e.value.message
    assert not (tmp_path / "out").exists()
    assert [m for m in store.verify() if pack.name[:12] in m]
    with pytest.raises(BlockCorrupt):
        verify_pack(pack)


def test_blocks_out_of_their_pack_order_are_found_and_checked(tmp_path: Path):
    """The reader tries the block after the one before in its frame first; any other order, a
    block twice in a row and a damaged block in the middle of a frame still come out right."""
    blocks = [rand(BLOCK, 100 + i) for i in range(40)]
    store = BlockStore(tmp_path / "store")
    store.put_file(write(tmp_path / "a", b"".join(blocks)))
    mixed = blocks[::-1] + blocks[5:9] + [blocks[7]] * 3 + blocks[20:] + blocks[:3]
    index = store.put_file(write(tmp_path / "b", b"".join(mixed)))
    assert store.materialize(index, tmp_path / "out").read_bytes() == b"".join(mixed)
    (pack,) = packs(store)
    frames = sorted({loc.offset for _, loc in read_trailer(pack)})
    flip(pack, frames[1] + 40)  # inside the second frame: blocks the reader reaches as "the next one"
    with pytest.raises(BlockCorrupt):
        store.materialize(index, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_a_write_that_fails_on_the_writing_thread_is_raised_not_lost(tmp_path: Path):
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", rand(3 * MiB, 13)))

    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        store.write_stream(store.get_index(index), Full())
    assert e.value.errno == 28


def test_a_full_disk_while_the_shares_are_written_is_raised_and_leaves_no_file(tmp_path: Path, monkeypatch):
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", rand(8 * MiB, 14)))
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, pos: pwrite(fd, data, pos) if pos < 5 * MiB
                        else (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError) as e:
        store.materialize(index, tmp_path / "out")
    assert e.value.errno == 28 and not (tmp_path / "out").exists()


def test_a_file_is_written_in_shares_side_by_side_and_comes_out_whole(tmp_path: Path, monkeypatch):
    """Four shares of a file with a hole and a short last block, each from its own offset on."""
    monkeypatch.setattr(packs_module, "WORKERS", 4)
    data = rand(300 * BLOCK, 15) + bytes(200 * BLOCK) + rand(800 * BLOCK + 100, 16)  # 1,102 entries
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", data))
    starts = []
    real = BlockStore._write_share
    monkeypatch.setattr(BlockStore, "_write_share", lambda self, index, lo, hi, share, *a: starts.append(share.pos)
                        or real(self, index, lo, hi, share, *a))
    out = store.materialize(index, tmp_path / "out")
    assert out.read_bytes() == data
    assert len(starts) == 4 and starts[0] == 0 and len(set(starts)) == 4
    assert out.stat().st_blocks * 512 < len(data) - 100 * BLOCK  # the hole stays one
    starts.clear()  # hashed whole as the four shares are written (a pull): the same sha256, or BlockCorrupt
    assert store.materialize(index, tmp_path / "pulled", whole=True).read_bytes() == data and len(starts) == 4


def test_a_pack_verifies_alone_and_its_name_is_its_digest(tmp_path: Path):
    store = BlockStore(tmp_path / "store")
    store.put_file(write(tmp_path / "a", rand(100 * BLOCK, 12) + bytes(BLOCK) * 3))
    (pack,) = packs(store)
    alone = shutil.copy(pack, tmp_path / pack.name)
    assert verify_pack(Path(alone)) == 100


class Killed(Exception):
    pass


class DiesAfter(io.RawIOBase):
    """A stream that raises after `limit` bytes, like a kill in the middle of a put."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.limit, self.pos = data, limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.limit:
            raise Killed
        out = self.data[self.pos:self.pos + min(n, 64 * BLOCK)]
        self.pos += len(out)
        return out


def test_an_interrupted_put_leaves_nothing_a_lookup_takes_for_finished(tmp_path: Path):
    data = rand(400 * BLOCK, 13)
    store = BlockStore(tmp_path / "store", pack_max=100 * BLOCK)  # a few packs finish before the kill
    with pytest.raises(Killed):
        store.put_stream(DiesAfter(data, 300 * BLOCK), Layout.FIXED)
    assert list(store.tmp.iterdir()) == []  # the unfinished pack is gone
    finished = packs(store)
    assert finished
    with sqlite3.connect(store.root / "index.sqlite") as con:
        rows = con.execute("SELECT DISTINCT pack FROM blocks").fetchall()
    assert {r for (r,) in rows} == {p.name.removesuffix(".pack") for p in finished}
    for p in finished:
        verify_pack(p)
    last = [digest(data[i:i + BLOCK]) for i in range(299 * BLOCK, 300 * BLOCK, BLOCK)]
    assert all(store.locate(d) is None for d in last)  # read, not in a finished pack: unknown
    index = store.put_file(write(tmp_path / "a", data))  # the next put completes it
    assert store.stats().blocks == 400
    assert store.materialize(index, tmp_path / "out").read_bytes() == data


def test_a_pack_renamed_but_not_indexed_is_adopted(tmp_path: Path):
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", rand(20 * BLOCK, 14)))
    with sqlite3.connect(store.root / "index.sqlite") as con:  # a crash between rename and commit
        con.execute("DELETE FROM blocks")
        con.execute("DELETE FROM packs")
    with pytest.raises(BlockCorrupt, match="in no pack"):
        store.materialize(index, tmp_path / "out")
    assert store.reindex() == 1
    assert store.materialize(index, tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()


def test_memory_stays_bounded_on_a_200_mb_file(tmp_path: Path):
    src = tmp_path / "big.img"
    with open(src, "wb") as f:
        f.truncate(200 * MiB)
        for i in range(0, 200 * MiB, 256 * 1024):  # a random block every 256 KiB: 800 blocks
            f.seek(i)
            f.write(rand(BLOCK, i))
    store = BlockStore(tmp_path / "store")
    tracemalloc.start()
    try:
        index = store.put_file(src)
        _, peak_put = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        store.materialize(index, tmp_path / "out.img")
        _, peak_out = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.stats().blocks == 800
    assert peak_put < 16 * MiB, peak_put
    assert peak_out < 16 * MiB, peak_out
    assert (tmp_path / "out.img").stat().st_size == 200 * MiB


def test_an_index_round_trips_and_a_damaged_one_is_one_line():
    index = Index(10, "ab" * 32, Layout.FIXED, b"\x01" * 32 + (10).to_bytes(4, "big"))
    assert Index.from_bytes(index.to_bytes()) == index
    with pytest.raises(UserError, match="not a block index"):
        Index.from_bytes(index.to_bytes()[:-3])
    with pytest.raises(UserError, match="not a block index"):
        Index.from_bytes(b"garbage")


def test_an_index_kept_as_blocks_grows_by_the_chunks_around_an_edit(tmp_path: Path):
    a = rand(2000 * BLOCK, 15)
    b = a[:1000 * BLOCK] + rand(BLOCK, 16) + a[1001 * BLOCK:]
    store = BlockStore(tmp_path / "store")
    root_a = store.put_index(store.put_file(write(tmp_path / "a", a)))
    before = store.stats().blocks
    full_b = store.put_file(write(tmp_path / "b", b))
    root_b = store.put_index(full_b)
    assert 1 + 1 <= store.stats().blocks - before <= 1 + 3  # the new data block, the index chunks around it
    assert len(root_b.to_bytes()) < len(full_b.to_bytes()) // 20
    assert Index.from_bytes(root_b.to_bytes()) == root_b and root_b.level == 1
    assert store.get_index(root_b) == full_b
    assert store.materialize(root_b, tmp_path / "b.out").read_bytes() == b
    assert store.materialize(root_a, tmp_path / "a.out").read_bytes() == a


@NEEDS_PIGZ
def test_a_tgz_of_mostly_zeros_is_still_stored_as_its_tar(tmp_path: Path):
    tar = write(tmp_path / "t.tar", tar_of({"zeros": bytes(48 * MiB), "data": rand(3 * BLOCK, 17)}))
    tgz = tmp_path / "t.tgz"
    with open(tar, "rb") as i, open(tgz, "wb") as o:
        subprocess.run(["pigz", "-1", "-n", "-p", "2"], stdin=i, stdout=o, check=True)
    store = BlockStore(tmp_path / "store")
    index = store.put(tgz)
    assert index.gzip is not None
    assert store.stats().blocks == 2 + 3  # two members' headers and the data; the zeros are holes
    assert store.materialize(index, tmp_path / "out.tgz").read_bytes() == tgz.read_bytes()


def test_a_file_read_in_its_packs_order_asks_the_index_once(tmp_path: Path, monkeypatch):
    """The next block is looked for in the next slot, then in the pack's next frame: a file whose
    blocks were packed in its own order (5 frames here) is found by one look-up, its first block."""
    data = rand(70 * BLOCK, 31)
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", data))
    pack = max(packs(store), key=lambda p: p.stat().st_size)
    assert len({loc.offset for _, loc in read_trailer(pack)}) == 5
    asked = []
    real = PackReader.located
    monkeypatch.setattr(PackReader, "located", lambda self, d: asked.append(d) or real(self, d))
    assert store.materialize(index, tmp_path / "out").read_bytes() == data
    assert len(asked) == 1


def test_blocks_read_out_of_their_packs_order_are_found_by_the_trailers_read(tmp_path: Path, monkeypatch):
    """A file that holds its first part twice: the second time, its blocks are where the pack's
    trailer (read for the first) says, and the index is not asked again."""
    first, second = rand(40 * BLOCK, 32), rand(40 * BLOCK, 33)
    data = first + second + first
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", data))
    asked = []
    real = BlockStore.locate
    monkeypatch.setattr(BlockStore, "locate", lambda self, d, con=None: asked.append(d) or real(self, d, con))
    assert store.materialize(index, tmp_path / "out").read_bytes() == data
    assert len(asked) == 1  # the first block: every other one is in the pack its trailer describes


def test_a_missing_block_is_one_byte_range_of_one_pack(tmp_path: Path):
    """What a pull by HTTP Range requests relies on: locate() names a pack and a byte range that
    holds the block's frame alone."""
    data = rand(50 * BLOCK, 18)
    remote = BlockStore(tmp_path / "remote")
    index = remote.put_file(write(tmp_path / "a", data))
    local = BlockStore(tmp_path / "local")
    assert local.missing(index) == index.digests() and len(index.digests()) == 50
    d = digest(data[37 * BLOCK:38 * BLOCK])
    loc = remote.locate(d)
    assert loc is not None and loc.length < 20 * BLOCK
    with open(remote.pack_path(loc.pack), "rb") as f:
        f.seek(loc.offset)
        frame = decompress_frame(f.read(loc.length), loc)  # bytes=offset-(offset+length-1)
    assert block_of(frame, d, loc) == data[37 * BLOCK:38 * BLOCK]


def test_anything_cut_as_a_tar_still_adds_up_to_itself(tmp_path: Path):
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname, hard.size = tarfile.LNKTYPE, "a", 0
    tar = tar_of({"a": rand(9000, 19)}, hard=hard)
    for stream in (tar, rand(3 * BLOCK + 5, 20), tar[:1536] + b"x" * 700, b"", bytes(10240)):
        assert b"".join(tar_pieces(io.BytesIO(stream))) == stream


def test_a_probe_the_full_pass_disproves_falls_back_to_compressed_bytes(tmp_path: Path, monkeypatch):
    tgz = write(tmp_path / "t.tgz", gzip.compress(tar_of({"a": rand(30000, 21)}), compresslevel=9, mtime=0))
    monkeypatch.setattr(regzip, "probe", lambda path: ("gzip", "-1", "-n"))  # a wrong guess
    store = BlockStore(tmp_path / "store")
    index = store.put(tgz)
    assert index.gzip is None and index.layout is Layout.FIXED
    assert store.materialize(index, tmp_path / "out").read_bytes() == tgz.read_bytes()


def test_an_index_from_elsewhere_is_hashed_whole_against_its_sha256(tmp_path: Path):
    """A registry's index that names other blocks than the file its sha256 names: each block is
    checked, so only hashing the file whole (whole=True, what a pull asks) finds it out."""
    store = BlockStore(tmp_path / "store")
    a, b = rand(40 * BLOCK, 41), rand(40 * BLOCK, 42)
    root_a = store.put_index(store.put_file(write(tmp_path / "a", a)))
    root_b = store.put_index(store.put_file(write(tmp_path / "b", b)))
    lying = replace(root_b, sha256=root_a.sha256)
    with pytest.raises(BlockCorrupt, match="does not match its recorded sha256"):
        store.materialize(lying, tmp_path / "pulled", whole=True)
    assert not (tmp_path / "pulled").exists()
    assert store.materialize(root_a, tmp_path / "restored", whole=True).read_bytes() == a


def test_a_block_learned_at_the_wrong_place_is_found_by_the_index(tmp_path: Path):
    """learn() keeps a block by its digest's first 8 bytes: another digest sharing them (or a bad
    trailer) points at a block that fails its check, and the index is asked instead."""
    data = rand(40 * BLOCK, 43)
    store = BlockStore(tmp_path / "store")
    index = store.put_file(write(tmp_path / "a", data))
    first, second = (d for d, _ in index.slice(0, 2))
    with store.db() as con, PackReader(store, con) as reader:
        _, loc = reader.located(first)  # learns the pack
        prefix = int.from_bytes(second[:8], "big")
        reader.learned[prefix] = reader.learned[int.from_bytes(first[:8], "big")]  # second -> first's place
        block, where = reader.located(second)
    assert block == data[BLOCK:2 * BLOCK] and where.slot == loc.slot + 1


def test_an_empty_file_comes_back_empty(tmp_path: Path):
    store = BlockStore(tmp_path / "store")
    index = store.put_index(store.put_file(write(tmp_path / "empty", b"")))
    assert store.materialize(index, tmp_path / "out").read_bytes() == b""
    assert store.materialize(index, tmp_path / "pulled", whole=True).read_bytes() == b""
