"""Shared fixtures.

Integration fixtures build the repository's own recipes through the real pipeline (real Docker
engine, real mmdebstrap) into the repository's cache/, so a second run reuses the store.
On a laptop without a Docker daemon they skip with a reason; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOIT = [sys.executable, "-m", "doit"]
IN_CI = os.environ.get("CI", "") not in ("", "0", "false")


# -- what the suite leaves in /tmp --------------------------------------------------------------
# pyproject.toml keeps only a failed test's tmp_path and drops the whole base temp after a green
# run. Store entries are read-only folders, which a user other than root cannot remove as they
# are: these two make them removable first, and after a red run remove everything but the
# failed tests' own folders (session fixtures' projects and images run to many GB).

_FAILED_DIRS: set[Path] = set()


def _make_removable(top: Path) -> None:
    for d, _, _ in os.walk(top):
        st = os.lstat(d)
        if st.st_mode & 0o700 != 0o700:
            os.chmod(d, st.st_mode | 0o700)


@pytest.fixture(autouse=True)
def _removable_tmp_path(request: pytest.FixtureRequest):
    """Runs before tmp_path's own teardown (which removes a passed test's folder)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    path = request.getfixturevalue("tmp_path")
    yield
    if path.is_dir():
        _make_removable(path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(path, Path):
        _FAILED_DIRS.add(path)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is None or getattr(factory, "_given_basetemp", None) is not None or not basetemp.is_dir():
        return
    _make_removable(basetemp)
    if exitstatus == 0:
        return  # pytest removes the whole base temp
    keep = {p.resolve() for p in _FAILED_DIRS}
    for child in basetemp.iterdir():
        if child.is_dir() and not child.is_symlink() and not any(k.is_relative_to(child.resolve()) for k in keep):
            shutil.rmtree(child, ignore_errors=True)


def docker_available() -> str | None:
    """None when the engine answers, else the reason."""
    try:
        from pipeline import docker
        from pipeline.errors import UserError

        docker.client()
    except UserError as e:
        return e.message
    return None


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


def require_docker() -> None:
    reason = docker_available()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI needs the Docker engine: {reason}")
        pytest.skip(f"no Docker engine here ({reason}); run ./setup.sh")


def doit(*args: str, cwd: Path = ROOT, check: bool = True, env: dict[str, str] | None = None):
    """Run doit in a project; output captured (and shown on failure)."""
    proc = subprocess.run([*DOIT, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def built_hello() -> Path:
    """The repository's project with build_tgz:hello done; returns the project root."""
    require_docker()
    doit("build_tgz:hello")
    return ROOT


@pytest.fixture(scope="session")
def hello_tgz(built_hello: Path) -> Path:
    """The rootfs tgz of recipes/hello (LDT_HELLO_TGZ overrides, for developing image stages)."""
    override = os.environ.get("LDT_HELLO_TGZ")
    if override:
        return Path(override)
    return (built_hello / "cache" / "recipes" / "hello" / "rootfs.tgz").resolve()


def make_project(dest: Path, recipes: dict[str, dict[str, str]], seed_store: bool = True) -> Path:
    """A throwaway project: dodo.py + the given recipes ({name: {file: text}}).

    With seed_store, the repository's store entries are hard-linked in (cheap, content-addressed),
    so the debian-bookworm base is a store hit instead of a fresh mmdebstrap run.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dodo.py", dest / "dodo.py")
    for name, files in recipes.items():
        d = dest / "recipes" / name
        d.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (d / fname).write_text(text)
    if seed_store and (ROOT / "cache" / "store").is_dir():
        (dest / "cache").mkdir(exist_ok=True)
        subprocess.run(["cp", "-al", str(ROOT / "cache" / "store"), str(dest / "cache" / "store")], check=True)
    return dest


BOOTSTRAP_TOML = (ROOT / "recipes" / "debian-bookworm" / "recipe.toml").read_text()


@pytest.fixture(scope="session")
def hello_artifacts(built_hello: Path) -> dict[str, Path]:
    """Every boot artifact of recipes/hello, built through the graph: {artifact name: resolved path}."""
    doit("build_efistub:hello", "build_syslinux_bios:hello")
    d = built_hello / "cache" / "recipes" / "hello"
    return {f.name: f.resolve() for f in d.iterdir() if f.is_symlink()}


def on_console(argv: list[str], cwd: Path, until: bytes = b"login: ", timeout: float = 600) -> tuple[bytes, int]:
    """Run argv on a pseudo-terminal (like a user at a terminal) until `until` shows, then type
    Ctrl-A X (QEMU's quit key); returns (everything shown, exit status). Kills it on any failure."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on the pty
        os.chdir(cwd)
        os.execv(argv[0], argv)
    seen = b""

    def read(wait: float) -> bool:
        nonlocal seen
        if select.select([fd], [], [], wait)[0]:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                return False
        return True

    try:
        deadline = time.monotonic() + timeout
        while until not in seen and time.monotonic() < deadline and read(5):
            pass
        assert until in seen, seen[-3000:].decode(errors="replace")
        os.write(fd, b"\x01x")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                return seen, os.waitstatus_to_exitcode(status)
            read(0.5)
        raise AssertionError(f"{argv[0]} did not quit on Ctrl-A X")
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
