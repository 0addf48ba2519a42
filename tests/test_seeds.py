"""pipeline.seeds: a disk made from the blocks plus runs copied from a local file that holds most of
them (its ext4), checked whole; a seed that changed or is short is not trusted."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from pipeline import seeds
from pipeline.blocks import BLOCK, BlockCorrupt
from pipeline.packs import BlockStore
from pipeline.seeds import Seed, Sink

MiB = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def made(store: BlockStore, path: Path, data: bytes):
    """A file of the store: written, cut into blocks, its index kept as blocks (put_index records it)."""
    path.write_bytes(data)
    return store.put_index(store.put(path))


@pytest.fixture
def disk(tmp_path: Path):
    """An "ext4" (data, a hole, data) and a "disk": a boot area, the ext4 at 1 MiB, a tail."""
    store = BlockStore(tmp_path / "store")
    ext4 = rand(2 * MiB, 1) + bytes(MiB) + rand(MiB + 5 * BLOCK, 2)
    ext4_root = made(store, tmp_path / "rootfs.ext4", ext4)
    image = rand(MiB, 3) + ext4 + rand(3 * BLOCK, 4) + bytes(2 * MiB)
    image_root = made(store, tmp_path / "disk.img", image)
    (tmp_path / "disk.img").unlink()
    return store, Seed(tmp_path / "rootfs.ext4", ext4_root.sha256), image_root, image


def data_packs(store: BlockStore) -> list[Path]:
    return sorted(store.packs.glob("*.pack"), key=lambda p: p.stat().st_mtime_ns)


def test_a_disk_is_made_from_its_seed_without_the_blocks_it_shares(disk, tmp_path):
    store, seed, root, image = disk
    shared = data_packs(store)[0]  # the ext4's blocks (the first pack written)
    shared.chmod(0o644)
    shared.write_bytes(b"gone")
    out = store.materialize(root, tmp_path / "out.img", [seed])
    assert out.read_bytes() == image
    assert os.stat(out).st_blocks * 512 < len(image) - 2 * MiB  # the holes stay holes
    with pytest.raises(BlockCorrupt):  # the seed was the only place those blocks came from
        store.materialize(root, tmp_path / "out2.img")


def test_a_seed_changed_since_it_was_recorded_is_not_trusted(disk, tmp_path, capsys):
    """Every block read from a seed is checked: the changed one comes from the packs, one line says so."""
    store, seed, root, image = disk
    with open(seed.path, "r+b") as f:
        f.seek(100)
        f.write(b"changed")
    assert store.materialize(root, tmp_path / "out.img", [seed]).read_bytes() == image
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "did not match" in ln]
    assert lines == [f"ldt: out.img: 1 of the blocks read from {seed.path.name} did not match their digests "
                     "(changed since recorded); taken from the packs instead"], lines


def test_a_seed_cut_short_since_it_was_recorded_gives_what_it_still_holds(disk, tmp_path, capsys, monkeypatch):
    """A seed truncated after the disk's blocks were looked up in it: the blocks it lacks come
    from the packs (a short read never counts as a block)."""
    store, seed, root, image = disk
    real = BlockStore._seeded

    def then_cut(self, index, seeds, opened):
        have = real(self, index, seeds, opened)
        os.truncate(seed.path, 2 * MiB + 100)
        return have

    monkeypatch.setattr(BlockStore, "_seeded", then_cut)
    assert store.materialize(root, tmp_path / "out.img", [seed]).read_bytes() == image
    assert "did not match their digests" in capsys.readouterr().err


def test_a_seed_used_as_recorded_says_how_much_it_gave(disk, tmp_path, capsys):
    store, seed, root, image = disk
    assert store.materialize(root, tmp_path / "out.img", [seed]).read_bytes() == image
    err = capsys.readouterr().err
    assert "did not match" not in err
    assert f"out.img: 3 MiB of its blocks read from {seed.path.name}" in err


def test_a_short_or_missing_or_unknown_seed_is_skipped(disk, tmp_path, capsys):
    store, seed, root, image = disk
    short = tmp_path / "short"
    short.write_bytes(seed.path.read_bytes()[:MiB])
    seeds = [Seed(short, seed.sha256), Seed(tmp_path / "nowhere", seed.sha256), Seed(seed.path, "0" * 64)]
    assert store.materialize(root, tmp_path / "out.img", seeds).read_bytes() == image
    assert capsys.readouterr().err == ""  # no seed gave a block: nothing to say


def test_a_full_disk_while_copying_is_raised(disk, tmp_path, monkeypatch):
    store, seed, root, _ = disk
    pwrite = os.pwrite

    def filling(fd: int, data: bytes, pos: int) -> int:
        if pos + len(data) > MiB:
            raise OSError(28, "No space left on device")
        return pwrite(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(OSError) as e:
        store.materialize(root, tmp_path / "out.img", [seed])
    assert e.value.errno == 28 and not (tmp_path / "out.img").exists()


def test_an_error_of_the_last_piece_is_raised_and_the_thread_ends():
    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            raise OSError(28, "No space left on device")

    sink = Sink(Full())
    with pytest.raises(OSError), sink:
        sink.block(b"x" * BLOCK)  # buffered: written when the block ends
        sink.hole(BLOCK)  # the buffered piece fails on the thread; this or the exit raises it
        sink.block(b"y" * BLOCK)
    assert not sink.thread.is_alive()


def test_where_the_filesystem_shares_extents_a_run_is_cloned_and_read_back(disk, tmp_path, monkeypatch):
    """FICLONERANGE is asked first; this fake clones by copying, as btrfs or XFS would share."""
    store, seed, root, image = disk
    clones = []
    pwrite = os.pwrite

    def clone(src: int, at: int, n: int, dst: int, pos: int) -> bool:
        clones.append(n)
        pwrite(dst, os.pread(src, n, at), pos)
        return True

    monkeypatch.setattr(seeds, "clone_range", clone)
    assert store.materialize(root, tmp_path / "out.img", [seed]).read_bytes() == image
    assert clones[0] == BLOCK  # shares_extents asking, into an unnamed file beside it
    assert sum(clones[1:]) == 3 * MiB + 5 * BLOCK  # the ext4's data runs, the hole not among them


def test_a_clone_the_filesystem_refuses_is_asked_once_then_the_runs_are_copied(disk, tmp_path, monkeypatch):
    store, seed, root, image = disk
    asked = []
    monkeypatch.setattr(seeds, "clone_range", lambda *a: asked.append(a) or False)
    assert store.materialize(root, tmp_path / "out.img", [seed]).read_bytes() == image
    assert len(asked) == 1


def test_the_real_clone_ioctl_shares_or_says_no(tmp_path):
    """On this machine's filesystem: FICLONERANGE either makes the bytes equal or returns False."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = rand(4 * BLOCK, 5)
    src.write_bytes(data)
    with open(src, "rb") as s, open(dst, "w+b") as d:
        cloned = seeds.clone_range(s.fileno(), BLOCK, 2 * BLOCK, d.fileno(), 0)
    assert dst.read_bytes() == (data[BLOCK:3 * BLOCK] if cloned else b"")
