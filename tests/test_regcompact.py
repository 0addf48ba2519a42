"""pipeline.regcompact's planning (which packs are rewritten, which blocks move) over real pack
files, and its copying through a fake registry that serves a pack's bytes by Range."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from pipeline import regblocks, regcompact, reggc
from pipeline.blocks import BlockCorrupt
from pipeline.packs import BlockStore, Location, Made, read_trailer
from pipeline.regcompact import PackPlan, candidates, mark, plan_pack, relocate, spans

KIB4 = 4096


def one_pack(tmp_path: Path, n: int, name: str = "src") -> tuple[Made, Path, list[bytes]]:
    """A pack of n incompressible blocks (16 to a frame), as a pusher writes it."""
    bs = BlockStore(tmp_path / name)
    data = [os.urandom(KIB4) for _ in range(n)]
    with bs.db() as con, bs.writer(con) as w:
        for block in data:
            w.add(hashlib.sha256(block).digest(), block)
    (made,) = w.finished
    return made, bs.pack_path(made.name), data


def live_of(made: Made, picked: range) -> dict[str, regcompact.Frames]:
    live: dict[str, regcompact.Frames] = {}
    mark(live, [made.blocks[i][1] for i in picked])
    return live


def test_a_pack_mostly_unused_is_picked_and_only_its_live_blocks_move(tmp_path):
    made, path, _ = one_pack(tmp_path, 64)  # 4 frames
    live = live_of(made, range(16, 32))  # the second frame only: a quarter
    assert candidates(live, {made.name: made.size}, min_dead=0) == [made.name]
    plan = plan_pack(made.name, made.size, live[made.name], read_trailer(path), min_dead=0)
    assert plan is not None
    assert [d for d, _ in plan.moves] == [d for d, _ in made.blocks[16:32]]  # in pack order
    frame = made.blocks[16][1]
    assert plan.live == frame.length and plan.live < made.size / 4


@pytest.mark.parametrize(("picked", "min_dead"), [(range(0, 40), 0),  # 40 of 64 blocks live: more than half
                                                   (range(0, 16), 1 << 20)])  # 192 KiB to free: too little
def test_a_pack_mostly_used_or_with_little_to_free_stays(tmp_path, picked, min_dead):
    made, path, _ = one_pack(tmp_path, 64)
    live = live_of(made, picked)
    assert candidates(live, {made.name: made.size}, min_dead=min_dead) == []
    assert plan_pack(made.name, made.size, live[made.name], read_trailer(path), min_dead=min_dead) is None


def test_the_frame_bound_only_preselects_the_trailer_decides(tmp_path):
    """A pack of 17 blocks: a full frame and a frame of one. The last frame live and one block of the
    first: the frames alone (at most 16 blocks each) say under half, the trailer says the last frame
    is all live; still under half of the pack: picked, with those two blocks."""
    made, path, _ = one_pack(tmp_path, 17)
    live = live_of(made, range(15, 17))
    assert candidates(live, {made.name: made.size}, min_dead=0) == [made.name]
    plan = plan_pack(made.name, made.size, live[made.name], read_trailer(path), min_dead=0)
    assert plan is not None and len(plan.moves) == 2
    first, last = made.blocks[0][1], made.blocks[16][1]
    assert plan.live == round(first.length / 16 + last.length)
    # the last frame's one block weighs a whole frame: more than the 1/16 the bound assumed
    assert regcompact.live_lower_bound(live[made.name]) < plan.live


def test_an_index_naming_a_slot_the_pack_lacks_leaves_the_pack_alone(tmp_path):
    made, path, _ = one_pack(tmp_path, 20)
    live = live_of(made, range(16, 17))
    frame = made.blocks[16][1]
    mark(live, [frame._replace(slot=9)])  # the last frame holds 4 blocks: no slot 9
    assert plan_pack(made.name, made.size, live[made.name], read_trailer(path), min_dead=0) is None


def test_relocate_moves_only_the_moved_blocks():
    old, kept = Location("a" * 64, 8, 100, 3), Location("b" * 64, 8, 100, 3)
    d = b"\x01" * 32
    to = Location("c" * 64, 8, 50, 0)
    assert relocate([old, kept, old], {("a" * 64, 8, 3): d}, {d: to}) == [to, kept, to]


def test_spans_merge_neighbouring_frames_up_to_the_request_limit():
    gap, most = regblocks.RANGE_GAP, regblocks.RANGE_MAX
    assert spans([(100, 10), (8, 50), (58, 42)]) == [(8, 110)]
    assert spans([(8, 10), (18 + gap + 1, 10)]) == [(8, 18), (19 + gap, 29 + gap)]
    assert spans([(0, most), (most, 10)]) == [(0, most), (most, most + 10)]


class FakeRaw(io.BytesIO):
    def read(self, n: int | None = -1, decode_content: bool = True) -> bytes:  # urllib3's signature
        return super().read(n)


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.status_code, self.headers = status, headers or {}
        self.raw = FakeRaw(body)

    def close(self) -> None:
        pass


class FakeRegistry:
    """The blobs of one repository, served whole or by Range (or never by Range: a 200)."""

    remote = regcompact.oci.Remote.parse("oci://fake:1/ldt")

    def __init__(self, blobs: dict[str, bytes], ranges: bool = True) -> None:
        self.blobs, self.ranges, self.calls = blobs, ranges, []

    def request(self, method: str, url: str, *, ok, stream=False, headers=None, **kwargs):
        self.calls.append((method, url, (headers or {}).get("Range")))
        digest = url.rsplit("/", 1)[-1].removeprefix("sha256:")
        data = self.blobs.get(digest)
        if method == "HEAD":
            return FakeResponse(200 if data is not None else 404)
        assert method == "GET" and data is not None
        rng = (headers or {}).get("Range")
        if not rng or not self.ranges:
            return FakeResponse(200, data)
        start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        return FakeResponse(206, data[start:end + 1])


def test_copy_reads_the_live_frames_by_range_and_writes_only_live_blocks(tmp_path):
    a, a_path, _ = one_pack(tmp_path, 64, "a")
    b, b_path, _ = one_pack(tmp_path, 48, "b")
    reg = FakeRegistry({a.name: a_path.read_bytes(), b.name: b_path.read_bytes()})
    plans = []
    for made, path, picked in ((a, a_path, range(0, 3)), (b, b_path, range(40, 48))):
        live = live_of(made, picked)
        trailer = regblocks.remote_trailer(reg, "r/blocks", made.name, made.size)
        assert trailer == read_trailer(path)
        plan = plan_pack(made.name, made.size, live[made.name], trailer, min_dead=0)
        assert plan is not None
        plans.append(plan)
    headed = []
    serve = reg.request

    def request(method, url, **kw):  # a new pack is HEADed before its upload: the fake says "present"
        if method == "HEAD" and url.rsplit(":", 1)[-1] not in reg.blobs:
            headed.append(url.rsplit(":", 1)[-1])
            return FakeResponse(200)
        return serve(method, url, **kw)

    reg.request = request
    new, made, failed = regcompact._copy(reg, "r/blocks", BlockStore(tmp_path / "scratch"), plans)
    assert failed == {} and len(made) == 1 and headed == [made[0].name]
    want = [d for d, _ in a.blocks[0:3]] + [d for d, _ in b.blocks[40:48]]
    assert [d for d, _ in made[0].blocks] == want  # the live blocks, nothing else, in plan order
    assert set(new) == set(want) and all(loc.pack == made[0].name for loc in new.values())
    ranges = [r for m, _, r in reg.calls if m == "GET" and r]
    assert len(ranges) == 2 * 2 + 2  # footer and trailer of each pack, then one span of frames each
    assert not (tmp_path / "scratch" / "packs" / f"{made[0].name}.pack").exists()  # uploaded, then removed


def test_a_damaged_or_range_less_pack_is_left_as_it_is(tmp_path):
    made, path, _ = one_pack(tmp_path, 32)
    raw = bytearray(path.read_bytes())
    plan = plan_pack(made.name, made.size, live_of(made, range(0, 4))[made.name], read_trailer(path), min_dead=0)
    assert isinstance(plan, PackPlan)
    raw[20] ^= 0xFF  # inside the first frame
    new, done, failed = regcompact._copy(FakeRegistry({made.name: bytes(raw)}), "r/blocks",
                                         BlockStore(tmp_path / "scratch"), [plan])
    assert new == {} and done == [] and "damaged" in failed[made.name]
    with pytest.raises(BlockCorrupt, match="ignores Range"):
        regblocks.remote_trailer(FakeRegistry({made.name: path.read_bytes()}, ranges=False), "r/blocks", made.name,
                            made.size)
    raw = bytearray(path.read_bytes())
    raw[-FOOTER_AT] ^= 0xFF  # in the trailer
    with pytest.raises(BlockCorrupt, match="trailer"):
        regblocks.remote_trailer(FakeRegistry({made.name: bytes(raw)}), "r/blocks", made.name, made.size)


FOOTER_AT = 60  # bytes from a pack's end: inside its trailer (the footer is 52)


def test_store_gc_prints_what_it_compacted_in_one_line():
    done = regcompact.Compacted(packs={"a" * 64: (3 << 20, ["row"]), "b" * 64: (1 << 20, ["row"])},
                                live=1 << 20, new_packs=1, new_bytes=(1 << 20) + 100, entries=2)
    (line,) = reggc.compacted_lines(done)
    assert line == ("compacted 2 mostly unused packs (4.0M, 1.0M of it live) into 1 new packs (1.0M): "
                    "2 entries rewritten, the old packs doomed")
    assert reggc.compacted_lines(regcompact.Compacted()) == []


def test_a_pack_an_unreadable_entry_names_is_left_whole(tmp_path, monkeypatch):
    """Which blocks an entry uses is known only from its index blobs: when one cannot be read, no
    pack it names is compacted, however little the others use of it."""
    made, path, _ = one_pack(tmp_path, 128)
    parsed = regblocks.Parsed(None, {"f": None}, {made.name: made.size})  # type: ignore[arg-type]
    good = regcompact.Entry("row", "good", "sha256:" + "1" * 64, frozenset([made.name]))
    bad = regcompact.Entry("row", "bad", "sha256:" + "2" * 64, frozenset([made.name]))

    def read_entry(c, remote, e):
        return regcompact._Read(e, "r/row", {}, parsed)

    def index_blob(c, r, name, blob):
        if r.entry is bad:
            raise regcompact.EntryCorrupt("a remote block index is malformed (ValueError)")
        return regblocks.IndexBlob(None, [], [loc for _, loc in made.blocks[:8]])  # type: ignore[arg-type]

    copied = []

    def copy(c, repo, bs, plans):
        copied.extend(p.pack for p in plans)
        return {}, [], {p.pack: "stopped here" for p in plans}

    monkeypatch.setattr(regcompact, "_read_entry", read_entry)
    monkeypatch.setattr(regcompact, "_index_blob", index_blob)
    monkeypatch.setattr(regblocks, "remote_trailer", lambda c, repo, pack, size: read_trailer(path))
    monkeypatch.setattr(regcompact, "_copy", copy)
    r = regcompact.oci.Remote.parse("oci://127.0.0.1:1/ldt")
    done = regcompact.compact(None, r, [good, bad], min_dead=0)  # type: ignore[arg-type]
    assert copied == [] and done.packs == {} and "bad not read" in done.skipped[0]
    done = regcompact.compact(None, r, [good], min_dead=0)  # type: ignore[arg-type]
    assert copied == [made.name] and done.packs == {} and done.skipped == [
        f"pack {made.name[:12]} not compacted: stopped here"]


@pytest.mark.parametrize("fails", [(), ("two",), ("one", "registry down")])
def test_an_old_pack_is_doomed_only_when_every_entry_naming_it_was_rewritten(tmp_path, monkeypatch, fails):
    made, path, _ = one_pack(tmp_path, 128)
    parsed = regblocks.Parsed(None, {"f": None}, {made.name: made.size})  # type: ignore[arg-type]
    listed = [regcompact.Entry("row", k, "sha256:" + str(i) * 64, frozenset([made.name]))
              for i, k in enumerate(("one", "two"), 1)]
    monkeypatch.setattr(regcompact, "_read_entry", lambda c, remote, e: regcompact._Read(e, "r/row", {}, parsed))
    monkeypatch.setattr(regcompact, "_index_blob", lambda c, r, name, blob: regblocks.IndexBlob(
        None, [], [loc for _, loc in made.blocks[:8]]))  # type: ignore[arg-type]
    monkeypatch.setattr(regblocks, "remote_trailer", lambda c, repo, pack, size: read_trailer(path))
    q = Made("q" * 64, 1000, ())
    monkeypatch.setattr(regcompact, "_copy", lambda c, repo, bs, plans: ({}, [q], {}))
    rewritten = []

    def rewrite(c, r, moved, new, new_sizes, blocks_repo):
        assert set(moved.values()) == {d for d, _ in made.blocks[:8]} and new_sizes == {q.name: q.size}
        if r.entry.key in fails:
            raise (regcompact.RemoteUnavailable("remote store h unreachable") if "registry down" in fails
                   else regcompact.UserError("its tag changed while the gc ran"))
        rewritten.append(r.entry.key)

    monkeypatch.setattr(regcompact, "_rewrite", rewrite)
    done = regcompact.compact(None, regcompact.oci.Remote.parse("oci://h:1/ldt"), listed,  # type: ignore[arg-type]
                              min_dead=0)
    assert (done.new_packs, done.new_bytes) == (1, 1000)
    if not fails:
        assert rewritten == ["one", "two"] and done.packs == {made.name: (made.size, ["row"])}
        assert done.live == round(made.blocks[0][1].length / 2)  # 8 of the first frame's 16 blocks
    else:
        assert done.packs == {} and len(done.skipped) == 1
        assert rewritten == ([] if "registry down" in fails else ["one"])


def test_doit_store_gc_remote_passes_the_recipe_names_and_prints_the_compaction(tmp_path, monkeypatch, capsys):
    from pipeline import graph

    (tmp_path / "recipes").mkdir()
    monkeypatch.setenv("LDT_REMOTE", "oci://127.0.0.1:1/ldt")
    seen = {}

    def collect(remote, rows, recipes, keep_days):
        seen.update(recipes=recipes, keep_days=keep_days)
        return reggc.Collected((), 0, 0, 0, 0, regcompact.Compacted(
            packs={"a" * 64: (2 << 20, ["row"])}, live=1 << 19, new_packs=1, new_bytes=1 << 19, entries=1))

    monkeypatch.setattr(reggc, "collect", collect)
    assert graph.store_gc_action(str(tmp_path), remote=True, keep_days=3) is None
    assert seen == {"recipes": [], "keep_days": 3}
    assert capsys.readouterr().out.splitlines()[-1].startswith("compacted 1 mostly unused packs (2.0M, 512.0K")
