"""The content-hash store under cache/: its rows, the one path every entry takes, and doit's
xxhash file checker.

Layout:
    cache/store/<row>/<key>/          immutable entries: the artifact files + manifest.json
    cache/recipes/<name>/<artifact>   stable paths (doit targets): symlinks to the current entry
    cache/tmp/                        work dirs; never taken for a finished entry
    cache/locks/                      one lock file per key being made (one maker per key)

Every kind of entry is a Row (the table is stages.ROWS: the recipe stages, boot passes, VM
snapshots, pulled images), and every row's entries come through one path, Store.obtain():

    local entry (verified) -> the shared store (pulled, verified while it streams)
        -> built here, atomically -> pushed          (a row that is not `shared` skips the registry;
                                                      an `only_passes` row stores a passed result only)

obtain() is the one caller of those steps (lookup, pull, build, push_entry): the stages, boot
passes (vm.check_one), virt snapshots (resume.prepare) and pulled images all come through it.
The block layer (issue 17) plugs in at the local step: lookup() finds a packed entry too; and at
the registry: pull and push move blocks through the store's block store (cache/blocks/), so a
pull fetches only the blocks this machine lacks and a push sends only what the registry lacks
(regblocks.py).

An entry is built in cache/tmp/ and renamed into place, so an interrupted build (Ctrl-C,
kill -9, full disk) leaves at most a work dir that lookups never see. Its manifest.json holds
the inputs (whose hash is the key) and, under "files", each file's size and sha256 (the OCI
registry's own digest, so a pulled entry is checked end to end). Entries are read-only once
stored; one changed afterwards is found before it is used (verify(): size, and a rehash when
a file is newer than the manifest written last), evicted with one line, and made again.

The shared store (an OCI registry, remote.RegistryStore) is handed in by the project
(project.py, from LDT_REMOTE); this module never imports it. It is a cache, never a point of
failure: down, refusing or damaged means one warning line and a local build.

`doit store_gc` keeps what the rows say is live (Keep, live_entries(), in rows.py): what a
recipe points at, and what was made from live entries (boot passes, VM snapshots), and the
newest pull of each published image. The other entries of a packable row are kept packed as
blocks (packed.py: cache/packed/ + cache/blocks/) instead of deleted, and lookup() restores one
through the same atomic door as a build: a revert costs no rebuild.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doit.dependency import FileChangedChecker

from pipeline.blocks import BlockCorrupt
from pipeline.entries import (
    MANIFEST,
    EntryCorrupt,
    RemoteUnavailable,
    Shared,
    file_record,
    file_records,
    hash_file,
    inputs_of,
    key_of,
    manifest_json,
)
from pipeline.errors import UserError
from pipeline.files import atomic_path, fsync_path
from pipeline.rows import Keep, Row, live_entries
from pipeline.run import log

if TYPE_CHECKING:  # packed.py (and the packs under it) is imported when an entry is packed or restored
    from pipeline.packed import Budget, Packed, PackedEntry
    from pipeline.seeds import Seed

__all__ = ["MANIFEST", "Collected", "Footprint", "Keep", "Obtained", "Row", "Source", "Store", "XXHashChecker",
           "hash_file", "key_of", "live_entries", "tree_manifest"]

READ_ONLY_FILE, READ_ONLY_DIR = 0o444, 0o555


def tree_manifest(root: Path, relpaths: Iterable[str]) -> list[dict[str, Any]]:
    """Path, mode and content hash (or link target) of each file: the key input of a build context."""
    entries = []
    for rel in sorted(relpaths):
        p = root / rel
        st = p.lstat()
        e: dict[str, Any] = {"path": rel, "mode": oct(st.st_mode)}
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            e["xxh3"] = hash_file(p)
        entries.append(e)
    return entries


class Source(enum.StrEnum):
    LOCAL = "local"
    REMOTE = "remote"
    BUILT = "built"


@dataclass(frozen=True)
class Obtained:
    """What Store.obtain() gives: the entry (None: an only_passes row whose build did not pass),
    where it came from, its key, and what the builder returned (None unless it ran)."""

    entry: Path | None
    source: Source
    key: str
    result: Any = None


@dataclass(frozen=True)
class Footprint:
    """What `doit store` sums up: the bytes the entries hold and the bytes they take."""

    logical: int  # plain entries' files (apparent) + packed entries' files
    plain: int  # plain entries on disk
    packs: int  # pack files + packed entries' records

    @property
    def stored(self) -> int:
        return self.plain + self.packs

    @property
    def ratio(self) -> float:
        return self.logical / self.stored if self.stored else 1.0


@dataclass(frozen=True)
class Collected:
    """What Store.collect() did."""

    removed: list[Path]  # plain entries taken out of store/ (packed or deleted) and work dirs
    packed: list[Path]  # those of them kept packed
    kept: list[Path]  # dead entries left plain (packing failed: a full disk)
    budget: Budget  # packed entries dropped past --max-size, packs deleted


class Absent(Exception):
    """Raised inside Store.build() by a body that found nothing to store (a remote miss)."""


_remote_down: dict[str, str] = {}  # shared stores that failed in this process (-> why): warned once, not asked again


@dataclass(frozen=True)
class Store:
    root: Path  # the cache/ folder
    remote: Shared | None = None  # the store a fleet shares (the project's, from LDT_REMOTE); None: none

    def __post_init__(self) -> None:
        # entries are compared with resolved pointer targets: keep one spelling of every path
        object.__setattr__(self, "root", Path(os.path.realpath(self.root)))

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def recipe_dir(self, recipe: str) -> Path:
        return self.root / "recipes" / recipe

    def pointer(self, recipe: str, artifact: str) -> Path:
        """The stable path of a recipe's artifact: a doit target."""
        return self.recipe_dir(recipe) / artifact

    def entry(self, stage: str, key: str) -> Path:
        return self.store / stage / key

    @property
    def packed(self) -> Packed:
        """Entries store_gc kept as blocks (packed.py): cache/packed/ and cache/blocks/."""
        from pipeline.packed import Packed

        return Packed(self.root)

    # -- the one path -------------------------------------------------------------------------

    def obtain(self, row: Row, manifest: dict[str, Any], build: Callable[[Path, str], Any], *,
               key: str | None = None, passed: Callable[[Any], bool] = bool, quiet: bool = False) -> Obtained:
        """The entry of `manifest` (which starts with row.head()), by the one path every row takes:
        the local entry (verified; shared if the registry lacks it), else the shared store's
        (pulled, verified), else `build(work, key)` fills an empty work dir that becomes the entry
        atomically, and is pushed. One maker per key: a second process waits for the first's
        entry instead of making its own. For an only_passes row the entry is stored only when
        passed(what build returned); Obtained.result is that value. `key` defaults to
        key_of(manifest) (a pulled image's is its digest). quiet: a damaged local entry is evicted
        without a line (virt's stderr belongs to its command)."""
        key = key_of(manifest) if key is None else key
        found = self._found(row, key, quiet, restore=False)  # a packed entry is restored by the one maker
        if found is not None:
            return found
        with self._one_maker(row.name, key):
            found = self._found(row, key, quiet)  # made by a concurrent run while this one waited, or packed
            if found is not None:
                return found
            if row.shared:
                entry = self.pull(row.name, key, manifest)
                if entry is not None:
                    return Obtained(entry, Source.REMOTE, key)
            result = None
            with self.build(row.name, key, manifest, writable=row.writable) as work:
                result = build(work, key)
                if row.only_passes and not passed(result):
                    raise Absent  # only passes are remembered: a failure is retried next time
        entry = self.lookup(row.name, key, quiet=quiet)
        if entry is not None and row.shared:
            self.push_entry(row.name, key)
        return Obtained(entry, Source.BUILT, key, result)

    def _found(self, row: Row, key: str, quiet: bool, restore: bool = True) -> Obtained | None:
        entry = self.lookup(row.name, key, quiet=quiet, restore=restore)
        if entry is None:
            return None
        if row.shared:
            self.push_entry(row.name, key)  # the fleet's, if it lacks this one
        return Obtained(entry, Source.LOCAL, key)

    @contextlib.contextmanager
    def _one_maker(self, row: str, key: str) -> Iterator[None]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{row}-{key}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- the steps of the path ----------------------------------------------------------------

    def lookup(self, stage: str, key: str, *, quiet: bool = False, restore: bool = True) -> Path | None:
        """The finished local entry, verified (quickly: see verify()); a damaged one is evicted
        (and named in one line, unless quiet: virt's stderr belongs to its command). An entry
        store_gc packed is restored from its blocks (restore=False: not)."""
        e = self.entry(stage, key)
        if not (e / MANIFEST).is_file():
            return self.unpack(stage, key, quiet=quiet) if restore else None
        return e if self.check(e, quiet=quiet) else None

    def unpack(self, stage: str, key: str, *, quiet: bool = False) -> Path | None:
        """A packed entry made plain again through the atomic door of build(), every block checked
        against its digest (and a tgz against its sha256: BlockStore.materialize); None when there
        is none.
        A damaged one is one warning line and dropped (the caller pulls or builds)."""
        packed = self.packed
        if not packed.has(stage, key):
            return None
        started = time.monotonic()
        try:
            manifest = packed.manifest(stage, key)
            writable = packed.writable(stage, key)
            with self.build(stage, key, {k: v for k, v in manifest.items() if k != "files"},
                            writable=writable) as work:
                size = packed.restore_into(stage, key, work, self.seeds(manifest))
        except (BlockCorrupt, OSError, ValueError) as e:
            log(f"warning: packed entry {stage}:{key[:12]} is damaged ({getattr(e, 'message', e)}); "
                "dropped, it will be made again")
            packed.drop(stage, key)
            return None
        entry = self.lookup(stage, key, quiet=quiet, restore=False)
        if entry is not None:
            packed.drop(stage, key)  # plain again: store_gc packs it anew if it dies again
            if not quiet:
                log(f"{stage}:{key[:12]} restored from packed blocks ({human(size)} in "
                    f"{time.monotonic() - started:.1f}s)")
        return entry

    def check(self, entry: Path, *, deep: bool = False, quiet: bool = False) -> bool:
        """verify(), and on a failure one line naming the entry, which is evicted."""
        problem = verify(entry, deep=deep)
        if problem is None:
            return True
        if not quiet:
            log(f"store entry {entry.parent.name}/{entry.name} {problem}; removed, it will be made again")
        self.evict(entry)
        return False

    def evict(self, entry: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(entry, 0o755)
        shutil.rmtree(entry, ignore_errors=True)

    @contextlib.contextmanager
    def build(self, stage: str, key: str, manifest: dict[str, Any], *,
              writable: Iterable[str] = ()) -> Iterator[Path]:
        """Yield an empty work dir; on success it becomes the entry <stage>/<key>, atomically.

        On any exception (KeyboardInterrupt included) the work dir is removed and nothing
        is stored; Absent from the body is swallowed (nothing to store). The manifest, with
        each file's size and sha256, is written last, and lookup() requires it. A body that
        wrote a manifest.json itself (a pulled entry) keeps its file records, once its inputs
        are found to be exactly `manifest`. A full disk is one line naming the stage. Files
        named in `writable` stay writable by their owner (a file QEMU must open read-write to
        map it privately); verify() finds a write to them all the same.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        work = self.tmp / f"{stage}-{key}-{os.getpid()}-{time.monotonic_ns()}"
        work.mkdir()
        try:
            yield work
            (work / MANIFEST).write_text(manifest_json({**manifest, "files": self._records(work, manifest)}))
            for f in work.iterdir():
                fsync_path(f)
                os.chmod(f, 0o644 if f.name in writable else READ_ONLY_FILE)
            fsync_path(work)
            final = self.entry(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, final)
            except OSError:  # a concurrent build of the same key won: keep theirs
                if self.lookup(stage, key, restore=False) is None:
                    raise
            os.chmod(final, READ_ONLY_DIR)
            fsync_path(final.parent)
        except Absent:
            pass
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise self._full(stage, work) from None
        except UserError as e:
            if "No space left on device" not in e.message:
                raise
            raise self._full(stage, work) from None
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    @staticmethod
    def _records(work: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        written = work / MANIFEST
        if not written.exists():
            return file_records(work)
        theirs = json.loads(written.read_text())
        if inputs_of(theirs) != json.loads(json.dumps(inputs_of(manifest))):
            raise UserError(f"the stored manifest.json of {work.name} does not match the inputs of its key")
        written.unlink()
        return theirs["files"]

    def _full(self, stage: str, work: Path) -> UserError:
        written, _ = du(work) if work.exists() else (0, 0)
        free = shutil.disk_usage(self.root).free
        return UserError(f"{stage}: no space left on the disk holding {self.root} (the stage had written "
                         f"{human(written)} when it filled, {human(free)} free now); nothing was stored",
                         hint="free some space (`doit store_gc` removes unused entries) or move cache/ to a "
                              "bigger disk, then run it again")

    # -- the shared store ----------------------------------------------------------------------

    def _shared(self) -> Shared | None:
        """The shared store, unless it failed earlier in this process."""
        if self.remote is None or str(self.remote) in _remote_down:
            return None
        return self.remote

    def _remote_failed(self, e: Exception, *, warn: bool = True) -> None:
        why = e.message if isinstance(e, UserError) else str(e)
        _remote_down[str(self.remote)] = why
        if warn:
            log(f"warning: {why}; building locally from here on")

    def pull(self, stage: str, key: str, manifest: dict[str, Any]) -> Path | None:
        """The remote entry of `key`, through the same atomic door as a build; None on a miss."""
        r = self._shared()
        if r is None:
            return None
        try:
            with self.build(stage, key, manifest) as work:
                if not r.pull_entry(stage, key, work, blocks=self.packed.blocks, seeds=self.seeds(manifest)):
                    raise Absent
        except RemoteUnavailable as e:
            self._remote_failed(e)
            return None
        except (EntryCorrupt, UserError) as e:
            log(f"remote entry {stage}:{key[:12]} is unusable ({e.message}); building locally")
            return None
        entry = self.entry(stage, key)
        if (entry / MANIFEST).is_file():
            log(f"{stage}:{key[:12]} pulled from {r}")
            return entry
        return None

    def seeds(self, manifest: dict[str, Any]) -> list[Seed]:
        """The files of the plain entries an entry is made from (its "needs"): a disk's ext4 holds
        most of the disk's blocks (seeds.py)."""
        from pipeline.seeds import Seed

        out = []
        for row, key in sorted((manifest.get("needs") or {}).items()):
            entry = self.entry(row, key)
            try:
                records = json.loads((entry / MANIFEST).read_text())["files"]
                out += [Seed(entry / name, rec["sha256"]) for name, rec in sorted(records.items())]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not here plain (or not readable): no seed
        return out

    def push_entry(self, stage: str, key: str, *, warn: bool = True) -> bool:
        """Share a finished entry (no-op without a remote, or with LDT_REMOTE_PUSH=0); True if pushed.
        warn=False: a registry that fails says nothing here (push_all says it, once)."""
        r = self._shared()
        if r is None or not r.push:
            return False
        entry = self.entry(stage, key)
        self.tmp.mkdir(parents=True, exist_ok=True)
        try:
            if r.push_entry(stage, key, entry, tmp_dir=self.tmp, blocks=self.packed.blocks):
                log(f"{stage}:{key[:12]} pushed to {r}")
                return True
        except RemoteUnavailable as e:
            self._remote_failed(e, warn=warn)
        except EntryCorrupt as e:
            log(f"not pushed: {e.message}")
            self.check(entry, deep=True)
        return False

    def push_all(self, rows: Iterable[Row] | None = None) -> int:
        """Push every local entry the remote lacks (after a run whose pushes failed); how many.
        With `rows` (the table), only the entries of shared rows."""
        if self._shared() is None:
            raise UserError("no remote store to push to", hint="set LDT_REMOTE=oci://HOST[:PORT]/PREFIX")
        local_only = set() if rows is None else {r.name for r in rows if not r.shared}
        pushed = 0
        for e in self.entries():
            if self._shared() is None:
                break
            if e.parent.name not in local_only and self.push_entry(e.parent.name, e.name, warn=False):
                pushed += 1
        why = _remote_down.get(str(self.remote))
        if why is not None:  # the registry's own words: refused credentials, unreachable, a 5xx
            raise UserError(f"{why}; {pushed} entries pushed before",
                            hint="check LDT_REMOTE, the credentials (LDT_REMOTE_USER/LDT_REMOTE_PASSWORD or "
                                 "`docker login`) and the registry, then `doit store_push` again")
        return pushed

    def remote_keys(self, stage: str) -> set[str] | None:
        """Keys the remote holds for a stage; None without a (reachable) remote."""
        r = self._shared()
        if r is None:
            return None
        try:
            return set(r.keys(stage))
        except RemoteUnavailable as e:
            self._remote_failed(e)
            return None

    def point(self, recipe: str, artifact: str, target: Path) -> Path:
        """Atomically make the recipe's stable path point at `target` (a file in an entry)."""
        link = self.pointer(recipe, artifact)
        rel = os.path.relpath(target, link.parent)
        if link.is_symlink() and os.readlink(link) == rel:
            return link
        with atomic_path(link) as tmp:
            os.symlink(rel, tmp)
        return link

    def current(self, recipe: str, artifact: str) -> Path | None:
        """The entry a recipe's stable path points at, if it points at a finished one."""
        link = self.pointer(recipe, artifact)
        if not link.is_symlink():
            return None
        entry = link.resolve().parent
        return entry if (entry / MANIFEST).is_file() and self.check(entry) else None

    def current_key(self, recipe: str, artifact: str) -> str:
        entry = self.current(recipe, artifact)
        if entry is None:
            raise UserError(f"no {artifact} built for recipe '{recipe}'",
                            hint=f"build it first (see `doit list`), or `doit forget` the tasks of {recipe}")
        return entry.name

    # -- inspection and garbage collection ---------------------------------------------------

    def pointers(self) -> dict[Path, Path]:
        """Every stable path -> the entry it points at."""
        out = {}
        recipes = self.root / "recipes"
        if recipes.is_dir():
            for link in sorted(recipes.glob("*/*")):
                if link.is_symlink():
                    out[link] = link.resolve().parent
        return out

    def entries(self) -> list[Path]:
        if not self.store.is_dir():
            return []
        return sorted(e for s in self.store.iterdir() if s.is_dir() for e in s.iterdir() if e.is_dir())

    def listing(self, stages: Iterable[str] = ()) -> str:
        """What is in the store, sizes, which recipe points where, and with a remote configured,
        where each entry is: local, remote, or both (`stages`: the stage names to ask it about)."""
        used: dict[Path, list[str]] = {}
        for link, entry in self.pointers().items():
            used.setdefault(entry, []).append(f"{link.parent.name}/{link.name}")
        local = self.entries()
        remote: dict[str, set[str]] = {}
        if self.remote is not None:
            for stage in dict.fromkeys([*stages, *(e.parent.name for e in local)]):
                keys = self.remote_keys(stage)
                if keys is None:
                    break
                remote[stage] = keys
        lines = [f"{'stage':<14} {'key':<16} {'where':<12} {'apparent':>10} {'on disk':>10}  used by"]
        total_apparent = total_disk = 0
        for e in local:
            apparent, disk = du(e)
            total_apparent += apparent
            total_disk += disk
            users = ", ".join(used.get(e, [])) or "(unreferenced)"
            where = "local+remote" if e.name in remote.get(e.parent.name, ()) else "local"
            lines.append(f"{e.parent.name:<14} {e.name[:16]:<16} {where:<12} {human(apparent):>10} "
                         f"{human(disk):>10}  {users}")
        here = {(e.parent.name, e.name) for e in local}
        only_remote = sorted((st, k) for st, keys in remote.items() for k in keys if (st, k) not in here)
        for st, k in only_remote:
            lines.append(f"{st:<14} {k[:16]:<16} {'remote':<12} {'':>10} {'':>10}")
        packed = self.packed.entries()
        for p in packed:
            lines.append(f"{p.row:<14} {p.key[:16]:<16} {'packed':<12} {human(p.logical):>10} {'':>10}  "
                         f"(packed {time.strftime('%Y-%m-%d %H:%M', time.localtime(p.packed_at))})")
        fp = self.footprint(total_apparent, total_disk, packed)
        lines.append(f"logical {human(fp.logical)}, stored {human(fp.stored)} (plain {human(fp.plain)} + packs "
                     f"{human(fp.packs)} for {len(packed)} packed entries), ratio {fp.ratio:.2f}x")
        work = sorted(self.tmp.iterdir()) if self.tmp.is_dir() else []
        lines.append(f"{len(local)} local entries, {human(total_apparent)} apparent, {human(total_disk)} on disk"
                     + (f"; {len(only_remote)} more in {self.remote}" if remote else "")
                     + (f"; {len(work)} unfinished work dirs in {self.tmp}" if work else ""))
        return "\n".join(lines)

    def footprint(self, apparent: int | None = None, disk: int | None = None,
                  packed: list[PackedEntry] | None = None) -> Footprint:
        """Logical bytes (every entry's files, plain or packed) and what they take on disk."""
        if apparent is None or disk is None:
            sizes = [du(e) for e in self.entries()]
            apparent, disk = sum(a for a, _ in sizes), sum(d for _, d in sizes)
        packed = self.packed.entries() if packed is None else packed
        packs = self.packed.blocks.stats().stored if (self.root / "blocks" / "index.sqlite").exists() else 0
        return Footprint(apparent + sum(p.logical for p in packed), disk,
                         packs + sum(p.own for p in packed))

    def verify_all(self) -> list[tuple[Path, str]]:
        """Rehash every entry against its manifest.json; the damaged ones are evicted."""
        bad = []
        for e in self.entries():
            problem = verify(e, deep=True)
            if problem is not None:
                bad.append((e, problem))
                self.evict(e)
        return bad

    def manifests(self) -> dict[Path, dict[str, Any]]:
        """Every finished entry -> its manifest.json ({} when unreadable)."""
        out: dict[Path, dict[str, Any]] = {}
        for e in self.entries():
            try:
                out[e] = json.loads((e / MANIFEST).read_text())
            except (OSError, ValueError):
                out[e] = {}
        return out

    def live(self, rows: Iterable[Row]) -> set[Path]:
        """The entries the table says are live (live_entries(): each row's Keep rule)."""
        return live_entries(self.manifests(), set(self.pointers().values()), rows, self.store)

    def gc(self, rows: Iterable[Row] = (), keep: Iterable[Path] = ()) -> list[Path]:
        """collect(): the plain entries and work dirs it removed."""
        return self.collect(rows, keep).removed

    def collect(self, rows: Iterable[Row] = (), keep: Iterable[Path] = (), max_size: int | None = None) -> Collected:
        """Take the entries that are not live out of store/ (by the rows' rules; an entry of no row
        is live only while a stable path points at it): those of a packable row are kept packed
        (removed only once their packed form is complete and verified; one that cannot be packed,
        a full disk, stays plain, with one line), the others deleted. Then leftover work dirs and
        free locks go; with max_size, packed entries past it, oldest first; and the packs no
        packed entry uses."""
        rows = tuple(rows)
        rule = {r.name: r for r in rows}
        live = self.live(rows) | {Path(k) for k in keep}
        removed, packed, kept = [], [], []
        for e in self.entries():
            if e in live:
                continue
            row = rule.get(e.parent.name)
            if row is not None and row.packable and verify(e) is None:
                try:
                    self.packed.pack(e, self.tmp)
                except UserError as err:
                    log(f"store_gc: {err.message}")
                    kept.append(e)
                    continue
                packed.append(e)
            self.evict(e)
            removed.append(e)
        if self.tmp.is_dir():
            for w in self.tmp.iterdir():
                if _builder_alive(w.name):
                    continue  # a build in progress
                shutil.rmtree(w, ignore_errors=True) if w.is_dir() else w.unlink()
                removed.append(w)
        locks = self.root / "locks"
        for lock in sorted(locks.iterdir()) if locks.is_dir() else ():
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its key is being made
                lock.unlink()
        if max_size is not None:
            plain = sum(du(e)[1] for e in self.entries())
            budget = self.packed.trim(max_size, plain)
        else:
            budget = self.packed.sweep()
        return Collected(removed, packed, kept, budget)


def verify(entry: Path, *, deep: bool = False) -> str | None:
    """None when the entry holds what its manifest.json records, else what is wrong.

    Quick by default, like doit's checker: sizes always; a file's sha256 only when it is newer
    than the manifest.json written last at store time (a write after the store) or `deep`."""
    try:
        manifest_st = (entry / MANIFEST).stat()
        records = json.loads((entry / MANIFEST).read_text()).get("files")
    except (OSError, ValueError):
        return "has an unreadable manifest.json"
    if not isinstance(records, dict):
        return "has no record of its files (made by an older version)"
    for name, rec in records.items():
        f = entry / name
        try:
            st = f.stat()
        except OSError:
            return f"lost {name}"
        if st.st_size != rec.get("size"):
            return f"has a changed {name} (size {st.st_size}, stored {rec.get('size')})"
        if (deep or st.st_mtime_ns > manifest_st.st_mtime_ns) and file_record(f)["sha256"] != rec.get("sha256"):
            return f"has a changed {name} (its sha256 differs from the one stored)"
    return None


def _builder_alive(work_name: str) -> bool:
    """Work dirs are named <stage>-<key>-<pid>-<ns>: is that process still running?"""
    parts = work_name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(parts[1]) != os.getpid()


def du(path: Path) -> tuple[int, int]:
    apparent = disk = 0
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            apparent += st.st_size
            disk += st.st_blocks * 512
    return apparent, disk


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


# -- doit integration ---------------------------------------------------------------------------


class XXHashChecker(FileChangedChecker):
    """doit file checker: (mtime, size, content id); the id is taken only when mtime changed and
    size didn't. A file of a store entry (a recipe's pointer leads there) is identified by the
    sha256 its entry's manifest.json records, read, not hashed: an entry never changes (lookup()
    checks it), and a stage's file_deps are whole disks: hashing them after every build and
    restore took a second (hello's chain: 3 GB). Any other file: its xxh3-128."""

    def check_modified(self, file_path, file_stat, state):
        timestamp, size, digest = state
        if file_stat.st_mtime == timestamp:
            return False
        if file_stat.st_size != size:
            return True
        return digest != content_id(file_path)

    def get_state(self, dep, current_state):
        st = os.stat(dep)
        if current_state and current_state[0] == st.st_mtime:
            return None
        return st.st_mtime, st.st_size, content_id(dep)


def content_id(path: str | os.PathLike[str]) -> str:
    """"sha256:<hex>" for a file of a store entry (<store>/<row>/<key>/<name>, as its
    manifest.json records it), else the file's xxh3-128."""
    real = Path(os.path.realpath(path))
    if real.parent.parent.parent.name == "store":
        try:
            rec = json.loads((real.parent / MANIFEST).read_text())["files"][real.name]
            return f"sha256:{rec['sha256']}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return hash_file(path)
