"""The registry's entries counted and collected: `doit store` (the registry's logical and stored
bytes) and `doit store_gc --remote --keep-days N`. The layout is regblocks.py's.

Counting (footprint): every tag of every shared row's repository, its manifest read; logical =
the sizes of the files the entries hold, stored = every distinct blob they name (packs, index
blobs, manifest.json) plus the manifests themselves, each once: what the registry keeps.

Collecting (collect), safe against runners pushing at the same time. The registry tells no push
time, so the gc keeps its own record, in the registry (<prefix>/gc:state, a manifest whose config
is a JSON state): when it first saw each entry, and which packs it has doomed and when. A run at
time T:

  1. reads the state; lists every entry (row tags) and the entry keys published images name
     (`vnd.ldt.keys` of the tags of <prefix>/<recipe>): those are kept whatever their age;
  2. an entry first seen at least keep_days before T, and not published, has its manifest
     deleted (every tag naming it goes with it);
  3. lists the entries again (a push that committed meanwhile counts) and dooms the packs that a
     deleted manifest named and no remaining manifest names: marked with T in the state;
  4. deletes the packs doomed at least GRACE before T that no manifest of step 3 names (from
     <prefix>/blocks and from every repository they were mounted into); a doomed pack some
     manifest names again is no longer doomed;
  5. compacts the packs the remaining entries use only a little of (regcompact.py): their live
     blocks copied into new packs, the entries naming them rewritten, and the old packs doomed;
  6. writes the state; every pack doomed by this run is stamped with the time of this write
     (T plus the run's duration), not T: a pusher reads the state, so the grace runs from the
     moment a pusher can see the doom.

Pushers read the state too (regblocks.push: doomed packs are treated as absent, their blocks
written into new packs). So a pack is deleted only when it was doomed GRACE ago, and every push
that could still name it started before it was doomed: such a push has committed (its manifest is
listed in step 3 of this run, and the pack lives) unless it ran longer than GRACE (6 hours). A
push killed mid-way leaves packs no manifest names; they are not doomed (no deleted manifest
named them) and cost their bytes until a later push names them.

One run at a time: a run marks <prefix>/gc:running (when, which host) before step 1 and removes
the mark when it ends; a run that finds a mark younger than STALE stops with one line. The mark
is best effort (a registry has no compare-and-swap: two runs starting in the same second may both
go on), and it is not what keeps pushers safe: each run deletes a pack only under step 4's rule,
against its own listing, which holds whatever another run does. Two runs at once would waste
work and lose each other's state records (last write wins): a lost doom leaves a pack nothing
names, which distribution's offline garbage-collect frees, and a lost "first seen" delays a
deletion.

Bytes: distribution's DELETE unlinks manifests and blobs; the disk space comes back when its
offline `registry garbage-collect` runs (with the registry read-only, as its docs say).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline import oci, regblocks, regcompact
from pipeline.entries import RemoteUnavailable
from pipeline.errors import UserError
from pipeline.packs import COMPACT_MIN_DEAD, COMPACT_THRESHOLD

GC_REPO = "gc"
STATE_TAG = "state"
STATE_ARTIFACT = "application/vnd.ldt.gc.v1"
STATE_CONFIG = "application/vnd.ldt.gc.state.v1+json"
RUNNING_TAG = "running"
RUNNING_CONFIG = "application/vnd.ldt.gc.running.v1+json"
STALE = 3 * 3600  # a running mark older than this was left by a run that died
GRACE = 6 * 3600  # seconds a doomed pack waits before it is deleted: longer than any push
DAY = 86400


@dataclass(frozen=True)
class RemoteEntry:
    row: str
    key: str
    digest: str  # of its manifest
    manifest_size: int
    logical: int  # its files' bytes
    blobs: Mapping[str, int]  # every blob it names (config, layers, packs): digest -> size
    packs: frozenset[str]  # the pack names among them


@dataclass(frozen=True)
class Footprint:
    entries: int
    logical: int
    stored: int

    @property
    def ratio(self) -> float:
        return self.logical / self.stored if self.stored else 1.0


@dataclass(frozen=True)
class Collected:
    deleted: tuple[RemoteEntry, ...]
    doomed: int  # packs marked this run
    packs_deleted: int
    bytes_freed: int  # of the packs deleted
    kept_published: int
    compacted: regcompact.Compacted = field(default_factory=regcompact.Compacted)


@dataclass
class State:
    seen: dict[str, float] = field(default_factory=dict)  # "row/key" -> first seen
    doomed: dict[str, dict[str, Any]] = field(default_factory=dict)  # pack -> {"at", "size", "repos"}


# -- reading the registry -------------------------------------------------------------------------


def manifest(c: oci.Client, repo: str, ref: str) -> tuple[str, bytes, dict[str, Any]] | None:
    raw = oci.get_manifest(c, repo, ref, f"manifest {repo}:{ref}")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    return "sha256:" + hashlib.sha256(raw).hexdigest(), raw, doc if isinstance(doc, dict) else {}


def entries(c: oci.Client, remote: oci.Remote, rows: Iterable[str]) -> list[RemoteEntry]:
    """Every entry the registry holds for these rows (either layout)."""
    out = []
    for row in rows:
        repo = remote.repository(row)
        for key in oci.tags(c, repo):
            got = manifest(c, repo, key)
            if got is None:
                continue  # deleted since the tag list
            digest, raw, doc = got
            blobs: dict[str, int] = {}
            logical = 0
            packs = set()
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                for d in [doc["config"], *doc.get("layers", [])]:
                    blobs[d["digest"]] = int(d["size"])
                    if d.get("mediaType") == regblocks.PACK_TYPE:
                        packs.add(d["digest"].removeprefix("sha256:"))
                    elif oci.A_SIZE in (d.get("annotations") or {}):
                        logical += int(d["annotations"][oci.A_SIZE])
            out.append(RemoteEntry(row, key, digest, len(raw), logical, blobs, frozenset(packs)))
    return out


def footprint(remote: oci.Remote, rows: Iterable[str], *, env: Mapping[str, str] | None = None) -> Footprint:
    """The registry's logical bytes (the entries' files) and stored bytes (each blob once)."""
    with oci.client(remote, env) as c:
        found = entries(c, remote, rows)
    blobs: dict[str, int] = {}
    for e in found:
        blobs.update(e.blobs)
    return Footprint(len(found), sum(e.logical for e in found),
                     sum(blobs.values()) + sum(e.manifest_size for e in found))


def published_keys(c: oci.Client, remote: oci.Remote, recipes: Iterable[str]) -> set[str]:
    """The entry keys that published images (publish.py: <prefix>/<recipe>) were made from."""
    keys: set[str] = set()
    for recipe in recipes:
        try:
            repo = remote.repository(recipe)
        except ValueError:
            continue
        for tag in oci.tags(c, repo):
            got = manifest(c, repo, tag)
            if got is None:
                continue
            with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):
                keys |= set(json.loads(got[2]["annotations"]["vnd.ldt.keys"]).values())
    return keys


# -- the gc's state -------------------------------------------------------------------------------


def _get_doc(c: oci.Client, repo: str, tag: str) -> tuple[str, dict[str, Any]] | None:
    """A JSON document kept as the config of the manifest `tag` (the state, the running mark):
    (the manifest's digest, the document); None when the tag is absent or unreadable."""
    got = manifest(c, repo, tag)
    if got is None:
        return None
    try:
        doc = json.loads(oci.get_small(c, repo, oci.parse_blob(got[2]["config"]), f"gc {tag}"))
    except (KeyError, TypeError, ValueError):
        return None
    return (got[0], doc) if isinstance(doc, dict) else None


def _put_doc(c: oci.Client, repo: str, tag: str, media_type: str, doc: Mapping[str, Any]) -> str:
    """Keep a JSON document as the config of the manifest `tag`; the manifest's digest."""
    raw = json.dumps(doc, sort_keys=True).encode()
    blob = oci.Blob("sha256:" + hashlib.sha256(raw).hexdigest(), len(raw))
    if not oci.head(c, f"/{repo}/blobs/{blob.digest}"):
        oci.upload_bytes(c, repo, blob, raw)
    body = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "artifactType": STATE_ARTIFACT,
                       "config": oci.descriptor(media_type, blob), "layers": []}).encode()
    c.request("PUT", f"/{repo}/manifests/{tag}", ok=(200, 201), data=body,
              headers={"Content-Type": oci.OCI_MANIFEST}).close()
    return "sha256:" + hashlib.sha256(body).hexdigest()


def read_state(c: oci.Client, remote: oci.Remote) -> State:
    got = _get_doc(c, remote.repository(GC_REPO), STATE_TAG)
    if got is None:
        return State()
    return State(dict(got[1].get("seen", {})), dict(got[1].get("doomed", {})))


def write_state(c: oci.Client, remote: oci.Remote, state: State) -> None:
    _put_doc(c, remote.repository(GC_REPO), STATE_TAG, STATE_CONFIG, {"seen": state.seen, "doomed": state.doomed})


@contextlib.contextmanager
def running(c: oci.Client, remote: oci.Remote) -> Iterator[None]:
    """The block runs as the registry's one store_gc --remote (the mark in the module's docstring);
    UserError when another run's mark is younger than STALE."""
    repo = remote.repository(GC_REPO)
    mine = {"since": time.time(), "host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}

    def refuse_if_other() -> None:
        got = _get_doc(c, repo, RUNNING_TAG)
        if got is None or got[1].get("token") == mine["token"]:
            return
        other = got[1]
        age = time.time() - float(other.get("since", 0))
        if age < STALE:
            raise UserError(f"another `doit store_gc --remote` is running on {remote.host} (started "
                            f"{max(age, 0) / 60:.0f} min ago on {other.get('host', '?')}, pid {other.get('pid', '?')})",
                            hint=f"let it finish; a mark older than {STALE // 3600} hours is taken for a run "
                                 "that died, and ignored")

    refuse_if_other()
    digest = _put_doc(c, repo, RUNNING_TAG, RUNNING_CONFIG, mine)
    try:
        refuse_if_other()  # two runs marked at once: the later write won, the other one stops
        yield
    finally:
        with contextlib.suppress(RemoteUnavailable):
            got = _get_doc(c, repo, RUNNING_TAG)
            if got is not None and got[0] == digest:
                c.request("DELETE", f"/{repo}/manifests/{digest}", ok=(202, 404)).close()


def doomed_packs(c: oci.Client, remote: oci.Remote) -> dict[str, dict[str, int]]:
    """What pushers must not name any more (regblocks.push), each with the new packs a compaction
    copied its live blocks into ({} when it was doomed by a deletion; regblocks.learn_moved)."""
    return {pack: {str(k): int(v) for k, v in dict(info.get("into") or {}).items()}
            for pack, info in read_state(c, remote).doomed.items()}


# -- collecting -----------------------------------------------------------------------------------


def collect(remote: oci.Remote, rows: Iterable[str], recipes: Iterable[str], keep_days: float, *,
            now: float | None = None, grace: float = GRACE, env: Mapping[str, str] | None = None,
            threshold: float = COMPACT_THRESHOLD, min_dead: int = COMPACT_MIN_DEAD) -> Collected:
    """One gc run (the protocol in the module's docstring). `now` may be a fake clock (tests): the
    run's own duration is added to it for the doom stamps."""
    rows = list(rows)
    started = time.monotonic()
    now = time.time() if now is None else now
    with oci.client(remote, env) as c, running(c, remote):
        state = read_state(c, remote)
        listed = entries(c, remote, rows)
        published = published_keys(c, remote, recipes)
        names = {f"{e.row}/{e.key}" for e in listed}
        state.seen = {k: v for k, v in state.seen.items() if k in names}  # deleted by someone else: forgotten
        for name in names:
            state.seen.setdefault(name, now)
        deleted = []
        kept_published = 0
        for e in listed:
            if now - state.seen[f"{e.row}/{e.key}"] < keep_days * DAY:
                continue
            if e.key in published:
                kept_published += 1
                continue
            c.request("DELETE", f"/{remote.repository(e.row)}/manifests/{e.digest}", ok=(202, 404)).close()
            deleted.append(e)
        gone = {f"{e.row}/{e.key}" for e in deleted}
        state.seen = {k: v for k, v in state.seen.items() if k not in gone}
        live_entries = entries(c, remote, rows)
        live = set().union(*(e.packs for e in live_entries)) if live_entries else set()
        fresh: set[str] = set()  # doomed by this run
        for e in deleted:
            for pack in e.packs - live:
                if pack not in state.doomed:
                    state.doomed[pack] = {"at": now, "size": e.blobs.get("sha256:" + pack, 0), "repos": []}
                    fresh.add(pack)
                repos = state.doomed[pack]["repos"]
                if e.row not in repos:
                    repos.append(e.row)
        packs_deleted = freed = 0
        for pack, info in sorted(state.doomed.items()):
            if pack in live:
                del state.doomed[pack]  # named again: not doomed any more
                continue
            if now - info["at"] < grace:
                continue
            for row in [regblocks.BLOCKS_REPO, *info["repos"]]:
                c.request("DELETE", f"/{remote.repository(row)}/blobs/sha256:{pack}", ok=(202, 404)).close()
            del state.doomed[pack]
            packs_deleted += 1
            freed += int(info.get("size", 0))
        try:
            compacted = regcompact.compact(c, remote, [regcompact.Entry(e.row, e.key, e.digest, e.packs)
                                                       for e in live_entries if e.packs],
                                           threshold=threshold, min_dead=min_dead)
        except RemoteUnavailable as e:  # the deletions' dooms must still reach the state
            compacted = regcompact.Compacted(skipped=[f"compaction stopped: {e.message}"])
        for pack, (size, repos) in compacted.packs.items():  # mounted where its entries were, deleted ones too
            repos = sorted(set(repos) | {e.row for e in deleted if pack in e.packs})
            state.doomed[pack] = {"at": now, "size": size, "repos": repos, "into": compacted.into.get(pack, {})}
            fresh.add(pack)
        stamp = now + (time.monotonic() - started)
        for pack in fresh:
            state.doomed[pack]["at"] = stamp
        write_state(c, remote, state)
    return Collected(tuple(deleted), len(fresh) - len(compacted.packs), packs_deleted, freed, kept_published,
                     compacted)


# -- what `doit store` and `doit store_gc --remote` print ---------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def footprint_line(remote: oci.Remote, rows: Iterable[str], *, env: Mapping[str, str] | None = None) -> str:
    """One line for `doit store`: the registry's entries, logical and stored bytes, the ratio."""
    try:
        fp = footprint(remote, rows, env=env)
    except RemoteUnavailable as e:
        return f"registry {remote}: not counted ({e.message})"
    return (f"registry {remote}: {fp.entries} entries, logical {human(fp.logical)}, stored {human(fp.stored)}, "
            f"ratio {fp.ratio:.2f}x")


def collected_lines(remote: oci.Remote, done: Collected, keep_days: float) -> list[str]:
    lines = [f"deleted {e.row}:{e.key[:12]} from {remote}" for e in done.deleted]
    lines.append(f"{len(done.deleted)} registry entries older than {keep_days:g} days deleted "
                 f"({done.kept_published} kept: published images name them); {done.doomed} packs doomed "
                 f"(deleted after {GRACE // 3600} hours unless an entry names them again), {done.packs_deleted} "
                 f"doomed packs deleted ({human(done.bytes_freed)})")
    lines += compacted_lines(done.compacted)
    return lines


def compacted_lines(done: regcompact.Compacted) -> list[str]:
    """One line (and one per pack or entry left as it was)."""
    if not done.packs and not done.skipped:
        return []
    lines = done.skipped[:]
    lines.append(f"compacted {len(done.packs)} mostly unused packs ({human(done.before)}, "
                 f"{human(done.live)} of it live) into {done.new_packs} new packs ({human(done.new_bytes)}): "
                 f"{done.entries} entries rewritten, the old packs doomed")
    return lines
