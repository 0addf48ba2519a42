"""Benchmark of a CI fleet sharing the store, printed as ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_fleet.py [--no-docker-cache]   (needs the Docker engine and docker-registry)

A throwaway CNCF distribution registry on 127.0.0.1 (own storage, free port, stopped at the end)
is the fleet's shared store. Runners are throwaway projects: dodo.py, debian-bookworm's
recipe.toml and recipes/hello copied from this repository (hello as `ldtf-hello`, so the engine's
`ldt/hello` tags of other work are never touched), each with an empty cache/.

1. registry bytes after A's cold build and pushes / hello's tgz (goal <= 1.2; the base's tgz is in
   there too). Entries are blocks in shared packs (docs/store.md): a pack counts for the first
   stage that names it
2. one Dockerfile edit in A (`RUN echo rev2 > /etc/rev`), rebuilt with A's own engine layer cache
   and pushed: the registry's growth / the new tgz (what one recipe revision costs, goal <= 0.05)
3. runner B (fresh clone, pulls A's second revision) / runner A's cold build   goal <= 0.15
   `doit build_syslinux_bios:ldtf-hello build_efistub:ldtf-hello` in each; B must run no docker
   build and no mmdebstrap, and its artifacts must be byte-identical to A's (sha256).
   A's mmdebstrap is cold; its docker build may be warm from the engine's layer cache (the output
   says how many steps were cached): --no-docker-cache renames the base recipe too, so the base is
   imported anew and every Dockerfile step runs. Before B, the ldt/ldtf-* tags are removed from
   the engine, as on a fresh runner (B imports nothing: a pulled tgz enters the engine only when a
   FROM or suco needs it). Each entry must be pulled at most once in B's run.
4. where B's time goes: each pull (from its task's start to its `pulled from` line, with the
   entry's bytes in the registry), and the rest (doit, keys, checks)
5. no-op `doit` with 10 recipes up to date: LDT_REMOTE set / unset      goal < 0.5 s absolute
   and LDT_REMOTE at a port where nothing listens / unset (the same time and no warning: no round trip)

The machine may be small and shared: times are noisy, and nothing here asserts them.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' project and registry helpers, as pytest sees them

from conftest import BOOTSTRAP_TOML, DOIT, make_project  # noqa: E402
from registry import Registry, env_without_credentials, free_port, serve  # noqa: E402

from pipeline.oci import OCI_MANIFEST  # noqa: E402

PREFIX = "ldtf-"  # every recipe (and so every ldt/<name> image) this bench makes
HELLO = f"{PREFIX}hello"
TASKS = (f"build_syslinux_bios:{HELLO}", f"build_efistub:{HELLO}")
DISKS = ("rootfs.tgz", "vmlinuz", "initrd.img", "rootfs.ext4", "bios.img", "uefi.img")
MIB = 1 << 20


# -- running doit with a timeline ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    lines: list[tuple[float, str]]  # (seconds since start, line), stdout and stderr interleaved

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def env_for(remote: str | None) -> dict[str, str]:
    env = {**env_without_credentials(), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "DOCKER_CONFIG": "/nonexistent"}
    if remote:
        env["LDT_REMOTE"] = remote
    return env


def run_doit(project: Path, *args: str, remote: str | None) -> Run:
    """doit in a project, each output line stamped as it arrives."""
    start = time.monotonic()
    lines = []
    with subprocess.Popen([*DOIT, *args], cwd=project, env=env_for(remote), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
    run = Run(time.monotonic() - start, lines)
    if proc.returncode != 0:
        raise SystemExit(f"doit {' '.join(args)} in {project} failed ({proc.returncode}):\n{run.text[-4000:]}")
    return run


def timed(cases: dict[str, tuple[Path, str | None]], repeat: int = 5) -> dict[str, tuple[float, str]]:
    """Median wall time of a bare `doit` per case (project, LDT_REMOTE), the cases interleaved so a
    load change on the machine hits them alike; with the output of each case's last run. Python
    may cache its bytecode, as it does on a user's machine (a PYTHONDONTWRITEBYTECODE=1 in this
    environment would have every run compile the whole of pipeline/ again: about 0.25 s here); a
    first run of each case, not counted, writes the caches."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    out: dict[str, str] = {}
    for i in range(repeat + 1):
        for name, (project, remote) in cases.items():
            env = {k: v for k, v in env_for(remote).items() if k != "PYTHONDONTWRITEBYTECODE"}
            t = time.perf_counter()
            proc = subprocess.run(DOIT, cwd=project, env=env, capture_output=True, text=True, check=True)
            if i:
                times[name].append(time.perf_counter() - t)
            out[name] = proc.stdout + proc.stderr
    return {name: (statistics.median(times[name]), out[name]) for name in cases}


# -- the projects and the engine -----------------------------------------------------------------


def fleet_recipes(cold_docker: bool) -> tuple[str, dict[str, dict[str, str]]]:
    """(base recipe name, recipes): debian-bookworm and hello from this repository."""
    base = f"{PREFIX}debian-bookworm" if cold_docker else "debian-bookworm"
    hello = {f.name: f.read_text() for f in (ROOT / "recipes" / "hello").iterdir() if f.is_file()}
    hello["Dockerfile"] = hello["Dockerfile"].replace("FROM ldt/debian-bookworm", f"FROM ldt/{base}")
    return base, {base: {"recipe.toml": BOOTSTRAP_TOML}, HELLO: hello}


def our_images() -> list[str]:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                         text=True, check=True).stdout.split()
    return [ref for ref in out if ref.startswith(f"ldt/{PREFIX}")]


def untag_ours() -> None:
    """Remove this bench's tags (an image another tag shares stays; never -f)."""
    refs = our_images()
    if refs:
        subprocess.run(["docker", "rmi", *refs], capture_output=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def digests(project: Path) -> dict[str, str]:
    return {n: sha256(project / "cache" / "recipes" / HELLO / n) for n in DISKS}


def tgz_size(project: Path, recipe: str) -> int:
    return (project / "cache" / "recipes" / recipe / "rootfs.tgz").stat().st_size


# -- the registry's side -------------------------------------------------------------------------


def blobs(reg: Registry) -> dict[str, int]:
    """{digest: stored bytes} of every blob in the registry's storage."""
    root = reg.root / "docker" / "registry" / "v2" / "blobs" / "sha256"
    return {f"sha256:{d.parent.name}": d.stat().st_size for d in root.glob("*/*/data")}


def entries(reg: Registry) -> dict[tuple[str, str], dict[str, int]]:
    """{(stage, key): {blob digest: size}} of every entry manifest (config and layers)."""
    base = f"http://{reg.host}/v2"
    repos = requests.get(f"{base}/_catalog", timeout=10).json().get("repositories") or []
    out = {}
    for repo in repos:
        stage = repo.split("/")[-1]
        for tag in requests.get(f"{base}/{repo}/tags/list", timeout=10).json().get("tags") or []:
            doc = requests.get(f"{base}/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}, timeout=10).json()
            out[(stage, tag)] = {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]}
    return out


def by_stage(new: dict[tuple[str, str], dict[str, int]], fresh: set[str]) -> dict[str, int]:
    """Bytes of the fresh blobs, per stage (a blob two stages share counts once, for the first)."""
    seen: set[str] = set()
    out: dict[str, int] = {}
    for (stage, _), layers in sorted(new.items()):
        for digest, size in layers.items():
            if digest in fresh and digest not in seen:
                seen.add(digest)
                out[stage] = out.get(stage, 0) + size
    return out


# -- reading a run's timeline --------------------------------------------------------------------

TASK_LINE = re.compile(r"^(?:\.|--) +(\S+)$")
PULLED = re.compile(r"^ldt: (\w+):([0-9a-f]{12}) pulled from ")
PUSHED = re.compile(r"^ldt: (\w+):([0-9a-f]{12}) pushed to ")
IMPORTING = re.compile(r"^ldt: (\S+): importing ")
BUILT = {"docker build": re.compile(r"^ldt: \S+: docker build "),  # what a runner that only pulls never does
         "mmdebstrap": re.compile(r"^ldt: bootstrap \S+: [\d.]+ MiB in ")}


def layer_cache(run: Run) -> tuple[int, int]:
    """(steps the engine's layer cache served, steps) of the docker builds in a run (FROM not counted)."""
    steps = sum(1 for _, line in run.lines if re.match(r"^Step \d+/\d+ : (?!FROM)", line))
    return run.text.count("Using cache"), steps


def tasks(run: Run) -> list[tuple[str, float]]:
    """(task, seconds from its start line to the next task's, or to the end) of the tasks doit ran."""
    starts = [(m.group(1), t) for t, line in run.lines if (m := TASK_LINE.match(line)) and line.startswith(".")]
    ends = [t for _, t in starts[1:]] + [run.seconds]
    return [(name, end - t) for (name, t), end in zip(starts, ends, strict=True)]


def pulls(run: Run) -> list[tuple[str, str, float]]:
    """(stage, key12, seconds from its task's start to its `pulled from` line)."""
    out, task_start = [], 0.0
    for t, line in run.lines:
        if TASK_LINE.match(line):
            task_start = t
        elif m := PULLED.match(line):
            out.append((m.group(1), m.group(2), t - task_start))
    return out


def after_line(run: Run, pattern: re.Pattern) -> list[tuple[str, float]]:
    """(first group, seconds until the next line) of each matching line: a step ended by it."""
    out = []
    for i, (t, line) in enumerate(run.lines):
        if m := pattern.match(line):
            nxt = run.lines[i + 1][0] if i + 1 < len(run.lines) else run.seconds
            out.append((m.group(1), nxt - t))
    return out


def before_line(run: Run, pattern: re.Pattern) -> list[tuple[str, float]]:
    """(first group, seconds since the previous line) of each matching line: a step it reports."""
    out = []
    for i, (t, line) in enumerate(run.lines):
        if m := pattern.match(line):
            out.append((m.group(1), t - (run.lines[i - 1][0] if i else 0.0)))
    return out


# -- the bench -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-docker-cache", action="store_true",
                    help="a base recipe of its own, so the docker build of hello uses no cached layer")
    opts = ap.parse_args()
    if shutil.which("docker-registry") is None:
        raise SystemExit("needs docker-registry (./setup.sh installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="ldt-bench-fleet-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    summary: list[tuple[str, str, str, str, str]] = []
    try:
        with serve(tmp / "registry") as reg:
            bench(tmp, reg, opts.no_docker_cache, summary)
    finally:
        untag_ours()
        subprocess.run(["chmod", "-R", "u+w", str(tmp)], capture_output=True)  # store entries are read-only
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nsummary (one run on a shared machine: noisy)")
    print(f"  {'measure':<44} {'value':>10} {'baseline':>10} {'ratio':>8}  goal")
    for row in summary:
        print(f"  {row[0]:<44} {row[1]:>10} {row[2]:>10} {row[3]:>8}  {row[4]}")


def bench(tmp: Path, reg: Registry, cold_docker: bool, summary: list) -> None:
    base, recipes = fleet_recipes(cold_docker)
    url = reg.url

    # 1. A builds cold and pushes, then builds one more revision (with its engine's layer cache, as on
    # A's own machine); then B starts empty and pulls that revision
    a = make_project(tmp / "a", recipes, seed_store=False)
    print(f"registry {url}, storage {reg.root}")
    print(f"runner A: doit {' '.join(TASKS)} (empty cache/, LDT_REMOTE set) ...", flush=True)
    run_a = run_doit(a, *TASKS, remote=url)
    print(f"runner A, {run_a.seconds:.1f}s: " + ", ".join(f"{n} {s:.1f}s" for n, s in tasks(run_a)), flush=True)
    cached, steps = layer_cache(run_a)
    after_a = blobs(reg)
    entries_a = entries(reg)
    tgz_a = tgz_size(a, HELLO)
    base_tgz = tgz_size(a, base)
    stored_a = sum(after_a.values())
    print(f"\n1. registry after A / hello's tgz   {stored_a / tgz_a:6.2f}x   ({stored_a / MIB:.0f} MiB stored; "
          f"hello's tgz {tgz_a / MIB:.0f} MiB, {base}'s {base_tgz / MIB:.0f} MiB; "
          f"/ both tgz {stored_a / (tgz_a + base_tgz):.2f}x)")
    for stage, size in sorted(by_stage(entries_a, set(after_a)).items(), key=lambda x: -x[1]):
        print(f"     {stage:<10} {size / MIB:8.1f} MiB")
    dockerfile = a / "recipes" / HELLO / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "RUN echo rev2 > /etc/rev\n")
    print(f"runner A: {HELLO}'s Dockerfile + `RUN echo rev2 > /etc/rev`, rebuilt and pushed ...", flush=True)
    run_rev = run_doit(a, *TASKS, remote=url)
    after_rev = blobs(reg)
    fresh = set(after_rev) - set(after_a)
    grown = sum(after_rev[d] for d in fresh)
    tgz_rev = tgz_size(a, HELLO)
    new_entries = {k: v for k, v in entries(reg).items() if k not in entries_a}
    print(f"2. growth per revision / its tgz    {grown / tgz_rev:6.2f}x   ({grown / MIB:.0f} MiB new blobs "
          f"for {len(new_entries)} new entries, rebuild+push {run_rev.seconds:.0f}s; tgz {tgz_rev / MIB:.0f} MiB)")
    rev_cached, rev_steps = layer_cache(run_rev)
    print(f"     its docker build: {rev_cached} of {rev_steps} steps from the layer cache"
          + ("" if rev_cached + 1 >= rev_steps else " (the layer cache missed: packages installed anew, "
             "so kernel and initrd differ too)"))
    entries_all = entries(reg)
    shared = {d for layers in new_entries.values() for d in layers} - fresh
    for stage, size in sorted(by_stage(new_entries, fresh).items(), key=lambda x: -x[1]):
        print(f"     {stage:<10} {size / MIB:8.1f} MiB")
    print(f"     blobs of the new entries already in the registry, not sent again: {len(shared)} "
          f"({sum(after_a[d] for d in shared) / MIB:.1f} MiB)")
    summary.append(("registry after A / hello's tgz", f"{stored_a / MIB:.0f}MiB", f"{tgz_a / MIB:.0f}MiB",
                    f"{stored_a / tgz_a:.2f}x", "<= 1.2"))
    summary.append(("registry growth per revision / its tgz", f"{grown / MIB:.0f}MiB", f"{tgz_rev / MIB:.0f}MiB",
                    f"{grown / tgz_rev:.3f}x", "<= 0.05"))

    untag_ours()  # a fresh runner's engine holds none of them
    a_digests = digests(a)  # of the revision A built last
    recipes[HELLO]["Dockerfile"] = dockerfile.read_text()
    b = make_project(tmp / "b", recipes, seed_store=False)
    print("runner B: the same command, a fresh clone (empty cache/) ...", flush=True)
    run_b = run_doit(b, *TASKS, remote=url)
    built = [w for w, pattern in BUILT.items() if any(pattern.match(ln) for _, ln in run_b.lines)]
    same = digests(b) == a_digests
    ratio = run_b.seconds / run_a.seconds
    print(f"\n3. B / A                      {ratio:6.3f}x   (B {run_b.seconds:.1f}s, A {run_a.seconds:.1f}s; "
          f"goal <= 0.15)")
    ran = [w for w, pattern in BUILT.items() if any(pattern.match(ln) for _, ln in run_a.lines)]
    print(f"   A ran {' and '.join(ran) or 'neither mmdebstrap nor docker build (!)'}; docker build: "
          f"{cached} of {steps} steps from the engine's layer cache"
          + ("" if cold_docker else " (--no-docker-cache for none)"))
    pushes = before_line(run_a, PUSHED)
    print(f"   A's pushes: {len(pushes)} entries, about {sum(s for _, s in pushes):.1f}s of A "
          "(each from the line before its `pushed to` line)")
    print(f"   B: {'ran ' + ' and '.join(built) + ' (!)' if built else 'no docker build, no mmdebstrap'}; "
          f"{len(pulls(run_b))} entries pulled; artifacts {'byte-identical to' if same else 'DIFFERENT from'} "
          f"A's ({', '.join(DISKS)}, sha256)")
    counted = collections.Counter(f"{stage}:{key}" for stage, key, _ in pulls(run_b))
    twice = sorted(entry for entry, n in counted.items() if n > 1)
    print(f"   entries B pulled more than once: {', '.join(twice) if twice else 'none'}")
    summary.append(("B (fresh runner, pulls) / A (cold build)", f"{run_b.seconds:.1f}s", f"{run_a.seconds:.1f}s",
                    f"{ratio:.3f}x", "<= 0.15"))

    # 4. where B's time goes
    print(f"\n4. runner B, {run_b.seconds:.1f}s:")
    sizes = {(s, k[:12]): sum(v.values()) for (s, k), v in entries_all.items()}
    accounted = 0.0
    for stage, key, seconds in pulls(run_b):
        size = sizes.get((stage, key), 0)
        accounted += seconds
        print(f"     pull {stage:<6} {key}  {seconds:6.2f}s  {size / MIB:7.1f} MiB  {size / MIB / seconds:6.0f} MiB/s")
    for name, seconds in after_line(run_b, IMPORTING):
        accounted += seconds
        print(f"     docker import of {name}'s tgz  {seconds:6.2f}s")
    print(f"     the rest (doit start, keys, checks, links)  {run_b.seconds - accounted:6.2f}s")
    said = [ln for _, ln in run_b.lines if ln.startswith("ldt: ") and " pulled from " not in ln]
    print("   what else B said: " + ("".join(f"\n     {ln}" for ln in said) if said else "nothing"))

    # 5. a no-op doit stays local
    noop = make_project(tmp / "noop", {base: {"recipe.toml": BOOTSTRAP_TOML},
                                       **{f"{PREFIX}r{i}": {"Dockerfile": f"FROM ldt/{base}\nRUN echo {i} > /bench\n"}
                                          for i in range(9)}}, seed_store=False)
    (noop / "cache").mkdir()
    subprocess.run(["cp", "-al", str(a / "cache" / "store"), str(noop / "cache" / "store")], check=True)
    print("\nno-op project: 10 recipes, built once without LDT_REMOTE ...", flush=True)
    run_doit(noop, remote=None)
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "dodo.py").write_text("def task_nothing():\n    return {'actions': None}\n")
    dead_url = f"oci://127.0.0.1:{free_port()}/ldt"  # nothing listens there
    before = blobs(reg)
    t = timed({"bare": (empty, None), "unset": (noop, None), "live": (noop, url), "dead": (noop, dead_url)})
    (bare, _), (unset, _), (live, live_out), (dead, dead_out) = t["bare"], t["unset"], t["live"], t["dead"]
    remote_said = [ln for ln in (live_out + dead_out).splitlines() if re.search(r"warning|pushed|pulled|remote", ln)]
    if blobs(reg) != before:
        remote_said.append("(!) the registry changed during the no-op runs")
    print(f"5. no-op, LDT_REMOTE set / unset    {live / unset:6.2f}x   ({live:.3f}s vs {unset:.3f}s; "
          f"bare doit on an empty dodo.py {bare:.3f}s; goal < 0.5 s)")
    print(f"   no-op, nothing listening / unset {dead / unset:6.2f}x   ({dead:.3f}s at {dead_url}); "
          + ("lines about the remote: " + "; ".join(remote_said) if remote_said else "no line about the remote"))
    summary.append(("no-op doit, 10 recipes, LDT_REMOTE set", f"{live:.3f}s", f"{unset:.3f}s",
                    f"{live / unset:.2f}x", "< 0.5 s"))
    summary.append(("no-op doit, LDT_REMOTE where nothing listens", f"{dead:.3f}s", f"{unset:.3f}s",
                    f"{dead / unset:.2f}x", "same, silent"))


if __name__ == "__main__":
    main()
