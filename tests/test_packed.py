"""store_gc keeps dead entries packed as blocks, and the local step of the one path restores
them (issue 17, local half). Byte counts, not only success."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from conftest import doit, make_project

from pipeline import packs, stages
from pipeline.cache import Keep, Row, Source, Store
from pipeline.entries import MANIFEST, key_of
from pipeline.errors import UserError
from pipeline.packed import parse_size

STAGE = Row("img", 1, "a disk image row")
SNAP = Row("snap", 1, "a snapshot row", keep=Keep.FILES)
ROWS = (STAGE, SNAP)
MIB = 1 << 20


def data(seed: int, size: int = 2 * MIB) -> bytes:
    """Incompressible bytes (so pack sizes are close to the bytes kept)."""
    return random.Random(seed).randbytes(size)


def make(store: Store, row: Row, n: int, files: dict[str, bytes]) -> Path:
    m = {**row.head(), "n": n}

    def build(work: Path, key: str) -> None:
        for name, content in files.items():
            (work / name).write_bytes(content)

    return store.obtain(row, m, build).entry


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_pack_then_restore_is_byte_identical_without_a_build(tmp_path, capsys):
    store = Store(tmp_path / "cache")
    disk = data(1) + bytes(MIB) + data(2, 5000)  # a hole and a partial last block
    e = make(store, STAGE, 1, {"disk.img": disk, "small.json": b'{"a": 1}'})
    records = json.loads((e / MANIFEST).read_text())["files"]
    done = store.collect(ROWS)
    assert done.packed == [e] and done.removed == [e] and not e.exists()
    assert store.packed.has("img", e.name)
    # a revert: the same manifest again -> restored, not built
    got = store.obtain(STAGE, {**STAGE.head(), "n": 1}, lambda work, key: pytest.fail("rebuilt a packed entry"))
    assert got.source is Source.LOCAL and got.entry == e
    assert sha((e / "disk.img").read_bytes()) == records["disk.img"]["sha256"] == sha(disk)
    assert (e / "small.json").read_bytes() == b'{"a": 1}'
    assert json.loads((e / MANIFEST).read_text())["files"] == records
    assert e.stat().st_mode & 0o777 == 0o555 and (e / "disk.img").stat().st_mode & 0o777 == 0o444
    assert "restored from packed blocks" in capsys.readouterr().err
    assert not store.packed.has("img", e.name), "a restored entry is plain again, not kept twice"


def test_two_revisions_sharing_most_blocks_cost_little_more_than_one(tmp_path):
    store = Store(tmp_path / "cache")
    one = data(3, 4 * MIB)
    two = bytearray(one)
    two[MIB:MIB + 10] = b"one edit.."  # one 4 KiB block differs
    e1 = make(store, STAGE, 1, {"disk.img": one})
    store.collect(ROWS)
    after_one = store.packed.blocks.stats().stored
    e2 = make(store, STAGE, 2, {"disk.img": bytes(two)})
    store.collect(ROWS)
    after_two = store.packed.blocks.stats().stored
    assert after_one >= len(one) * 0.99  # random bytes: the pack holds them all
    assert after_two - after_one < 64 << 10, f"the second revision cost {after_two - after_one} bytes"
    fp = store.footprint()
    assert fp.logical == 2 * len(one) and fp.plain == 0
    assert fp.ratio > 1.9, fp
    for n, e, want in ((1, e1, one), (2, e2, bytes(two))):
        got = store.obtain(STAGE, {**STAGE.head(), "n": n}, lambda work, key: pytest.fail("rebuilt"))
        assert (got.entry / "disk.img").read_bytes() == want and got.entry == e


def test_a_damaged_pack_is_one_line_and_a_build(tmp_path, capsys):
    store = Store(tmp_path / "cache")
    e = make(store, STAGE, 1, {"disk.img": data(4)})
    store.collect(ROWS)
    pack = max(store.packed.blocks.packs.glob("*.pack"), key=lambda p: p.stat().st_size)  # the data's, not the index's
    raw = bytearray(pack.read_bytes())
    raw[len(packs.PACK_MAGIC) + 100] ^= 0xFF  # inside the first frame
    os.chmod(pack, 0o644)
    pack.write_bytes(bytes(raw))
    built = []
    got = store.obtain(STAGE, {**STAGE.head(), "n": 1},
                       lambda work, key: built.append(key) or (work / "disk.img").write_bytes(data(4)))
    assert got.source is Source.BUILT and built == [e.name]
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if "packed entry" in ln]
    assert len(warn) == 1 and "damaged" in warn[0] and "Traceback" not in err
    assert not store.packed.has("img", e.name) and not list(store.tmp.iterdir())
    assert (got.entry / "disk.img").read_bytes() == data(4)


def test_a_full_disk_while_packing_keeps_the_plain_entry(tmp_path, monkeypatch, capsys):
    store = Store(tmp_path / "cache")
    e = make(store, STAGE, 1, {"disk.img": data(5)})
    real = packs.PackWriter._write

    def full(self, chunk: bytes) -> None:
        if self.offset > 64 << 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, chunk)

    monkeypatch.setattr(packs.PackWriter, "_write", full)
    done = store.collect(ROWS)
    assert done.kept == [e] and done.removed == [] and done.packed == []
    assert store.lookup("img", e.name) == e and (e / "disk.img").read_bytes() == data(5)
    assert not store.packed.has("img", e.name)
    assert list(store.packed.blocks.packs.glob("*.pack")) == [] and list(store.packed.blocks.tmp.iterdir()) == []
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "space" in ln]
    assert len(lines) == 1 and "the plain entry stays" in lines[0]
    monkeypatch.setattr(packs.PackWriter, "_write", real)
    assert store.collect(ROWS).packed == [e]  # space again: packed next time


def test_max_size_drops_the_oldest_packed_entries_and_their_packs(tmp_path):
    store = Store(tmp_path / "cache")
    entries = []
    for n in range(3):
        entries.append(make(store, STAGE, n, {"disk.img": data(10 + n)}))
        store.collect(ROWS)
    assert [p.key for p in store.packed.entries()] == [e.name for e in entries]
    stored = store.footprint().stored
    assert stored > 3 * 2 * MIB
    done = store.collect(ROWS, max_size=stored - MIB)  # one entry's worth must go: the oldest
    assert [d.key for d in done.budget.dropped] == [entries[0].name]
    assert done.budget.packs_deleted == 2  # its data's pack and its index chunks' pack
    assert 2 * MIB < done.budget.bytes_freed < 2.1 * MIB
    left = store.footprint()
    assert left.stored <= stored - MIB and left.logical == 2 * 2 * MIB
    assert store.lookup("img", entries[0].name) is None
    got = store.obtain(STAGE, {**STAGE.head(), "n": 2}, lambda work, key: pytest.fail("rebuilt"))
    assert (got.entry / "disk.img").read_bytes() == data(12)
    assert store.collect(ROWS, max_size=0).budget.dropped  # 0: every packed entry goes
    assert store.packed.entries() == [] and store.packed.blocks.stats().packs == 0


def test_shared_blocks_outlive_the_entry_dropped(tmp_path):
    """A pack still used by a remaining packed entry is kept whole."""
    store = Store(tmp_path / "cache")
    base = data(20)
    e1 = make(store, STAGE, 1, {"disk.img": base})
    store.collect(ROWS)
    e2 = make(store, STAGE, 2, {"disk.img": base + data(21, 8192)})
    store.collect(ROWS)
    done = store.collect(ROWS, max_size=store.footprint().stored - 1)
    assert [d.key for d in done.budget.dropped] == [e1.name] and done.budget.packs_deleted == 0
    got = store.obtain(STAGE, {**STAGE.head(), "n": 2}, lambda work, key: pytest.fail("rebuilt"))
    assert got.entry == e2 and (e2 / "disk.img").read_bytes() == base + data(21, 8192)


def two_revisions_sharing_a_quarter(store: Store) -> tuple[Path, Path, bytes]:
    """Revision 1 is X + Y, revision 2 is X + Z (X 1 MiB, Y and Z 3 MiB, random): both packed, so
    revision 1's pack holds X, which revision 2 uses, beside its own Y."""
    x = data(40, MIB)
    e1 = make(store, STAGE, 1, {"disk.img": x + data(41, 3 * MIB)})
    store.collect(ROWS)
    e2 = make(store, STAGE, 2, {"disk.img": x + data(42, 3 * MIB)})
    store.collect(ROWS)
    return e1, e2, x + data(42, 3 * MIB)


def test_dropping_the_oldest_revision_frees_its_own_blocks_packed_beside_shared_ones(tmp_path):
    """Its pack is 1/4 live: compacted (the shared quarter copied, the rest freed), so the budget is
    met by dropping revision 1 alone, not revision 2 too."""
    store = Store(tmp_path / "cache")
    e1, e2, two = two_revisions_sharing_a_quarter(store)
    stored = store.footprint().stored
    assert 7 * MIB < stored < 7.2 * MIB  # X, Y and Z once
    done = store.collect(ROWS, max_size=stored - 2 * MIB)
    assert [d.key for d in done.budget.dropped] == [e1.name]
    assert done.budget.packs_compacted == 1 and 2.9 * MIB < done.budget.bytes_freed < 3.2 * MIB
    assert 3.9 * MIB < store.footprint().stored < 4.2 * MIB  # X and Z
    assert store.packed.blocks.verify() == [] and not list(store.packed.blocks.tmp.iterdir())
    got = store.obtain(STAGE, {**STAGE.head(), "n": 2}, lambda work, key: pytest.fail("rebuilt"))
    assert got.entry == e2 and (e2 / "disk.img").read_bytes() == two


def test_a_compaction_that_fails_midway_loses_nothing(tmp_path, monkeypatch, capsys):
    store = Store(tmp_path / "cache")
    e1, e2, two = two_revisions_sharing_a_quarter(store)
    store.packed.drop("img", e1.name)
    real, calls = packs.PackReader.block, []

    def failing(self, d, loc):
        calls.append(d)
        if len(calls) == 100:
            raise packs.BlockCorrupt(f"pack {loc.pack[:12]} is damaged (a test)")
        return real(self, d, loc)

    monkeypatch.setattr(packs.PackReader, "block", failing)
    data_pack = max(store.packed.blocks.packs.glob("*.pack"), key=lambda p: p.stat().st_size)
    done = store.collect(ROWS)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "not compacted" in ln]
    assert len(lines) == 1 and "a test" in lines[0] and done.budget.packs_compacted == 0
    assert data_pack.exists() and not list(store.packed.blocks.tmp.iterdir())  # the copy's unfinished pack went
    monkeypatch.setattr(packs.PackReader, "block", real)
    assert store.collect(ROWS).budget.packs_compacted == 1  # the next store_gc does it
    assert not data_pack.exists()
    got = store.obtain(STAGE, {**STAGE.head(), "n": 2}, lambda work, key: pytest.fail("rebuilt"))
    assert got.entry == e2 and (e2 / "disk.img").read_bytes() == two


def test_entries_of_files_rows_and_unknown_rows_are_deleted_not_packed(tmp_path):
    store = Store(tmp_path / "cache")
    snap = make(store, SNAP, 1, {"vm.ram": data(6, 64 << 10)})
    stray = make(store, Row("stray", 1, "no row of the table"), 1, {"f": b"x"})
    done = store.collect(ROWS)
    assert set(done.removed) == {snap, stray} and done.packed == []
    assert store.packed.entries() == [] and store.footprint().stored == 0


def test_listing_shows_packed_entries_and_logical_and_stored_bytes(tmp_path):
    store = Store(tmp_path / "cache")
    e = make(store, STAGE, 1, {"disk.img": data(7)})
    store.collect(ROWS)
    live = make(store, STAGE, 2, {"disk.img": data(8)})
    store.point("r", "disk.img", live / "disk.img")
    lines = store.listing().splitlines()
    (packed,) = [ln for ln in lines if e.name[:16] in ln]
    assert " packed " in packed and "2.0M" in packed
    (summary,) = [ln for ln in lines if ln.startswith("logical ")]
    assert "logical 4.0M" in summary and "1 packed entries" in summary and "ratio" in summary
    assert lines[-1].startswith("1 local entries")
    fp = store.footprint()
    manifest = (live / MANIFEST).stat().st_size  # the plain entry's manifest.json counts, as in its du
    assert fp.logical == 4 * MIB + manifest and 4 * MIB < fp.stored < 4 * MIB * 1.05


def test_key_of_a_restored_entry_is_its_manifest(tmp_path):
    store = Store(tmp_path / "cache")
    m = {**STAGE.head(), "n": 9}
    e = make(store, STAGE, 9, {"a": b"a"})
    assert e.name == key_of(m)
    store.collect(ROWS)
    assert store.lookup("img", key_of(m)) == e


@pytest.mark.parametrize("text, size", [("4096", 4096), ("20G", 20 << 30), ("1.5M", 3 << 19), ("500MiB", 500 << 20),
                                        ("2k", 2048)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", ""])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="max-size"):
        parse_size(text)


def test_doit_store_gc_packs_then_max_size_drops(tmp_path):
    """The real doit command line: store_gc packs a dead stage entry, `doit store` sums it up,
    --max-size 0 drops it and its packs."""
    project = make_project(tmp_path / "p", {}, seed_store=False)
    store = Store(project / "cache")
    e = make(store, stages.ROW["tgz"], 1, {"rootfs.tgz": data(30)})
    env = {"DOCKER_HOST": "unix:///nonexistent"}
    out = doit("store_gc", cwd=project, env=env).stdout
    assert f"packed {e}" in out and "1 removed (1 of them kept packed)" in out, out
    listing = doit("store", cwd=project, env=env).stdout
    assert " packed " in listing and "logical 2.0M" in listing and "1 packed entries" in listing, listing
    out = doit("store_gc", "--max-size", "0", cwd=project, env=env).stdout
    assert f"dropped packed tgz/{e.name}" in out and "2 unused packs deleted" in out, out
    assert store.packed.entries() == [] and list(store.packed.blocks.packs.glob("*.pack")) == []
    bad = doit("store_gc", "--max-size", "lots", cwd=project, env=env, check=False)
    assert bad.returncode != 0 and "is not a size" in bad.stdout + bad.stderr
