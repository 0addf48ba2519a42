"""The content-hash store under cache/, content keys, and doit's xxhash file checker.

Layout:
    cache/store/<stage>/<key>/        immutable entries: the artifact files + manifest.json
    cache/recipes/<name>/<artifact>   stable paths (doit targets): symlinks to the current entry
    cache/tmp/                        work dirs; never taken for a finished entry

An entry is built in cache/tmp/ and renamed into place, so an interrupted build (Ctrl-C,
kill -9, full disk) leaves at most a work dir that lookups never see.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from doit.dependency import FileChangedChecker

from pipeline.errors import UserError
from pipeline.files import atomic_path, fsync_path

MANIFEST = "manifest.json"
CHUNK = 1 << 20


def hash_file(path: str | os.PathLike[str]) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


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


@dataclass(frozen=True)
class Store:
    root: Path  # the cache/ folder

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

    def lookup(self, stage: str, key: str) -> Path | None:
        e = self.entry(stage, key)
        return e if (e / MANIFEST).is_file() else None

    @contextlib.contextmanager
    def build(self, stage: str, key: str, manifest: dict[str, Any]) -> Iterator[Path]:
        """Yield an empty work dir; on success it becomes the entry <stage>/<key>, atomically.

        On any exception (KeyboardInterrupt included) the work dir is removed and nothing
        is stored. The manifest is written last, and lookup() requires it.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        work = self.tmp / f"{stage}-{key}-{os.getpid()}-{time.monotonic_ns()}"
        work.mkdir()
        try:
            yield work
            (work / MANIFEST).write_text(manifest_json(manifest))
            for f in work.iterdir():
                fsync_path(f)
            fsync_path(work)
            final = self.entry(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(work, final)
            except OSError:  # a concurrent build of the same key won: keep theirs
                if self.lookup(stage, key) is None:
                    raise
            fsync_path(final.parent)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

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
        return entry if (entry / MANIFEST).is_file() else None

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

    def listing(self) -> str:
        """What is in the store, sizes, and which recipe points where."""
        used: dict[Path, list[str]] = {}
        for link, entry in self.pointers().items():
            used.setdefault(entry, []).append(f"{link.parent.name}/{link.name}")
        lines = [f"{'stage':<14} {'key':<16} {'apparent':>10} {'on disk':>10}  used by"]
        total_apparent = total_disk = 0
        for e in self.entries():
            apparent, disk = du(e)
            total_apparent += apparent
            total_disk += disk
            users = ", ".join(used.get(e, [])) or "(unreferenced)"
            lines.append(f"{e.parent.name:<14} {e.name[:16]:<16} {human(apparent):>10} {human(disk):>10}  {users}")
        work = sorted(self.tmp.iterdir()) if self.tmp.is_dir() else []
        lines.append(f"{len(self.entries())} entries, {human(total_apparent)} apparent, {human(total_disk)} on disk"
                     + (f"; {len(work)} unfinished work dirs in {self.tmp}" if work else ""))
        return "\n".join(lines)

    def gc(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Remove entries no stable path points at (and leftover work dirs)."""
        live = set(self.pointers().values()) | {Path(k) for k in keep}
        removed = [e for e in self.entries() if e not in live]
        for e in removed:
            shutil.rmtree(e)
        if self.tmp.is_dir():
            for w in self.tmp.iterdir():
                if _builder_alive(w.name):
                    continue  # a build in progress
                shutil.rmtree(w, ignore_errors=True) if w.is_dir() else w.unlink()
                removed.append(w)
        return removed


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
