"""The content-hash store under cache/, content keys, and doit's xxhash file checker.

Layout:
    cache/store/<stage>/<key>/        immutable entries: the artifact files + manifest.json
    cache/recipes/<name>/<artifact>   stable paths (doit targets): symlinks to the current entry
    cache/tmp/                        work dirs; never taken for a finished entry

An entry is built in cache/tmp/ and renamed into place, so an interrupted build (Ctrl-C,
kill -9, full disk) leaves at most a work dir that lookups never see. Its manifest.json holds
the inputs (whose hash is the key) and, under "files", each file's size and sha256 (the OCI
registry's own digest, so a pulled entry is checked end to end). Entries are read-only once
stored; one changed afterwards is found before it is used (verify(): size, and a rehash when
a file is newer than the manifest written last), evicted with one line, and made again.

With LDT_REMOTE set (an OCI registry, see remote.py) fetch() looks up local -> remote ->
build, and pushes what it built (unless LDT_REMOTE_PUSH=0). The registry is a cache, never a
point of failure: down, refusing or damaged means one warning line and a local build.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from doit.dependency import FileChangedChecker

from pipeline.errors import UserError
from pipeline.files import atomic_path, fsync_path
from pipeline.run import log

MANIFEST = "manifest.json"
CHUNK = 1 << 20
READ_ONLY_FILE, READ_ONLY_DIR = 0o444, 0o555


def hash_file(path: str | os.PathLike[str]) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of a file, read once (what an entry's manifest.json records per file)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def file_records(entry_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of every file of an entry but its manifest.json."""
    d = Path(entry_dir)
    return {p.name: file_record(p) for p in sorted(d.iterdir()) if p.name != MANIFEST and p.is_file()}


def inputs_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored manifest.json that is hashed into the key (all but "files")."""
    return {k: v for k, v in manifest.items() if k != "files"}


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True, indent=1) + "\n"


def key_of(manifest: dict[str, Any]) -> str:
    """xxh3-128 over the sorted JSON of every input of a stage."""
    return xxhash.xxh3_128_hexdigest(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())


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


class Absent(Exception):
    """Raised inside Store.build() by a body that found nothing to store (a remote miss)."""


_remote_down: set[str] = set()  # remotes that failed in this process: warned once, not asked again


@dataclass(frozen=True)
class Store:
    root: Path  # the cache/ folder
    remote_url: str | None = None  # oci://HOST[:PORT]/PREFIX; None: no shared store
    push: bool = True  # False: pull only (a pull-request runner: LDT_REMOTE_PUSH=0)

    @classmethod
    def from_env(cls, root: Path, env: dict[str, str] | None = None) -> Store:
        env = dict(os.environ) if env is None else env
        return cls(root, env.get("LDT_REMOTE") or None, env.get("LDT_REMOTE_PUSH", "1") not in ("0", "false", "no"))

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

    def lookup(self, stage: str, key: str, *, quiet: bool = False) -> Path | None:
        """The finished local entry, verified (quickly: see verify()); a damaged one is evicted
        (and named in one line, unless quiet: virt's stderr belongs to its command)."""
        e = self.entry(stage, key)
        if not (e / MANIFEST).is_file():
            return None
        return e if self.check(e, quiet=quiet) else None

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
                if self.lookup(stage, key) is None:
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

    # -- the shared store (an OCI registry) --------------------------------------------------

    def fetch(self, stage: str, key: str, manifest: dict[str, Any],
              build: Callable[[Path, str], None]) -> tuple[Path, str]:
        """The entry of `key`: (entry, "local" | "remote" | "built"). Local first (and shared if the
        remote lacks it), then the remote (pulled and verified while it streams), else built
        here and pushed."""
        entry = self.lookup(stage, key)
        if entry is not None:
            self.push_entry(stage, key)
            return entry, "local"
        entry = self.pull(stage, key, manifest)
        if entry is not None:
            return entry, "remote"
        with self.build(stage, key, manifest) as work:
            build(work, key)
        self.push_entry(stage, key)
        return self.entry(stage, key), "built"

    def _remote(self):
        if not self.remote_url or self.remote_url in _remote_down:
            return None
        from pipeline import remote

        return remote.Remote.parse(self.remote_url, push=self.push)

    def _remote_failed(self, e: Exception) -> None:
        assert self.remote_url is not None
        _remote_down.add(self.remote_url)
        log(f"warning: {e.message if isinstance(e, UserError) else e}; building locally from here on")

    def pull(self, stage: str, key: str, manifest: dict[str, Any]) -> Path | None:
        """The remote entry of `key`, through the same atomic door as a build; None on a miss."""
        r = self._remote()
        if r is None:
            return None
        from pipeline import remote

        try:
            with self.build(stage, key, manifest) as work:
                if not remote.pull_entry(r, stage, key, work):
                    raise Absent
        except remote.RemoteUnavailable as e:
            self._remote_failed(e)
            return None
        except (remote.EntryCorrupt, UserError) as e:
            log(f"remote entry {stage}:{key[:12]} is unusable ({e.message}); building locally")
            return None
        entry = self.entry(stage, key)
        if (entry / MANIFEST).is_file():
            log(f"{stage}:{key[:12]} pulled from {r}")
            return entry
        return None

    def push_entry(self, stage: str, key: str) -> bool:
        """Share a finished entry (no-op without a remote, or with LDT_REMOTE_PUSH=0); True if pushed."""
        r = self._remote()
        if r is None or not r.push:
            return False
        from pipeline import remote

        entry = self.entry(stage, key)
        self.tmp.mkdir(parents=True, exist_ok=True)
        try:
            if remote.push_entry(r, stage, key, entry, tmp_dir=self.tmp):
                log(f"{stage}:{key[:12]} pushed to {r}")
                return True
        except remote.RemoteUnavailable as e:
            self._remote_failed(e)
        except remote.EntryCorrupt as e:
            log(f"not pushed: {e.message}")
            self.check(entry, deep=True)
        return False

    def push_all(self) -> int:
        """Push every local entry the remote lacks (after a run whose pushes failed); how many."""
        if self._remote() is None:
            raise UserError("no remote store to push to", hint="set LDT_REMOTE=oci://HOST[:PORT]/PREFIX")
        before = len(_remote_down)
        pushed = 0
        for e in self.entries():
            if self._remote() is None:
                break
            if self.push_entry(e.parent.name, e.name):
                pushed += 1
        if len(_remote_down) > before:
            raise UserError(f"the remote store {self.remote_url} went away; {pushed} entries pushed before")
        return pushed

    def remote_keys(self, stage: str) -> set[str] | None:
        """Keys the remote holds for a stage; None without a (reachable) remote."""
        r = self._remote()
        if r is None:
            return None
        from pipeline import remote

        try:
            return set(remote.remote_keys(r, stage))
        except remote.RemoteUnavailable as e:
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
        if self.remote_url:
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
        work = sorted(self.tmp.iterdir()) if self.tmp.is_dir() else []
        lines.append(f"{len(local)} local entries, {human(total_apparent)} apparent, {human(total_disk)} on disk"
                     + (f"; {len(only_remote)} more in {self.remote_url}" if remote else "")
                     + (f"; {len(work)} unfinished work dirs in {self.tmp}" if work else ""))
        return "\n".join(lines)

    def verify_all(self) -> list[tuple[Path, str]]:
        """Rehash every entry against its manifest.json; the damaged ones are evicted."""
        bad = []
        for e in self.entries():
            problem = verify(e, deep=True)
            if problem is not None:
                bad.append((e, problem))
                self.evict(e)
        return bad

    def gc(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Remove entries no stable path points at (and leftover work dirs)."""
        live = set(self.pointers().values()) | {Path(k) for k in keep}
        removed = [e for e in self.entries() if e not in live]
        for e in removed:
            self.evict(e)
        if self.tmp.is_dir():
            for w in self.tmp.iterdir():
                if _builder_alive(w.name):
                    continue  # a build in progress
                shutil.rmtree(w, ignore_errors=True) if w.is_dir() else w.unlink()
                removed.append(w)
        return removed


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
    """doit file checker: (mtime, size, xxh3-128); hashes only when mtime changed and size didn't."""

    def check_modified(self, file_path, file_stat, state):
        timestamp, size, digest = state
        if file_stat.st_mtime == timestamp:
            return False
        if file_stat.st_size != size:
            return True
        return digest != hash_file(file_path)

    def get_state(self, dep, current_state):
        st = os.stat(dep)
        if current_state and current_state[0] == st.st_mtime:
            return None
        return st.st_mtime, st.st_size, hash_file(dep)
