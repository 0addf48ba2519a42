"""The kinds of entry the store holds (Row: the table itself is stages.ROWS) and which entries
`doit store_gc` keeps live (Keep, live_entries()): what a recipe points at, what was made from
live entries (boot passes, VM snapshots), and the newest pull of each published image.
cache.py re-exports these names."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.entries import MANIFEST


class Keep(enum.StrEnum):
    """How `doit store_gc` decides an entry of a row is live (each row says which rule is its)."""

    POINTED = "pointed"  # a recipe's stable path points at it (the recipe stages)
    NEEDS = "needs"  # every entry its manifest names ("needs": {row: key}, or "booted": [key]) is live
    FILES = "files"  # every file its "inputs" identify (path:size:mtime) is unchanged: in a live entry, or outside
    NEWEST = "newest"  # the newest entry of each "image" (a pulled image; older pulls of it are garbage)


@dataclass(frozen=True)
class Row:
    """One kind of store entry: the folder cache/store/<name>/, and what the store does with it."""

    name: str  # the store folder, the registry repository, and "stage" in every manifest
    version: int  # bump when what an entry holds changes: every key of the row changes
    doc: str
    needs: tuple[str, ...] = ()  # the rows whose entries it is made from (named in its manifest)
    reads: tuple[str, ...] = ()  # the recipe settings (Recipe.settings() keys) that go into the key
    shared: bool = True  # pulled from and pushed to the shared store (False: keyed by this machine's paths)
    only_passes: bool = False  # stored only when the builder's result passed (a failed boot is retried)
    writable: tuple[str, ...] = ()  # files that stay writable by their owner (see Store.build)
    keep: Keep = Keep.POINTED  # store_gc's rule
    builder: str = ""  # where the builder is, for a row whose builder lives above the store ("vm.check_one")
    pack: bool = True  # store_gc keeps its dead entries packed (as blocks) rather than deleting them

    @property
    def packable(self) -> bool:
        """Whether store_gc packs a dead entry of the row. Not for FILES rows (a virt snapshot's key
        names this machine's files by mtime: once they change it is never hit again, and its
        vm.ram is most of a GiB of guest memory) nor NEWEST rows (an older pull of a published
        image is pulled again if ever needed)."""
        return self.pack and self.keep in (Keep.POINTED, Keep.NEEDS)

    def head(self) -> dict[str, Any]:
        """What every manifest of the row starts with."""
        return {"stage": self.name, "version": self.version}


def live_entries(manifests: Mapping[Path, dict[str, Any]], pointed: set[Path], rows: Iterable[Row],
                 store: Path, stat_of: Callable[[str], os.stat_result] = os.stat) -> set[Path]:
    """Which entries (of `manifests`: entry dir -> its manifest.json) are live: those a recipe
    points at, then by each row's Keep rule, until nothing more is found (a boot pass of a
    snapshot's files is live once they are). Pure but for stat_of (FILES: outside files)."""
    rule = {r.name: r.keep for r in rows}
    live = {e for e in manifests if e in pointed}
    newest: dict[tuple[str, str], Path] = {}
    for e, m in manifests.items():
        if rule.get(e.parent.name) is Keep.NEWEST and isinstance(m.get("image"), str):
            group = (e.parent.name, m["image"])
            if group not in newest or _stored_at(e) > _stored_at(newest[group]):
                newest[group] = e
    live |= set(newest.values())
    grown = True
    while grown:
        grown = False
        keys = {e.name for e in live}
        for e, m in manifests.items():
            keep = rule.get(e.parent.name)
            if e in live or keep not in (Keep.NEEDS, Keep.FILES):
                continue
            if _alive(keep, m, live, keys, store, stat_of):
                live.add(e)
                grown = True
    return live


def _alive(keep: Keep, m: dict[str, Any], live: set[Path], keys: set[str], store: Path,
           stat_of: Callable[[str], os.stat_result]) -> bool:
    if keep is Keep.NEEDS:
        needs, booted = m.get("needs"), m.get("booted")
        named = [store / row / key for row, key in needs.items()] if isinstance(needs, dict) else []
        old = [k for k in booted if isinstance(k, str)] if isinstance(booted, list) else []  # check v2 manifests
        return bool(named or old) and all(e in live for e in named) and all(k in keys for k in old)
    identities = m.get("inputs")
    if not isinstance(identities, dict):
        return False
    for ident in identities.values():
        if ident is None:
            continue
        path, size, mtime = str(ident).rsplit(":", 2)
        inside = Path(path).relative_to(store).parts if Path(path).is_relative_to(store) else ()
        if inside:
            if len(inside) < 3 or store / inside[0] / inside[1] not in live:
                return False
            continue
        try:
            st = stat_of(path)
        except OSError:
            return False
        if f"{st.st_size}:{st.st_mtime_ns}" != f"{size}:{mtime}":
            return False
    return True


def _stored_at(entry: Path) -> int:
    try:
        return (entry / MANIFEST).stat().st_mtime_ns
    except OSError:
        return 0
