"""Benchmark of the remote store, printed as ratios against baselines measured in the same run.

    .venv/bin/python bench/bench_remote.py [SIZE_GIB]      (needs docker-registry: ./setup.sh)

A disk-sized sparse file (default 2 GiB apparent, ~10% of it data: half random, half text-like)
is pushed to and pulled from a throwaway CNCF distribution registry on 127.0.0.1 whose storage
sits on the same disk. Each push and pull runs in a fresh process that reports its wall time
and peak RSS.

1. push seconds / `cp` of the file to the registry's disk        (what the network client costs)
   and / `zstd -3 -c FILE | sha256sum` (the work a push cannot skip: every apparent byte read,
   compressed and hashed)
2. pull seconds / the same `cp`
3. re-push of the same files under another key / push            (blobs found by HEAD, not sent)
4. bytes sent / apparent size and / allocated size                (the zeros are not shipped)
5. client peak RSS of push and pull, MiB                          (bounded: not the file size)

The machine may be small and shared: times are noisy, and nothing here asserts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' registry helper, as pytest sees it

from registry import serve  # noqa: E402

from pipeline import entries, oci  # noqa: E402

STEP = """
import json, resource, sys, time
from pathlib import Path
from pipeline import oci, remote
r = oci.Remote.parse(sys.argv[1])
op, key, path = sys.argv[2], sys.argv[3], Path(sys.argv[4])
t = time.monotonic()
ok = remote.push_entry(r, "bench", key, path) if op == "push" else remote.pull_entry(r, "bench", key, path)
assert ok, op
print(json.dumps({"s": time.monotonic() - t, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def step(url: str, op: str, key: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOCKER_CONFIG": "/nonexistent"}
    env.pop("LDT_REMOTE_USER", None)
    out = subprocess.run([sys.executable, "-c", STEP, url, op, key, str(path)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout)


def make_disk(path: Path, size: int) -> None:
    text = b"".join(b"%08d usr/lib/x86_64-linux-gnu/libsomething.so.%d\n" % (i, i % 97) for i in range(30000))
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, 64 << 20)):
            f.seek(off)
            f.write(os.urandom(3 << 20) if i % 2 else (text * 4)[: 6 << 20 ])


def timed(cmd: list[str]) -> float:
    t = time.monotonic()
    subprocess.run(cmd, check=True)
    return time.monotonic() - t


def main() -> None:
    size = int(float(sys.argv[1]) * (1 << 30)) if len(sys.argv) > 1 else 2 << 30
    with tempfile.TemporaryDirectory(prefix="ldt-bench-remote-", dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        tmp = Path(d)
        entry = tmp / "entry"
        entry.mkdir()
        make_disk(entry / "disk.img", size)
        (entry / "manifest.json").write_text(json.dumps({"files": entries.file_records(entry)}))
        st = os.stat(entry / "disk.img")
        with serve(tmp / "registry") as reg:
            cp = min(timed(["cp", entry / "disk.img", reg.root / f"cp{i}.img"]) for i in range(2))
            floor = timed(["sh", "-c", f"zstd -q -3 -c {entry / 'disk.img'} | sha256sum >/dev/null"])
            push = step(reg.url, "push", "k1", entry)
            repush = step(reg.url, "push", "k2", entry)
            pulled = tmp / "pulled"
            pulled.mkdir()
            pull = step(reg.url, "pull", "k1", pulled)
            doc = json.loads(subprocess.run(
                ["curl", "-sf", "-H", f"Accept: {oci.OCI_MANIFEST}", f"http://{reg.host}/v2/ldt/bench/manifests/k1"],
                capture_output=True, check=True).stdout)
        sent = sum(d["size"] for d in doc["layers"]) + doc["config"]["size"]
        pst = os.stat(pulled / "disk.img")
        mib = 1 << 20
        print(f"file: {size / mib:.0f} MiB apparent, {st.st_blocks * 512 / mib:.0f} MiB allocated; "
              f"cp to the registry's disk {cp:.2f}s")
        print(f"1. push / cp              {push['s'] / cp:6.2f}x   ({push['s']:.2f}s, "
              f"{size / mib / push['s']:.0f} MiB/s apparent)")
        print(f"   push / zstd|sha256sum  {push['s'] / floor:6.2f}x   ({floor:.2f}s)")
        print(f"2. pull / cp              {pull['s'] / cp:6.2f}x   ({pull['s']:.2f}s, "
              f"{size / mib / pull['s']:.0f} MiB/s apparent)")
        print(f"3. re-push / push         {repush['s'] / push['s']:6.2f}x   ({repush['s']:.2f}s)")
        print(f"4. sent / apparent        {sent / size:6.4f}    sent / allocated {sent / (st.st_blocks * 512):.3f}"
              f"   ({sent / mib:.1f} MiB)")
        print(f"5. peak RSS push {push['rss'] / mib:.0f} MiB, pull {pull['rss'] / mib:.0f} MiB; "
              f"pulled file allocated {pst.st_blocks * 512 / mib:.0f} MiB")


if __name__ == "__main__":
    main()
