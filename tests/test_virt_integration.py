"""virt against real VMs: exit codes, separate streams, stdin, /work sharing and ownership,
read-only /work, timeouts and the image checks.

Each case is one `virt` process (real stdin/stdout/stderr descriptors)
with its own timeout, so no guest outlives a test. Each boot costs a few seconds under TCG.
The `virt` cases run twice: booted (--cold) and resumed from the snapshot (pipeline/resume.py)
the session makes once; the resumed-only cases check what each restore must make fresh.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import doit

from pipeline import firmware, kvm, qemu, resume
from pipeline.run import run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
VIRT = "from pipeline.cli import virt; virt()"  # the `virt` console script, with this interpreter
GUARD = 240  # seconds: the test's own limit on one virt process, whatever virt does


@pytest.fixture(scope="session")
def virt_artifacts(built_hello) -> Iterator[tuple[Path, Path, Path]]:
    """(kernel, initrd, rootfs) of the built-in recipes/virt, built through the graph.

    Copied (sparse) into a world-readable folder, so a test can run virt as another user.
    """
    if shutil.which(qemu.QEMU) is None:
        pytest.fail(f"{qemu.QEMU} is not installed ({firmware.QEMU_HINT})")
    doit("extract_boot:virt", "build_rootfs:virt")
    built = ROOT / "cache" / "recipes" / "virt"
    dest = Path(tempfile.mkdtemp(prefix="ldt-virt-artifacts-"))
    try:
        dest.chmod(0o755)
        for name in ("vmlinuz", "initrd.img", "rootfs.ext4"):
            run(["cp", "--sparse=always", (built / name).resolve(), dest / name])
            (dest / name).chmod(0o644)
        # the first run says once that root is not needed (cache/notices/): not part of the tests' streams
        subprocess.run([sys.executable, "-c", VIRT, "--kernel", dest / "vmlinuz", "--initrd", dest / "initrd.img",
                        "--rootfs", dest / "rootfs.ext4", "--", "true"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, timeout=GUARD, check=True)
        yield dest / "vmlinuz", dest / "initrd.img", dest / "rootfs.ext4"
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@pytest.fixture(scope="session")
def accel() -> str:
    """What select_accel() picks here (TCG on the nested hosts this was written on)."""
    return str(kvm.select_accel(env={}, notice=False).accel)


@pytest.fixture(scope="session")
def fast_boot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("virt-cache")


def _virt_caller(virt_artifacts, accel, fast_boot_cache, mode: str):
    """virt(*command, cwd=…, input=b"…", options=[…], user=[…]) -> CompletedProcess (bytes)."""
    kernel, initrd, rootfs = virt_artifacts
    cold = ["--cold"] if mode == "cold" else []

    def call(*command: str, cwd: Path, input: bytes = b"", options=(), python=sys.executable, prefix=(),
             env=None, rootfs_path: Path = rootfs) -> subprocess.CompletedProcess:  # fmt: skip
        args = [
            *prefix, python, "-c", VIRT,
            "--kernel", kernel, "--initrd", initrd, "--rootfs", rootfs_path, "--accel", accel,
            *cold, *options, "--", *command,
        ]  # fmt: skip
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(fast_boot_cache)}
        full_env.pop("LDT_VERBOSE", None)
        full_env.update(env or {})
        start = time.monotonic()
        proc = subprocess.run(
            [os.fspath(a) for a in args], cwd=cwd, input=input, capture_output=True, env=full_env, timeout=GUARD
        )
        print(f"virt {mode} {' '.join(command)!r}: exit {proc.returncode} in {time.monotonic() - start:.1f}s")
        return proc

    return call


@pytest.fixture(scope="session")
def snapshot(virt_artifacts, accel, fast_boot_cache, tmp_path_factory) -> Iterator[Path]:
    """The session's snapshot entry: made by a first run, which says so under LDT_VERBOSE=1;
    removed at the end (its key is this session's copy of the root image: nothing reuses it)."""
    call = _virt_caller(virt_artifacts, accel, fast_boot_cache, "resumed")
    proc = call("true", cwd=tmp_path_factory.mktemp("snap"), env={"LDT_VERBOSE": "1"})
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    made = re.search(r"virt: resuming snapshot (\w+)", err)
    assert made is not None and "booting cold" not in err, err[-3000:]
    (entry,) = (ROOT / "cache" / "store" / resume.STAGE).glob(f"{made.group(1)}*")
    yield entry
    shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(params=["cold", "resumed"])
def virt(request, virt_artifacts, accel, fast_boot_cache):
    if request.param == "resumed":
        request.getfixturevalue("snapshot")
    return _virt_caller(virt_artifacts, accel, fast_boot_cache, request.param)


@pytest.fixture
def resumed(virt_artifacts, accel, fast_boot_cache, snapshot):
    return _virt_caller(virt_artifacts, accel, fast_boot_cache, "resumed")


def test_true_exits_0_with_empty_streams(virt, tmp_path: Path):
    proc = virt("true", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


def test_stdout_and_stderr_stay_separate_and_clean(virt, tmp_path: Path):
    proc = virt("sh", "-c", "echo out; echo err >&2; echo err2 > /dev/stderr; exit 3", cwd=tmp_path)
    assert proc.returncode == 3
    assert proc.stdout == b"out\n"  # no kernel or init messages in either stream
    assert proc.stderr == b"err\nerr2\n"


def test_stdin_is_passed_through_to_eof(virt, tmp_path: Path):
    data = os.urandom(3 << 20)  # bigger than every buffer on the way, in both directions
    proc = virt("sh", "-c", "cat; echo done >&2", cwd=tmp_path, input=data)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert proc.stderr == b"done\n"


def test_timeout_kills_the_vm_with_124(virt, tmp_path: Path):
    start = time.monotonic()
    proc = virt("sleep", "600", cwd=tmp_path, options=["--timeout", "5"])
    assert proc.returncode == 124
    assert proc.stderr.decode().strip().splitlines() == ["ldt: virt: timed out after 5s, VM killed"]
    assert time.monotonic() - start < 60


def test_work_is_the_current_directory_and_files_are_the_callers(virt, tmp_path: Path):
    (tmp_path / "from-host").write_text("hello from the host\n")
    script = "cat from-host; pwd; echo made > made-in-guest; mkdir -p d/e; touch d/e/f"
    proc = virt("sh", "-c", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hello from the host\n/work\n"
    assert (tmp_path / "made-in-guest").read_text() == "made\n"
    for p in (tmp_path / "made-in-guest", tmp_path / "d", tmp_path / "d" / "e" / "f"):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p


def test_nothing_outside_the_current_directory_is_reachable(virt, tmp_path: Path):
    (tmp_path / "secret-outside").write_text("host secret\n")
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "visible").write_text("")
    script = (
        "ls -A /work; ls -A /work/.. | grep -c secret-outside;"
        "cat /work/../secret-outside 2>/dev/null || echo unreachable;"
        f"test -e {tmp_path}/secret-outside || echo no-host-path"
    )
    proc = virt("sh", "-c", script, cwd=inside)
    assert proc.stdout.decode().split() == ["visible", "0", "unreachable", "no-host-path"], proc.stderr


def test_read_only_work_refuses_writes(virt, tmp_path: Path):
    (tmp_path / "readable").write_text("yes\n")
    proc = virt("sh", "-c", "cat readable; echo x > new", cwd=tmp_path, options=["--ro"])
    assert proc.returncode != 0
    assert proc.stdout == b"yes\n"
    assert b"Read-only file system" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_files_belong_to_a_non_root_caller(virt):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the nobody user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    env = {"HOME": "/nonexistent", "XDG_CACHE_HOME": "/nonexistent"}
    python = next(
        (
            p
            for p in (sys.executable, "/usr/bin/python3")
            if subprocess.run(
                [*prefix, p, "-c", "import pipeline.cli"], env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                capture_output=True,
            ).returncode == 0
        ),
        None,
    )  # fmt: skip
    if python is None:
        pytest.skip("no Python 3.11 that the nobody user can run with this checkout")
    work = Path(tempfile.mkdtemp(prefix="ldt-virt-nobody-"))  # pytest's tmp_path is private to root
    try:
        shutil.chown(work, "nobody", "nogroup")
        proc = virt("sh", "-c", "echo hi > made; mkdir d; id -u", cwd=work, python=python, prefix=prefix, env=env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"0\n"  # root in the guest…
        nobody = (work.stat().st_uid, work.stat().st_gid)
        for p in (work / "made", work / "d"):  # …and the invoking user's files on the host
            assert (p.stat().st_uid, p.stat().st_gid) == nobody, p
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_image_without_the_modules_is_a_clear_error(virt, tmp_path: Path):
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "sh").write_text("#!/not/a/shell\n")
    (tree / "bin" / "sh").chmod(0o755)
    image = tmp_path / "bare.ext4"
    run(["mkfs.ext4", "-q", "-F", "-d", tree, image, "16M"])
    work = tmp_path / "work"
    work.mkdir()
    proc = virt("true", cwd=work, rootfs_path=image, options=["--timeout", "120"])
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "error: module virtio_console is missing from the image" in err
    assert "hint:" in err and "linux-image-amd64" in err


def test_refuses_to_share_the_root_directory(virt):
    proc = virt("true", cwd=Path("/"))
    assert proc.returncode == 2
    assert b"refusing to share /" in proc.stderr


def test_image_option_boots_another_recipe(built_hello, tmp_path: Path):
    """`virt --image hello`: the hello recipe's own kernel and userspace, built through the graph."""
    doit("extract_boot:hello", "build_rootfs:hello")
    proc = subprocess.run([sys.executable, "-c", VIRT, "--image", "hello", "--", "cat", "/etc/hostname"],
                          cwd=tmp_path, capture_output=True, timeout=GUARD)
    assert (proc.returncode, proc.stdout) == (0, b"hello\n"), proc.stderr.decode(errors="replace")[-2000:]


# -- what a resumed run must make fresh ---------------------------------------------------------


def test_a_resumed_run_says_so_only_when_verbose(resumed, snapshot, tmp_path: Path):
    quiet = resumed("true", cwd=tmp_path)
    loud = resumed("true", cwd=tmp_path, env={"LDT_VERBOSE": "1"})
    assert (quiet.returncode, quiet.stderr) == (0, b"")
    assert f"virt: resuming snapshot {snapshot.name[:12]}" in loud.stderr.decode()


def test_two_runs_never_share_random_state(resumed, tmp_path: Path):
    script = "cat /proc/sys/kernel/random/uuid; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    first, second = (resumed("sh", "-c", script, cwd=tmp_path) for _ in range(2))
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    a, b = first.stdout.split(), second.stdout.split()
    assert len(a) == len(b) == 2
    assert a[0] != b[0] and a[1] != b[1]


def test_the_guest_clock_is_the_hosts(resumed, tmp_path: Path):
    before = time.time()
    proc = resumed("date", "+%s", cwd=tmp_path)
    after = time.time()
    assert proc.returncode == 0, proc.stderr
    assert before - 2 <= int(proc.stdout) <= after + 2


def test_writes_outside_work_do_not_reach_the_next_run(resumed, tmp_path: Path):
    first = resumed("sh", "-c", "echo leak > /etc/ldt-leak && echo leak > /root/ldt-leak && sync", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = resumed("sh", "-c", "ls /etc/ldt-leak /root/ldt-leak 2>/dev/null; echo checked", cwd=tmp_path)
    assert second.stdout == b"checked\n"


def test_two_runs_at_once_from_one_snapshot(virt_artifacts, accel, fast_boot_cache, snapshot, tmp_path: Path):
    kernel, initrd, rootfs = virt_artifacts
    args = [sys.executable, "-c", VIRT, "--kernel", kernel, "--initrd", initrd, "--rootfs", rootfs, "--accel", accel,
            "--", "sh", "-c", "cat; echo $0 > \"$0\"; exit 5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(fast_boot_cache)}
    env.pop("LDT_VERBOSE", None)
    procs = [subprocess.Popen([*map(os.fspath, args[:-1]), args[-1], name], cwd=tmp_path, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("one", "two")]  # fmt: skip
    outs = [p.communicate(input=name.encode(), timeout=GUARD) for p, name in zip(procs, ("one", "two"), strict=True)]
    assert [p.returncode for p in procs] == [5, 5], outs
    assert [o for o, _ in outs] == [b"one", b"two"]
    assert (tmp_path / "one").read_text() == "one\n" and (tmp_path / "two").read_text() == "two\n"


def _damage_truncated(entry: Path) -> None:
    with open(entry / resume.STATE, "r+b") as f:
        f.truncate(4096)


def _damage_unloadable(entry: Path) -> None:
    """What a state written by another QEMU build looks like to this one: the entry's checks
    pass (sizes, hash), QEMU refuses the stream."""
    import json

    from pipeline.cache import MANIFEST, file_record, hash_file, manifest_json

    state = entry / resume.STATE
    state.write_bytes(b"QEVM" + os.urandom(state.stat().st_size - 4))
    info = json.loads((entry / resume.INFO).read_text())
    info["state_xxh3"] = hash_file(state)
    (entry / resume.INFO).write_text(json.dumps(info))
    stored = json.loads((entry / MANIFEST).read_text())  # the store's record agrees too: a consistent entry
    stored["files"].update({n: file_record(entry / n) for n in (resume.STATE, resume.INFO)})
    (entry / MANIFEST).write_text(manifest_json(stored))


@pytest.mark.parametrize("damage, reason", [
    (lambda e: shutil.rmtree(e), "no snapshot for this image and these settings yet"),
    (_damage_truncated, "has a changed vm.state (size 4096"),
    (_damage_unloadable, "the restore failed"),
], ids=["deleted", "truncated", "unloadable"])  # fmt: skip
def test_a_bad_snapshot_is_never_an_error(resumed, snapshot, tmp_path: Path, damage, reason):
    damage(snapshot)
    proc = resumed("sh", "-c", "echo ran", cwd=tmp_path, env={"LDT_VERBOSE": "1"})
    err = proc.stderr.decode(errors="replace")
    assert (proc.returncode, proc.stdout) == (0, b"ran\n"), err[-3000:]
    assert reason in err
    again = resumed("true", cwd=tmp_path)  # a good snapshot again (made now, or by this run)
    assert (again.returncode, again.stderr) == (0, b"")
    assert (snapshot / resume.INFO).is_file()
