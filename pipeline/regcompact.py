"""Compacting the registry's packs (`doit store_gc --remote`, after reggc's deletions).

A pack is deleted whole or kept whole (reggc.py), so once the entries that used most of a pack
are gone, the few blocks the remaining entries still name keep the whole pack alive. A run:

  1. reads every remaining entry's index blobs (regblocks.IndexBlob: where each block it needs
     is) and marks, per pack frame, the slots some entry names: the live blocks;
  2. picks the packs whose live bytes are under COMPACT_THRESHOLD of their bytes (and that would
     free at least COMPACT_MIN_DEAD; both in packs.py, shared with the local compaction): a first
     bound from the frames alone (a frame holds at most FRAME_BLOCKS blocks), then exactly from
     the pack's trailer (two small Range requests, the trailer checked against the footer's sha256);
  3. copies the live blocks of those packs, frame by frame (Range requests on the pack blob,
     each block checked against its digest as it is copied), into new packs written by a
     packs.PackWriter in a scratch folder; each new pack is uploaded to <prefix>/blocks as soon
     as it is closed (a pack no manifest names is harmless) and its local file removed;
  4. rewrites every entry that named a picked pack: new index blobs (the same root index, so the
     same digests and the same file; only locations change), the new packs mounted into its
     repository, a new manifest PUT under the same tag (only if the tag still names the manifest
     read in step 1), then the old manifest deleted by digest so distribution's offline
     garbage-collect can free the old pack;
  5. returns the picked packs that no manifest names any more: reggc dooms them, and its grace
     protocol deletes them GRACE later if no manifest names them then.

Why COMPACT_THRESHOLD = 0.5: compaction uploads the live bytes again to free the dead ones, so at < 50 %
live every byte copied frees more than a byte, and a block is copied again only after its new
pack is itself half dead: the copying work stays below the bytes it frees (a copying collector's
usual bound). A pull is not slowed by dead bytes (it reads frames by Range), so there is no reason
to compact sooner. COMPACT_MIN_DEAD: a rewrite costs a new index blob per file and a manifest per entry
naming the pack (a few KiB each) and a request per frame range: not worth it for a few blocks.

Memory: one Range request's bytes at a time (at most RANGE_MAX) and one frame, one pack's
trailer, the live slots as one bitmask per frame, one index blob's locations, and the
digest -> new location of the blocks copied (about 100 bytes each).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import oci, regblocks
from pipeline.blocks import BlockCorrupt
from pipeline.entries import EntryCorrupt, RemoteUnavailable
from pipeline.errors import UserError
from pipeline.packs import (
    COMPACT_MIN_DEAD,
    COMPACT_THRESHOLD,
    FRAME_BLOCKS,
    BlockStore,
    Location,
    Made,
    block_of,
    decompress_frame,
)

PENDING = Location("", 0, 0, 0)  # a copied block whose new pack is not closed yet

Frames = dict[tuple[int, int], int]  # (frame offset, frame length) -> bitmask of the live slots


# -- planning (pure) ------------------------------------------------------------------------------


def mark(live: dict[str, Frames], locations: Iterable[Location]) -> None:
    """Note these block locations as live."""
    for loc in locations:
        frames = live.setdefault(loc.pack, {})
        key = (loc.offset, loc.length)
        frames[key] = frames.get(key, 0) | (1 << loc.slot)


def live_lower_bound(frames: Frames) -> float:
    """The least the live blocks can weigh: a frame holds at most FRAME_BLOCKS blocks, each its share."""
    return sum(length * bin(mask).count("1") / FRAME_BLOCKS for (_, length), mask in frames.items())


def candidates(live: Mapping[str, Frames], sizes: Mapping[str, int], threshold: float = COMPACT_THRESHOLD,
               min_dead: int = COMPACT_MIN_DEAD) -> list[str]:
    """The packs that may be worth rewriting, from the index blobs alone (no pack read)."""
    out = []
    for pack, frames in sorted(live.items()):
        size = sizes.get(pack, 0)
        low = live_lower_bound(frames)
        if size and low < threshold * size and size - low >= min_dead:
            out.append(pack)
    return out


@dataclass(frozen=True)
class PackPlan:
    pack: str
    size: int
    live: int  # bytes: each live block's share of its frame
    moves: tuple[tuple[bytes, Location], ...]  # the live blocks, in pack order


def plan_pack(pack: str, size: int, frames: Frames, trailer: list[tuple[bytes, Location]],
              threshold: float = COMPACT_THRESHOLD, min_dead: int = COMPACT_MIN_DEAD) -> PackPlan | None:
    """The exact decision for one pack, with its trailer: None when it stays as it is (mostly live,
    too little to free, or an entry names a block the trailer lacks: nothing is moved then)."""
    slots: dict[tuple[int, int], int] = {}
    for _, loc in trailer:
        key = (loc.offset, loc.length)
        slots[key] = slots.get(key, 0) + 1
    named = {(loc.offset, loc.length, loc.slot) for _, loc in trailer}
    for (off, length), mask in frames.items():
        if any(mask >> s & 1 and (off, length, s) not in named for s in range(mask.bit_length())):
            return None
    moves = tuple((d, loc) for d, loc in trailer if frames.get((loc.offset, loc.length), 0) >> loc.slot & 1)
    live = round(sum(loc.length / slots[(loc.offset, loc.length)] for _, loc in moves))
    if live >= threshold * size or size - live < min_dead:
        return None
    return PackPlan(pack, size, live, moves)


def relocate(locs: list[Location], moved: Mapping[tuple[str, int, int], bytes],
             new: Mapping[bytes, Location]) -> list[Location]:
    """An index blob's locations with the moved blocks at their new place."""
    return [new[moved[(loc.pack, loc.offset, loc.slot)]] if (loc.pack, loc.offset, loc.slot) in moved else loc
            for loc in locs]


def spans(frames: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Frames (offset, length) merged into Range requests (start, end exclusive), as a pull does."""
    out: list[list[int]] = []
    for off, length in sorted(set(frames)):
        if out and off - out[-1][1] <= regblocks.RANGE_GAP and off + length - out[-1][0] <= regblocks.RANGE_MAX:
            out[-1][1] = max(out[-1][1], off + length)
        else:
            out.append([off, off + length])
    return [(a, b) for a, b in out]


# -- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    row: str
    key: str
    digest: str  # of the manifest the listing read
    packs: frozenset[str]  # the packs it names: not touched if its index blobs cannot be read


@dataclass
class Compacted:
    packs: dict[str, tuple[int, list[str]]] = field(default_factory=dict)  # old pack -> (bytes, rows it was in)
    live: int = 0  # bytes of the old packs' live blocks (their frames' shares)
    new_packs: int = 0
    new_bytes: int = 0
    entries: int = 0  # manifests rewritten
    skipped: list[str] = field(default_factory=list)  # one line each: what was left as it was, and why
    into: dict[str, dict[str, int]] = field(default_factory=dict)  # old pack -> {new pack: its bytes}

    @property
    def before(self) -> int:
        return sum(size for size, _ in self.packs.values())


@dataclass
class _Read:
    entry: Entry
    repo: str
    doc: dict[str, Any]
    parsed: regblocks.Parsed


def compact(c: oci.Client, remote: oci.Remote, listed: Iterable[Entry], *, threshold: float = COMPACT_THRESHOLD,
            min_dead: int = COMPACT_MIN_DEAD) -> Compacted:
    """Steps 1-4 of the module's docstring; the old packs to doom are in the result."""
    done = Compacted()
    read: list[_Read] = []
    live: dict[str, Frames] = {}
    sizes: dict[str, int] = {}
    untouchable: set[str] = set()  # named by an entry whose blocks are not known: used whole
    for e in listed:
        got = _read_entry(c, remote, e)
        if got is None:
            untouchable |= e.packs
            continue
        try:
            for name, blob in sorted(got.parsed.indexes.items()):
                ib = _index_blob(c, got, name, blob)
                mark(live, ib.chunks)
                mark(live, ib.blocks)
        except EntryCorrupt as why:
            done.skipped.append(f"{e.row}:{e.key[:12]} not read, its packs left as they are: {why.message}")
            untouchable |= e.packs | set(got.parsed.packs)
            continue
        read.append(got)
        sizes.update(got.parsed.packs)
    blocks_repo = remote.repository(regblocks.BLOCKS_REPO)
    plans: list[PackPlan] = []
    for pack in candidates(live, sizes, threshold, min_dead):
        if pack in untouchable:
            continue
        try:
            trailer = regblocks.remote_trailer(c, blocks_repo, pack, sizes[pack])
        except BlockCorrupt as e:
            done.skipped.append(f"pack {pack[:12]} not compacted: {e.message}")
            continue
        plan = plan_pack(pack, sizes[pack], live[pack], trailer, threshold, min_dead)
        if plan is not None:
            plans.append(plan)
    live.clear()
    if not plans:
        return done
    with tempfile.TemporaryDirectory(prefix="ldt-compact-") as tmp:
        new, made, failed = _copy(c, blocks_repo, BlockStore(Path(tmp)), plans)
    done.skipped += [f"pack {pack[:12]} not compacted: {why}" for pack, why in sorted(failed.items())]
    done.new_packs, done.new_bytes = len(made), sum(m.size for m in made)
    picked = {p.pack: p for p in plans if p.pack not in failed}
    moved = {(p.pack, loc.offset, loc.slot): d for p in picked.values() for d, loc in p.moves}
    new_sizes = {m.name: m.size for m in made}
    still_named: set[str] = set()  # by an entry left as it was: those packs are not doomed
    affected = [r for r in read if set(r.parsed.packs) & set(picked)]
    for i, r in enumerate(affected):
        try:
            _rewrite(c, r, moved, new, new_sizes, blocks_repo)
            done.entries += 1
        except RemoteUnavailable as e:  # the registry went away: the rest stay as they are
            done.skipped.append(f"compaction stopped at {r.entry.row}:{r.entry.key[:12]}: {e.message}")
            still_named.update(*(set(x.parsed.packs) for x in affected[i:]))
            break
        except UserError as e:  # a manifest over 4 MiB, a tag that moved, a malformed index
            done.skipped.append(f"{r.entry.row}:{r.entry.key[:12]} not rewritten: {e.message}")
            still_named |= set(r.parsed.packs)
    for p in picked.values():
        if p.pack in still_named:
            continue
        rows = sorted({r.entry.row for r in read if p.pack in r.parsed.packs})
        done.packs[p.pack] = (p.size, rows)
        done.into[p.pack] = {new[d].pack: new_sizes[new[d].pack] for d, _ in p.moves if d in new}
        done.live += p.live
    return done


def _read_entry(c: oci.Client, remote: oci.Remote, e: Entry) -> _Read | None:
    repo = remote.repository(e.row)
    raw = oci.get_manifest(c, repo, e.digest, f"manifest {repo}@{e.digest}")
    if raw is None or "sha256:" + hashlib.sha256(raw).hexdigest() != e.digest:
        return None  # deleted (or not what its digest says): nothing to rewrite
    try:
        doc = json.loads(raw)
        if not regblocks.is_blocks_manifest(doc):
            return None  # the first layout names no packs
        return _Read(e, repo, doc, regblocks.parse_manifest(doc, e.row, e.key))
    except (ValueError, AttributeError, EntryCorrupt):
        return None  # not ours to rewrite: the packs it names are left whole


def _index_blob(c: oci.Client, r: _Read, name: str, blob: oci.Blob) -> regblocks.IndexBlob:
    data = oci.get_small(c, r.repo, blob, f"block index of {r.entry.row}:{r.entry.key} {name}", regblocks.MAX_INDEX)
    return regblocks.IndexBlob.from_bytes(data)


def _copy(c: oci.Client, blocks_repo: str, bs: BlockStore,
          plans: list[PackPlan]) -> tuple[dict[bytes, Location], list[Made], dict[str, str]]:
    """The live blocks of every plan into new packs, each uploaded when closed: (digest -> new
    location, the new packs, pack -> why it was left as it is). Streamed: one Range request's
    bytes and one frame at a time. A pack found damaged half-way is left whole (what was copied
    of it stays in the new pack, unnamed blocks that cost their bytes)."""
    new: dict[bytes, Location] = {}
    made: list[Made] = []
    failed: dict[str, str] = {}
    with bs.db() as con, bs.writer(con) as writer:
        for plan in plans:
            frames: dict[tuple[int, int], list[tuple[bytes, Location]]] = {}
            for d, loc in plan.moves:
                frames.setdefault((loc.offset, loc.length), []).append((d, loc))
            try:
                for start, end in spans(frames):
                    data = regblocks.get_range(c, blocks_repo, plan.pack, start, end)
                    for (off, length), moves in sorted(frames.items()):
                        if start <= off and off + length <= end:
                            frame = decompress_frame(data[off - start:off - start + length], moves[0][1])
                            for d, loc in moves:
                                block = block_of(frame, d, loc)  # checked against its digest as it is copied
                                if d not in new:
                                    new[d] = PENDING
                                    writer.add(d, block)
                    _upload_finished(c, blocks_repo, bs, writer.finished, made, new)
            except BlockCorrupt as e:
                failed[plan.pack] = e.message
        writer.finish_pack()
        _upload_finished(c, blocks_repo, bs, writer.finished, made, new)
    return new, made, failed


def _upload_finished(c: oci.Client, blocks_repo: str, bs: BlockStore, finished: list[Made], made: list[Made],
                     new: dict[bytes, Location]) -> None:
    for m in finished[len(made):]:
        path = bs.pack_path(m.name)
        if not oci.head(c, f"/{blocks_repo}/blobs/sha256:{m.name}"):
            oci.upload_file(c, blocks_repo, oci.Blob("sha256:" + m.name, m.size), path)
        path.unlink()
        new.update(m.blocks)
        made.append(m)


def _rewrite(c: oci.Client, r: _Read, moved: Mapping[tuple[str, int, int], bytes], new: Mapping[bytes, Location],
             new_sizes: Mapping[str, int], blocks_repo: str) -> None:
    """An entry's index blobs and manifest naming the new packs; the old manifest deleted."""
    e = r.entry
    layers: dict[str, tuple[oci.Blob, Mapping[str, Any]]] = {}
    blobs: dict[str, bytes] = {}
    packs: dict[str, int] = {}
    records = {d["annotations"][oci.TITLE]: {"size": int(d["annotations"][oci.A_SIZE]),
                                             "sha256": d["annotations"][oci.A_SHA256]}
               for d in r.doc["layers"] if d["mediaType"] == regblocks.INDEX_TYPE}
    for name, blob in sorted(r.parsed.indexes.items()):
        old = _index_blob(c, r, name, blob)
        ib = regblocks.IndexBlob(old.root, relocate(old.chunks, moved, new), relocate(old.blocks, moved, new))
        data = ib.to_bytes()
        layer = oci.Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        layers[name], blobs[layer.digest] = (layer, records[name]), data
        for p in ib.packs():
            size = new_sizes.get(p) or r.parsed.packs.get(p)
            if size is None:
                raise EntryCorrupt(f"its index of {name} names pack {p[:12]}, its manifest does not")
            packs[p] = size
    raw = regblocks.image_manifest(e.row, e.key, r.parsed.config, layers, packs)  # UserError past 4 MiB
    for p in sorted(packs):
        digest = "sha256:" + p
        if not oci.head(c, f"/{r.repo}/blobs/{digest}") and not oci.mount(c, r.repo, digest, blocks_repo):
            raise EntryCorrupt(f"pack {p[:12]} could not be mounted into {r.repo}")
    for digest, data in sorted(blobs.items()):
        if not oci.head(c, f"/{r.repo}/blobs/{digest}"):
            oci.upload_bytes(c, r.repo, oci.Blob(digest, len(data)), data)
    h = c.request("HEAD", f"/{r.repo}/manifests/{e.key}", ok=(200, 404), headers={"Accept": oci.OCI_MANIFEST})
    h.close()
    if h.status_code != 200 or h.headers.get("Docker-Content-Digest") != e.digest:
        raise EntryCorrupt("its tag changed while the gc ran")
    c.request("PUT", f"/{r.repo}/manifests/{e.key}", ok=(200, 201), data=raw,
              headers={"Content-Type": oci.OCI_MANIFEST}).close()
    c.request("DELETE", f"/{r.repo}/manifests/{e.digest}", ok=(202, 404)).close()

