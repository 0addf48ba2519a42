"""virt against real VMs: exit codes, separate streams, stdin, /work sharing and ownership,
read-only /work, timeouts and the image checks.

Each case is one `virt` process (real stdin/stdout/stderr descriptors)
with its own timeout, so no guest outlives a test. Each boot costs a few seconds under TCG.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import doit

from pipeline import qemu
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
        pytest.fail(f"{qemu.QEMU} is not installed ({qemu.QEMU_HINT})")
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
    return str(qemu.select_accel(env={}, notice=False).accel)


@pytest.fixture(scope="session")
def fast_boot_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("virt-cache")


@pytest.fixture
def virt(virt_artifacts, accel, fast_boot_cache):
    """virt(*command, cwd=…, input=b"…", options=[…], user=[…]) -> CompletedProcess (bytes)."""
    kernel, initrd, rootfs = virt_artifacts

    def call(*command: str, cwd: Path, input: bytes = b"", options=(), python=sys.executable, prefix=(),
             env=None, rootfs_path: Path = rootfs) -> subprocess.CompletedProcess:  # fmt: skip
        args = [
            *prefix, python, "-c", VIRT,
            "--kernel", kernel, "--initrd", initrd, "--rootfs", rootfs_path, "--accel", accel,
            *options, "--", *command,
        ]  # fmt: skip
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(fast_boot_cache), **(env or {})}
        full_env.pop("LDT_VERBOSE", None)
        start = time.monotonic()
        proc = subprocess.run(
            [os.fspath(a) for a in args], cwd=cwd, input=input, capture_output=True, env=full_env, timeout=GUARD
        )
        print(f"virt {' '.join(command)!r}: exit {proc.returncode} in {time.monotonic() - start:.1f}s")
        return proc

    return call


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
