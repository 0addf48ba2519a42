"""Store entries kept as blocks (issue 17, locally): what `doit store_gc` does with an entry no
recipe points at, instead of deleting it, and how a revert gets it back without a rebuild.

Layout (beside cache/store/):
    cache/blocks/                     the BlockStore (packs.py): packs/*.pack + index.sqlite
    cache/packed/<row>/<key>/         a packed entry: its manifest.json (as stored), one
                                      <file>.idx per file (blocks.Index root, put_index) and
                                      packed.json (when it was packed, which files were writable)

pack() writes a packed entry in a work dir and renames it into place only once every file's
index is complete and verified (its sha256, taken while the file was cut, is the one its
manifest.json records; every block it names is in a pack); the caller removes the plain entry
after that, never before. A full disk while packing is one UserError line; the plain entry stays.

restore_into() fills a work dir of Store.build (the same atomic door as a build or a pull) with
the materialized files (every block checked against its digest; each file's index, which pack()
checked against the file's sha256, against the manifest) and the stored manifest.json; a damaged
pack is BlockCorrupt: the caller drops the packed entry and builds.

trim() drops packed entries past a size budget, oldest first, and sweep() deletes the packs none
of the remaining packed entries use, and compacts those mostly unused (PackUse: under half their
blocks live, at least 256 KiB dead; regcompact.py says why, for the registry's packs): their live
blocks copied into new packs, every block checked, the old packs deleted. Without it the oldest
revision's own blocks, packed beside blocks every later revision shares, would free nothing when
it is dropped, and trim() would drop every entry before the budget was met. trim() counts what sweep() will
leave: a compacted pack as its live share.

This module never imports cache.py (cache.Store uses it).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.blocks import BlockCorrupt, Index
from pipeline.entries import MANIFEST, manifest_json
from pipeline.errors import UserError
from pipeline.files import fsync_path
from pipeline.packs import COMPACT_MIN_DEAD, COMPACT_THRESHOLD, BlockStore
from pipeline.run import log
from pipeline.seeds import Seed

INFO = "packed.json"
IDX = ".idx"


@dataclass(frozen=True)
class PackedEntry:
    path: Path  # cache/packed/<row>/<key>
    packed_at: float  # seconds since the epoch
    logical: int  # the bytes of the entry's files as a plain entry
    own: int  # the bytes of the packed entry's own files (manifest, index roots)

    @property
    def row(self) -> str:
        return self.path.parent.name

    @property
    def key(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Budget:
    """What trim() dropped and what sweep() did: packs deleted unused, packs compacted (bytes
    freed: the unused packs' and the compacted ones' less what their copies took)."""

    dropped: tuple[PackedEntry, ...]
    packs_deleted: int
    bytes_freed: int
    packs_compacted: int = 0


@dataclass(frozen=True)
class PackUse:
    """A pack as sweep() sees it: its bytes, its blocks, and how many of those a packed entry uses."""

    size: int
    blocks: int
    live: int

    @property
    def compacted(self) -> bool:
        dead = self.size * (self.blocks - self.live) // max(self.blocks, 1)
        return 0 < self.live < COMPACT_THRESHOLD * self.blocks and dead >= COMPACT_MIN_DEAD

    def kept(self) -> int:
        """The bytes it costs once sweep() ran: none unused, its live share compacted, else whole."""
        if self.live == 0:
            return 0
        return self.size * self.live // self.blocks if self.compacted else self.size


@dataclass(frozen=True)
class Packed:
    cache: Path  # the cache/ folder

    @property
    def root(self) -> Path:
        return self.cache / "packed"

    @property
    def blocks(self) -> BlockStore:
        return BlockStore(self.cache / "blocks")

    def path(self, row: str, key: str) -> Path:
        return self.root / row / key

    def has(self, row: str, key: str) -> bool:
        return (self.path(row, key) / INFO).is_file()

    # -- packing ----------------------------------------------------------------------------------

    def pack(self, entry: Path, tmp: Path) -> Path:
        """Keep a finished plain entry as blocks; the packed entry (the plain one is untouched).
        UserError (one line) when it cannot be: no file records, a file that is not what its
        manifest records, a full disk."""
        row, key = entry.parent.name, entry.name
        final = self.path(row, key)
        if (final / INFO).is_file():
            return final
        manifest = json.loads((entry / MANIFEST).read_text())
        records = manifest.get("files")
        if not isinstance(records, dict):
            raise UserError(f"{row}/{key[:12]} has no record of its files; not packed")
        tmp.mkdir(parents=True, exist_ok=True)
        work = tmp / f"packed_{row}-{key}-{os.getpid()}-{time.monotonic_ns()}"
        work.mkdir()
        bs = self.blocks
        try:
            writable = []
            for name, rec in sorted(records.items()):
                f = entry / name
                if f.stat().st_mode & 0o200:
                    writable.append(name)
                root = bs.put_index(bs.put(f))
                if (root.size, root.sha256) != (rec.get("size"), rec.get("sha256")):
                    raise UserError(f"{row}/{key[:12]}: {name} is not what its manifest.json records; not packed")
                if bs.missing(root):
                    raise UserError(f"{row}/{key[:12]}: {name}'s blocks are not all in a pack; not packed")
                (work / (name + IDX)).write_bytes(root.to_bytes())
            (work / MANIFEST).write_text(manifest_json(manifest))
            (work / INFO).write_text(json.dumps({"packed_at": time.time(), "writable": writable,
                                                 "logical": sum(int(r.get("size", 0)) for r in records.values())}))
            for p in work.iterdir():
                fsync_path(p)
            fsync_path(work)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # an unfinished one (no packed.json): replace it
                shutil.rmtree(final)
            os.rename(work, final)
            fsync_path(final.parent)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(f"{row}/{key[:12]}: no space left on the disk holding {self.cache} while "
                                "packing it; the plain entry stays",
                                hint="free some space, or `doit store_gc --max-size SIZE` to drop old packed "
                                     "entries") from None
            raise
        except UserError as e:
            if "No space left on device" in e.message:
                raise UserError(f"{row}/{key[:12]}: no space left while packing it; the plain entry stays") from None
            raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return final

    # -- restoring --------------------------------------------------------------------------------

    def manifest(self, row: str, key: str) -> dict[str, Any]:
        return json.loads((self.path(row, key) / MANIFEST).read_text())

    def writable(self, row: str, key: str) -> list[str]:
        return list(json.loads((self.path(row, key) / INFO).read_text()).get("writable", []))

    def restore_into(self, row: str, key: str, work: Path, seeds: Collection[Seed] = ()) -> int:
        """The entry's files and manifest.json into an empty work dir, every block and file
        checked; their bytes. BlockCorrupt when the packed entry cannot make them."""
        d = self.path(row, key)
        try:
            manifest = self.manifest(row, key)
            records = manifest["files"]
            roots = {name: Index.from_bytes((d / (name + IDX)).read_bytes()) for name in records}
        except (OSError, ValueError, KeyError, TypeError, UserError) as e:
            raise BlockCorrupt(f"its record is unreadable ({getattr(e, 'message', e)})") from None
        bs = self.blocks
        total = 0
        for name, rec in records.items():
            root = roots[name]
            if (root.size, root.sha256) != (rec.get("size"), rec.get("sha256")):
                raise BlockCorrupt(f"the index of {name} does not match its manifest.json")
            bs.materialize(root, work / name, seeds)
            total += root.size
        (work / MANIFEST).write_text(manifest_json(manifest))
        return total

    def drop(self, row: str, key: str) -> None:
        d = self.path(row, key)
        with contextlib.suppress(FileNotFoundError):
            (d / INFO).unlink()  # first: what has() looks at
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            d.parent.rmdir()

    # -- inspection and the budget ----------------------------------------------------------------

    def entries(self) -> list[PackedEntry]:
        """Every finished packed entry, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.glob("*/*"):
            try:
                info = json.loads((d / INFO).read_text())
                own = sum(p.stat().st_size for p in d.iterdir())
            except (OSError, ValueError):
                continue
            out.append(PackedEntry(d, float(info.get("packed_at", 0)), int(info.get("logical", 0)), own))
        return sorted(out, key=lambda e: (e.packed_at, str(e.path)))

    def _digests(self, entry: PackedEntry) -> set[bytes]:
        """The blocks a packed entry uses: its index chunks and the blocks they name."""
        out: set[bytes] = set()
        bs = self.blocks
        for idx in entry.path.glob("*" + IDX):
            root = Index.from_bytes(idx.read_bytes())
            out |= root.digests()
            out |= bs.get_index(root).digests()
        return out

    def stored(self) -> int:
        """Bytes on disk of the packed form: the packs and the packed entries' own files."""
        return self.blocks.stats().stored + sum(e.own for e in self.entries())

    def _uses(self, entries: list[PackedEntry]) -> dict[Path, set[bytes]]:
        """The blocks each packed entry uses (none for a damaged one: no use keeping its blocks)."""
        uses: dict[Path, set[bytes]] = {}
        for e in entries:
            try:
                uses[e.path] = self._digests(e)
            except UserError:
                uses[e.path] = set()
        return uses

    def _packs(self, used: Collection[bytes]) -> tuple[dict[bytes, str], dict[str, PackUse]]:
        """Which pack each block is in, and every pack with its blocks in `used` counted live."""
        with self.blocks.db() as con:
            where = dict(con.execute("SELECT digest, pack FROM blocks"))
            rows = con.execute("SELECT name, size, blocks FROM packs").fetchall()
        live = collections.Counter(where[d] for d in used if d in where)
        return where, {n: PackUse(size, blocks, live[n]) for n, size, blocks in rows}

    def trim(self, max_size: int, plain: int) -> Budget:
        """Drop packed entries, oldest first, until plain + packs (as sweep() leaves them) + packed
        entries ≤ max_size (or none is left), then sweep()."""
        entries = self.entries()
        uses = self._uses(entries)
        count = collections.Counter(d for ds in uses.values() for d in ds)
        where, use = self._packs(count)
        total = plain + sum(u.kept() for u in use.values()) + sum(e.own for e in entries)
        dropped = []
        for e in entries:
            if total <= max_size:
                break
            dropped.append(e)
            total -= e.own
            for d in uses[e.path]:
                count[d] -= 1
                if count[d] == 0 and d in where:
                    before = use[where[d]]
                    use[where[d]] = after = replace(before, live=before.live - 1)
                    total -= before.kept() - after.kept()
        for e in dropped:
            self.drop(e.row, e.key)
        swept = self.sweep({d for d, n in count.items() if n})  # the remaining entries' blocks, not read again
        return replace(swept, dropped=tuple(dropped), bytes_freed=swept.bytes_freed + sum(e.own for e in dropped))

    def sweep(self, used: set[bytes] | None = None) -> Budget:
        """Delete the packs whose blocks no packed entry uses (`used`: the blocks they use, when the
        caller has them), and compact the mostly unused ones (PackUse.compacted). A damaged pack is
        one line and stays as it is."""
        bs = self.blocks
        if not (bs.root / "index.sqlite").exists():
            return Budget((), 0, 0)
        if used is None:
            used = set().union(*self._uses(self.entries()).values())
        _, packs = self._packs(used)
        unused = [n for n, u in packs.items() if u.live == 0]
        with bs.db() as con:
            for name in unused:
                with con:
                    con.execute("DELETE FROM blocks WHERE pack = ?", (name,))
                    con.execute("DELETE FROM packs WHERE name = ?", (name,))
                with contextlib.suppress(FileNotFoundError):
                    bs.pack_path(name).unlink()
        freed = sum(packs[n].size for n in unused)
        sparse = [n for n, u in packs.items() if u.compacted]
        try:
            old, written = bs.compact(sparse, used)
        except BlockCorrupt as e:
            log(f"store_gc: packs not compacted: {e.message} (they stay as they are)")
            sparse, old, written = [], 0, 0
        return Budget((), len(unused), freed + old - written, len(sparse))


def parse_size(text: str) -> int:
    """"20G", "500M", "1.5T", "4096" -> bytes (powers of 1024); UserError otherwise."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = units.get(t[-1:], 1) if t else 1
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"--max-size {text!r} is not a size", hint="e.g. --max-size 20G, 500M, 4096") from None
    if value < 0:
        raise UserError(f"--max-size {text!r} is negative", hint="e.g. --max-size 20G")
    return int(value * mult)

