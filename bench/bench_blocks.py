"""Benchmark of the block layer (issue 17), printed as ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_blocks.py                       (needs the Docker engine: builds two revisions)
    .venv/bin/python bench/bench_blocks.py --rev1 DIR --rev2 DIR  (folders with rootfs.tgz, rootfs.ext4, bios.img,
                                                                   uefi.img, vmlinuz, vmlinux, initrd.img)

Without folders, two revisions of recipes/hello are built in a throwaway project (the recipe named
`ldtb-hello` so the engine's ldt/hello tags are never touched; its store seeded by hard links from
this repository's, so the Debian base is a store hit): rev1 = hello's Dockerfile, rev2 = the same
plus `RUN echo x > /etc/x` (a one-line edit).

1. chunking: fixed 4 KiB (blocks.Layout) vs content-defined (FastCDC, the `fastcdc` package's
   Cython cutter, fed in windows so memory stays bounded; skipped with a note if not installed):
   bytes of one artifact that another does not hold (across forms: bios.img, uefi.img and the tgz's
   tar vs rootfs.ext4; across revisions: rev2's ext4 vs rev1's), before compression.
2. the gzip layer: the tgz stored as its compressed bytes vs as its tar, per member (what the tgz
   adds to a store that holds the ext4).
3. a real BlockStore: rev1's whole chain, then rev2's: stored bytes / the tgz, baseline whole-file
   storage (each file as one zstd stream, as the registry holds it today; and the allocated
   bytes of the plain files, as cache/store holds them); indexes kept as blocks (put_index: the
   root is what is left) vs as whole files; frames of 1 vs 16 blocks.
4. resources: put and materialize of rev1's ext4 in a child process: peak RSS (goal < 200 MB) and
   time, materialize / `cp --sparse=always` of the same file.

Measured 2026-12-01 (after the FAT clusters and the UKI's kernel and initrd were put on 4 KiB
boundaries, disk.py): bios.img not in ext4 0.3 MiB and uefi.img 0.2 MiB (43.3 MiB each before);
rev1's whole chain 246.3 MiB of blocks = 1.05x its tgz (1.42x before; whole files as zstd 4.03x,
plain files on disk 10.84x); rev2 on top 2.4 MiB + 0.4 MiB of index roots = 0.012x; put of the
1130 MiB ext4 peak RSS 52 MiB, materialize 52 MiB (load 8 on 2 cores: materialize 13.7s = 4.2x
`cp --sparse`).

The machine may be small and shared: times are noisy, sizes are not.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.blocks import Layout, digest, is_zero  # noqa: E402
from pipeline.packs import BlockStore  # noqa: E402

try:
    from fastcdc.fastcdc_cy import fastcdc_cy
except ImportError:  # the comparison needs it; the layer does not
    fastcdc_cy = None

MIB = 1 << 20
NAME = "ldtb-hello"
CHAIN = ("rootfs.tgz", "vmlinuz", "vmlinux", "initrd.img", "rootfs.ext4", "bios.img", "uefi.img")
TASKS = [f"build_rootfs:{NAME}", f"build_syslinux_bios:{NAME}", f"build_efistub:{NAME}"]
EDIT = "RUN echo x > /etc/x\n"
CDC_AVG = (4096, 16384)
WINDOW = 64 * MIB


# -- the two revisions --------------------------------------------------------------------------


def hello_project(tmp: Path, name: str) -> Path:
    """A throwaway project with the debian-bookworm base and hello's recipe.toml as `name` (its
    Dockerfile is the caller's), the repository's store hard-linked in (bench_store uses it too)."""
    project = tmp / "project"
    (project / "recipes" / name).mkdir(parents=True)
    (project / "recipes" / "debian-bookworm").mkdir()
    shutil.copy(ROOT / "dodo.py", project)
    shutil.copy(ROOT / "recipes" / "debian-bookworm" / "recipe.toml", project / "recipes" / "debian-bookworm")
    shutil.copy(ROOT / "recipes" / "hello" / "recipe.toml", project / "recipes" / name)
    if (ROOT / "cache" / "store").is_dir():
        (project / "cache").mkdir()
        subprocess.run(["cp", "-al", ROOT / "cache" / "store", project / "cache" / "store"], check=True)
    return project


def build_revisions(tmp: Path) -> tuple[Path, Path]:
    project = hello_project(tmp, NAME)
    dockerfile = (ROOT / "recipes" / "hello" / "Dockerfile").read_text()
    revs = []
    for i, text in enumerate((dockerfile, dockerfile + EDIT), 1):
        (project / "recipes" / NAME / "Dockerfile").write_text(text)
        print(f"building rev{i} of {NAME} ...", flush=True)
        subprocess.run([sys.executable, "-m", "doit", *TASKS], cwd=project, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        rev = tmp / f"rev{i}"
        rev.mkdir()
        for f in CHAIN:
            os.symlink((project / "cache" / "recipes" / NAME / f).resolve(), rev / f)
        revs.append(rev)
    return revs[0], revs[1]


# -- chunk maps: digest -> bytes, zeros left out ------------------------------------------------


def fixed_map(f: BinaryIO, layout: Layout) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for piece in layout.pieces(f):
        if not is_zero(piece):
            out[digest(piece)] = len(piece)
    return out


_zero_hash: dict[int, str] = {}


def cdc_chunks(f: BinaryIO, avg: int) -> Iterator[tuple[str, int]]:
    """FastCDC over a stream, WINDOW bytes at a time: a chunk is cut from its first byte on, so the
    last (possibly forced) chunk of a window is cut again with the next window."""
    buf = b""
    while True:
        data = f.read(WINDOW)
        buf += data
        if not buf:
            return
        chunks = list(fastcdc_cy(buf, min_size=avg // 4, avg_size=avg, max_size=avg * 8, hf=hashlib.sha256))
        keep = chunks if not data else chunks[:-1]
        for c in keep:
            yield c.hash, c.length
        buf = buf[sum(c.length for c in keep):]
        if not data:
            return


def cdc_map(f: BinaryIO, avg: int) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for h, n in cdc_chunks(f, avg):
        if n not in _zero_hash:
            _zero_hash[n] = hashlib.sha256(bytes(n)).hexdigest()
        if h != _zero_hash[n]:
            out[bytes.fromhex(h)] = n
    return out


def not_in(a: dict[bytes, int], b: dict[bytes, int]) -> int:
    return sum(n for d, n in a.items() if d not in b)


def total(a: dict[bytes, int]) -> int:
    return sum(a.values())


def opener(path: Path, tar: bool):
    return gzip.open(path, "rb") if tar else open(path, "rb")


def chunking(rev1: Path, rev2: Path) -> None:
    print("\n1. chunking: bytes of A that B does not hold (zeros excluded), before compression")
    cutters = {"fixed 4K": lambda f, tar: fixed_map(f, Layout.TAR if tar else Layout.FIXED)}
    if fastcdc_cy is None:
        print("   (FastCDC skipped: `pip install fastcdc` to compare)")
    else:
        for avg in CDC_AVG:
            cutters[f"FastCDC {avg // 1024}K"] = lambda f, tar, avg=avg: cdc_map(f, avg)
    files = {"ext4": (rev1 / "rootfs.ext4", False), "bios": (rev1 / "bios.img", False),
             "uefi": (rev1 / "uefi.img", False), "tar": (rev1 / "rootfs.tgz", True),
             "ext4 rev2": (rev2 / "rootfs.ext4", False)}
    results: dict[str, dict[str, dict[bytes, int]]] = {}
    for name, cut in cutters.items():
        t = time.perf_counter()
        results[name] = {}
        for what, (path, tar) in files.items():
            with opener(path, tar) as f:
                results[name][what] = cut(f, tar)
        print(f"   {name}: cut in {time.perf_counter() - t:.0f}s", flush=True)
    rows = [("ext4 (all of it)", "ext4", None), ("bios.img not in ext4", "bios", "ext4"),
            ("uefi.img not in ext4", "uefi", "ext4"), ("tar (per member / stream) not in ext4", "tar", "ext4"),
            ("rev2 ext4 not in rev1 ext4", "ext4 rev2", "ext4")]
    print(f"   {'':<40}" + "".join(f"{n:>16}" for n in cutters))
    for label, a, b in rows:
        cells = []
        for name in cutters:
            m = results[name]
            value = total(m[a]) if b is None else not_in(m[a], m[b])
            cells.append(f"{value / MIB:12.1f} MiB")
        print(f"   {label:<40}" + "".join(f"{c:>16}" for c in cells))
    union: dict[str, int] = {}
    for name in cutters:
        seen: dict[bytes, int] = {}
        for what in files:
            seen.update(results[name][what])
        union[name] = total(seen)
    print(f"   {'unique bytes, all five':<40}" + "".join(f"{union[n] / MIB:12.1f} MiB" for n in cutters))
    print(f"   {'chunks of the ext4 (index entries)':<40}"
          + "".join(f"{len(results[n]['ext4']):>16}" for n in cutters))
    base = union["fixed 4K"]
    for name in cutters:
        print(f"   unique bytes {name} / fixed 4K: {union[name] / base:5.2f}x")


# -- a real store ---------------------------------------------------------------------------------


def zstd_size(path: Path) -> int:
    """A file as one zstd stream, as the registry stores a layer today (level 3)."""
    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
    n = 0
    with open(path, "rb") as f:
        for chunk in cctx.read_to_iter(f, read_size=MIB, write_size=MIB):
            n += len(chunk)
    return n


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def stored(store: BlockStore) -> int:
    return store.stats().stored


def store_chain(rev1: Path, rev2: Path, tmp: Path) -> None:
    tgz1, tgz2 = ((r / "rootfs.tgz").stat().st_size for r in (rev1, rev2))
    print(f"\n2. and 3. a BlockStore (zstd level 3 frames of 16 blocks), hello's tgz {tgz1 / MIB:.0f} MiB")
    store = BlockStore(tmp / "store")
    flat: dict[str, int] = {}  # a whole index per artifact and revision, as one file

    def put(path: Path) -> int:
        """Store an artifact and its index (as blocks, put_index); the bytes of the index's root."""
        idx = store.put(path)
        flat[str(path)] = len(idx.to_bytes())
        return len(store.put_index(idx).to_bytes())

    index_bytes = 0
    after_ext4 = 0
    for f in ("rootfs.ext4", "rootfs.tgz"):
        index_bytes += put(rev1 / f)
        if f == "rootfs.ext4":
            after_ext4 = stored(store)
    tgz_as_tar = stored(store) - after_ext4
    alone = BlockStore(tmp / "tgz-fixed")
    alone.put_file(rev1 / "rootfs.tgz", Layout.FIXED)
    print(f"   the tgz on top of the ext4: as its tar per member {tgz_as_tar / MIB:7.1f} MiB; "
          f"as its compressed bytes {stored(alone) / MIB:7.1f} MiB (shares nothing): "
          f"{tgz_as_tar / stored(alone):.3f}x")
    shutil.rmtree(alone.root)
    for f in CHAIN:
        if f not in ("rootfs.ext4", "rootfs.tgz"):
            index_bytes += put(rev1 / f)
    chain1 = stored(store)
    whole_zstd = sum(zstd_size(rev1 / f) for f in CHAIN)
    whole_disk = sum(allocated(rev1 / f) for f in CHAIN)
    print(f"   rev1 chain ({', '.join(CHAIN)}):")
    print(f"     blocks        {chain1 / MIB:8.1f} MiB  / tgz {chain1 / tgz1:5.2f}x   "
          f"(+ index roots {index_bytes / MIB:.1f} MiB: {(chain1 + index_bytes) / tgz1:5.2f}x)  goal <= 1.2x")
    print(f"     baseline: whole files as zstd  {whole_zstd / MIB:8.1f} MiB  / tgz {whole_zstd / tgz1:5.2f}x;"
          f"  plain files on disk {whole_disk / MIB:8.1f} MiB / tgz {whole_disk / tgz1:5.2f}x")
    print(f"     blocks / whole files as zstd {chain1 / whole_zstd:5.3f}x")
    index2 = 0
    for f in CHAIN:
        index2 += put(rev2 / f)
    grown = stored(store) - chain1
    zstd2 = sum(zstd_size(rev2 / f) for f in CHAIN)
    print("   rev2 (one-line edit) on top of rev1:")
    print(f"     blocks        {grown / MIB:8.1f} MiB  / tgz {grown / tgz2:6.3f}x   "
          f"(+ index roots {index2 / MIB:.1f} MiB: {(grown + index2) / tgz2:6.3f}x)  goal <= 0.05x")
    print(f"     baseline: whole files as zstd  {zstd2 / MIB:8.1f} MiB  / tgz {zstd2 / tgz2:5.2f}x")
    flat2 = sum(n for p, n in flat.items() if p.startswith(str(rev2)))
    print(f"     (indexes as whole files instead of blocks + roots: {flat2 / MIB:.1f} MiB per revision, "
          f"{(grown + flat2) / tgz2:6.3f}x)")
    one = BlockStore(tmp / "frame1", frame_blocks=1)
    one.put_file(rev1 / "rootfs.ext4")
    sixteen = BlockStore(tmp / "frame16")
    sixteen.put_file(rev1 / "rootfs.ext4")
    print(f"   frames, ext4 alone: 1 block per frame {stored(one) / MIB:.1f} MiB, 16 blocks per frame "
          f"{stored(sixteen) / MIB:.1f} MiB: {stored(one) / stored(sixteen):.2f}x")
    for s in (one, sixteen):
        shutil.rmtree(s.root)


# -- resources, in a child process so its peak RSS is its own -------------------------------------

# the peak RSS is VmHWM (this process image's own), not ru_maxrss: that one keeps the parent's
# RSS at fork time across exec, and the parent holds the chunk maps of part 1
CHILD = """
import json, re, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from pipeline.packs import BlockStore
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
store, src, dest = BlockStore(Path(sys.argv[2])), Path(sys.argv[3]), Path(sys.argv[4])
t = time.perf_counter(); idx = store.put(src); put = time.perf_counter() - t
rss_put = hwm()
t = time.perf_counter(); store.materialize(idx, dest); mat = time.perf_counter() - t
print(json.dumps({"put": put, "materialize": mat, "rss_put": rss_put, "rss": hwm()}))
"""


def resources(rev1: Path, tmp: Path) -> None:
    print("\n4. resources (a child process per file: put into an empty store, then materialize)")
    for f in ("rootfs.ext4", "rootfs.tgz"):
        src = rev1 / f
        out = subprocess.run([sys.executable, "-c", CHILD, ROOT, tmp / f"rss-{f}", src, tmp / f"out-{f}"],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        t = time.perf_counter()
        subprocess.run(["cp", "--sparse=always", src, tmp / f"cp-{f}"], check=True)
        cp = time.perf_counter() - t
        same = subprocess.run(["cmp", "-s", src, tmp / f"out-{f}"]).returncode == 0
        print(f"   {f:<12} {src.stat().st_size / MIB:6.0f} MiB: put {r['put']:5.1f}s, "
              f"peak RSS {r['rss_put'] / 1024:4.0f} MiB;"
              f" materialize {r['materialize']:5.1f}s, peak RSS {r['rss'] / 1024:4.0f} MiB (goal < 200); "
              f"byte-identical {same}; materialize / cp --sparse {r['materialize'] / cp:5.1f}x ({cp:.1f}s)",
              flush=True)
        for p in (tmp / f"out-{f}", tmp / f"cp-{f}"):
            p.unlink()
        shutil.rmtree(tmp / f"rss-{f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev1", type=Path)
    ap.add_argument("--rev2", type=Path)
    ap.add_argument("--only", choices=["chunking", "store", "resources"], action="append")
    args = ap.parse_args()
    only = set(args.only or ["chunking", "store", "resources"])
    with tempfile.TemporaryDirectory(prefix="bench-blocks-", dir=ROOT / "cache" if (ROOT / "cache").is_dir()
                                     else None) as d:
        tmp = Path(d)
        rev1, rev2 = (args.rev1, args.rev2) if args.rev1 and args.rev2 else build_revisions(tmp)
        print(f"rev1 {rev1}, rev2 {rev2}")
        if "chunking" in only:
            chunking(rev1, rev2)
        if "store" in only:
            store_chain(rev1, rev2, tmp)
        if "resources" in only:
            resources(rev1, tmp)


if __name__ == "__main__":
    main()
