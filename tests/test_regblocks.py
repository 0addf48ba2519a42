"""pipeline.regblocks' pure parts: the index blob, the manifest (its size with many packs), ranges,
the map of where the registry holds blocks."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from pipeline import oci, regblocks
from pipeline.blocks import HOLE, Index, Layout
from pipeline.entries import EntryCorrupt
from pipeline.errors import UserError
from pipeline.packs import BlockStore, Location
from pipeline.regblocks import IndexBlob, RemoteMap


def pack_name(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def locations(n: int, packs: int = 3) -> list[Location]:
    """What a pusher writes: blocks in order, 16 to a frame, frames one after the other."""
    out = []
    for i in range(n):
        p, j = divmod(i, max(1, n // packs + 1))
        frame = j // 16
        out.append(Location(pack_name(p), 8 + frame * 30_000, 29_000 + frame % 7, j % 16))
    return out


def test_index_blob_round_trip_and_its_size(tmp_path):
    bs = BlockStore(tmp_path / "b")
    f = tmp_path / "f"
    f.write_bytes(os.urandom(4096 * 3000) + bytes(1 << 20))
    full = bs.put(f)
    root = bs.put_index(full)
    chunks = regblocks.distinct(d for d, _ in root)
    blocks = regblocks.distinct(d for d, _ in full)
    assert HOLE not in blocks and len(blocks) == 3000
    blob = IndexBlob(root, locations(len(chunks)), locations(len(blocks)))
    raw = blob.to_bytes()
    back = IndexBlob.from_bytes(raw)
    assert back == blob
    # the locations cost about a byte per block, not the 36 bytes per block of a whole index
    without = IndexBlob(root, locations(len(chunks)), []).to_bytes()
    assert len(raw) - len(without) < 2 * len(blocks)


def test_index_blob_refuses_garbage():
    for raw in (b"", b"LDTRIDX1\nnot zstd", regblocks.INDEX_MAGIC + b"\x28\xb5\x2f\xfd" + os.urandom(40)):
        with pytest.raises(EntryCorrupt, match="malformed"):
            IndexBlob.from_bytes(raw)


def test_manifest_with_many_packs_stays_under_the_registry_limit():
    """A 768 GiB entry in 32 MiB packs names 24576 packs: still under distribution's 4 MiB (a pack
    costs ~143 bytes of manifest: the limit is ~29000 packs, 0.9 TiB of compressed blocks)."""
    config = oci.Blob("sha256:" + "a" * 64, 100)
    files = {f"disk{i}.img": (oci.Blob("sha256:" + pack_name(-i), 5000), {"size": 1 << 40, "sha256": "b" * 64})
             for i in range(4)}
    packs = {pack_name(i): 32 << 20 for i in range(24576)}
    raw = regblocks.image_manifest("bios", "k" * 64, config, files, packs)
    assert len(raw) < oci.MAX_MANIFEST
    parsed = regblocks.parse_manifest(json.loads(raw), "bios", "k" * 64)
    assert parsed.packs == packs and set(parsed.indexes) == set(files)
    with pytest.raises(UserError, match="more than registries take"):
        regblocks.image_manifest("bios", "k", config, files, {pack_name(i): 1 for i in range(40000)})


def test_manifest_is_a_pure_function_and_refuses_another_entry():
    config = oci.Blob("sha256:" + "a" * 64, 100)
    files = {"b": (oci.Blob("sha256:" + "c" * 64, 5), {"size": 1, "sha256": "d" * 64}),
             "a": (oci.Blob("sha256:" + "e" * 64, 5), {"size": 2, "sha256": "f" * 64})}
    one = regblocks.image_manifest("s", "k", config, files, {pack_name(2): 9, pack_name(1): 8})
    two = regblocks.image_manifest("s", "k", config, dict(reversed(files.items())), {pack_name(1): 8, pack_name(2): 9})
    assert one == two
    doc = json.loads(one)
    assert regblocks.is_blocks_manifest(doc)
    with pytest.raises(EntryCorrupt, match="another entry"):
        regblocks.parse_manifest(doc, "s", "other")


def test_ranges_merge_neighbours_and_split_far_ones():
    frames = [(8, 100), (108, 100), (800_000, 50), (208 + regblocks.RANGE_GAP + 1, 10)]
    assert regblocks._ranges(frames) == [(8, 208), (208 + regblocks.RANGE_GAP + 1, 208 + regblocks.RANGE_GAP + 11),
                                         (800_000, 800_050)]
    big = [(i * (1 << 20), 1 << 20) for i in range(20)]  # contiguous, but one request stays bounded
    assert all(b - a <= regblocks.RANGE_MAX for a, b in regblocks._ranges(big))


def test_remote_map_is_per_registry_and_forgets_a_pack(tmp_path):
    bs = BlockStore(tmp_path / "b")
    one, two = RemoteMap(bs, "oci://a/x"), RemoteMap(bs, "oci://b/x")
    d1, d2 = b"\x01" * 32, b"\x02" * 32
    one.add([(d1, Location(pack_name(1), 8, 10, 0)), (d2, Location(pack_name(2), 8, 10, 0))])
    one.add_sizes({pack_name(1): 100})
    assert set(one.known([d1, d2])) == {d1, d2} and not two.known([d1, d2])
    assert one.size(pack_name(1)) == 100 and two.size(pack_name(1)) is None
    one.forget_pack(pack_name(1))
    assert set(one.known([d1, d2])) == {d2} and one.size(pack_name(1)) is None


def test_remote_map_skips_the_blocks_of_a_pack_it_knows_whole(tmp_path):
    """A pull tells the map every block of an entry; the blocks of a pack it learned whole (its
    trailer, or a pack this store wrote) are not written again, and forgetting the pack undoes it."""
    bs = BlockStore(tmp_path / "b")
    rmap = RemoteMap(bs, "oci://a/x")
    p = pack_name(1)
    trailer = [(bytes([i]) * 32, Location(p, 8, 10, i)) for i in range(1, 5)]
    rmap.add(trailer, complete=[p])
    with rmap.db() as con:
        rows = lambda: con.execute("SELECT count(*) FROM map_blocks").fetchone()[0]  # noqa: E731
        assert rows() == 4
        moved = [(bytes([1]) * 32, Location(p, 999, 10, 0))]  # a wrong row for a pack known whole: ignored
        rmap.add(moved + [(b"\x09" * 32, Location(pack_name(2), 8, 10, 0))])
        assert rows() == 5
        assert rmap.locate_many([bytes([1]) * 32])[bytes([1]) * 32].offset == 8
        rmap.forget_pack(p)
        rmap.add(moved)
        assert rows() == 2 and rmap.locate_many([bytes([1]) * 32])[bytes([1]) * 32].offset == 999


def test_put_with_have_writes_only_what_the_registry_lacks(tmp_path):
    bs = BlockStore(tmp_path / "b")
    f = tmp_path / "f"
    data = os.urandom(4096 * 40)
    f.write_bytes(data)
    full = bs.put(f)
    lacking = {d for d, _ in list(full)[:5]}
    made: list = []
    again = bs.put(f, have=lambda ds: [d for d in ds if d not in lacking], made=made)
    assert again == full and again.layout is Layout.FIXED
    assert sorted(d for p in made for d, _ in p.blocks) == sorted(lacking)  # local copies are not the registry's
    assert Index.from_bytes(full.to_bytes()) == full
