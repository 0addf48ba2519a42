"""The guest scripts for real, without a VM: app-init.sh as PID 1 of a PID namespace (unshare), on
busybox, with LDT_INIT_NO_SYSTEM=1 (no mounts, network or power-off); app-exit.sh with systemd's
variables. What only a VM shows (mounts, eth0, poweroff) is left to the boot integration tests."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import app
from pipeline.app import App, Identity

GUEST = Path(app.__file__).parent / "guest"
BUSYBOX = shutil.which("busybox")
PYTHON = "/usr/bin/python3"  # readable by any uid, unlike a venv under a private home
ROOT = Identity()


def _can_unshare() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


needs_namespace = pytest.mark.skipif(not (BUSYBOX and _can_unshare()),
                                     reason="needs busybox and root for unshare --pid --mount-proc")


def run_init(tmp_path: Path, a: App, *, stdin: str = "", timeout: float = 30,
             script: Path = GUEST / "app-init.sh") -> subprocess.CompletedProcess:
    conf = tmp_path / "app.conf"
    conf.write_text(app.app_init_config(a))
    env = {"LDT_INIT_NO_SYSTEM": "1", "LDT_BUSYBOX": BUSYBOX, "LDT_APP_CONFIG": str(conf), "PATH": "/usr/bin:/bin"}
    # a VM's init starts with every signal at its default; a pytest started in the background (`&`)
    # has SIGINT ignored, and a shell cannot trap a signal ignored on its entry
    return subprocess.run(["env", "--default-signal=INT,QUIT", "unshare", "--pid", "--fork", "--mount-proc",
                           BUSYBOX, "sh", str(script)],
                          env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def python_app(tmp_path: Path, code: str, *, identity: Identity = ROOT, stop: int = signal.SIGTERM,
               env: tuple = (), argv: tuple = (), cwd: str | None = None) -> App:
    """python3 -c CODE ARGV…: sys.argv[1:] is ARGV (the code is inline: any uid can read it)."""
    return App(argv=("python3", "-c", code, *argv), exe=PYTHON, env=(("PATH", "/usr/bin:/bin"), *env),
               cwd=cwd or str(tmp_path), identity=identity, stop_signal=stop, hostname="h")


REPORT = """\
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid(),
                  "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(), "stdin": sys.stdin.read()}))
sys.exit(7)
"""


@needs_namespace
def test_init_runs_the_app_with_its_argv_env_cwd_and_ids(tmp_path):
    tricky = ("", "a b", "it's", 'q"q', "$HOME", "100%", "back\\slash", "l1\nl2", "ünï ☃", "-x", "--", "K=V")
    env = (("A", "x y"), ("my-var.x", "odd name"), ("NL", "l1\nl2"), ("DOLLAR", "$PATH"), ("EMPTY", ""),
           ("LC_ALL", "C.UTF-8"))  # else python itself adds LC_CTYPE (PEP 538)
    workdir = tmp_path / "work dir"
    a = python_app(tmp_path, REPORT, identity=Identity(1234, 4321), env=env, argv=tricky, cwd=str(workdir))
    proc = run_init(tmp_path, a, stdin="hello from the console\n")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 7, proc.stderr
    assert lines[-1] == "ldt-app-exit: 7"
    seen = json.loads(lines[0])
    assert seen["argv"] == list(tricky)
    assert seen["env"] == {"PATH": "/usr/bin:/bin", **dict(env)}  # exactly: nothing of the init's leaks in
    assert seen["cwd"] == str(workdir)  # created like docker does
    assert (seen["uid"], seen["gid"], seen["groups"]) == (1234, 4321, [])
    assert seen["pid"] != 1  # PID 1 stays the init
    assert seen["stdin"] == "hello from the console\n"


@needs_namespace
def test_init_reports_death_by_signal_as_128_plus_the_signal(tmp_path):
    a = python_app(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = run_init(tmp_path, a)
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 137"
    assert proc.returncode == 137


@needs_namespace
def test_init_forwards_sigterm_as_the_stop_signal(tmp_path):
    code = """\
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(42))
for _ in range(100):  # again until the init has its trap in place (a race only under load)
    os.kill(1, signal.SIGTERM)  # what stopping the VM sends to PID 1
    time.sleep(0.2)
sys.exit(1)
"""
    proc = run_init(tmp_path, python_app(tmp_path, code, stop=signal.SIGUSR1))
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 42", proc.stderr


@needs_namespace
def test_init_forwards_sigterm_to_an_app_without_handlers(tmp_path):
    code = "import os, signal, time\nfor _ in range(100):\n    os.kill(1, signal.SIGTERM)\n    time.sleep(0.2)\n"
    proc = run_init(tmp_path, python_app(tmp_path, code))
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 143", proc.stderr


@needs_namespace
def test_in_a_vm_sigint_stops_the_app_with_its_stop_signal(tmp_path):
    """In a VM the init takes SIGINT (Ctrl-Alt-Del, the host's power-off request) as `docker stop`."""
    vm_script = tmp_path / "app-init.sh"  # what setup_system() sets in a VM, without its mounts
    vm_script.write_text((GUEST / "app-init.sh").read_text().replace("\nINT_STOPS= ", "\nINT_STOPS=1 ", 1))
    code = """\
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(44))
for _ in range(100):
    os.kill(1, signal.SIGINT)
    time.sleep(0.2)
"""
    proc = run_init(tmp_path, python_app(tmp_path, code, stop=signal.SIGUSR1), script=vm_script)
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 44", proc.stderr


@needs_namespace
def test_init_forwards_sigint_to_an_app_that_handles_it(tmp_path):
    code = """\
import os, signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(43))
for _ in range(100):
    os.kill(1, signal.SIGINT)
    time.sleep(0.2)
"""
    proc = run_init(tmp_path, python_app(tmp_path, code))
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 43", proc.stderr


@needs_namespace
def test_init_reaps_orphans(tmp_path):
    """A double fork leaves a grandchild to PID 1; when it exits, the init must reap it."""
    code = """\
import os, sys, time
if os.fork() == 0:
    if os.fork() == 0:
        sys.exit(0)  # the orphan: exits at once, a zombie until PID 1 reaps it
    os._exit(0)
os.wait()
time.sleep(1)
states = [open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] for p in os.listdir("/proc") if p.isdigit()]
sys.exit(states.count("Z"))
"""
    proc = run_init(tmp_path, python_app(tmp_path, code))
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 0", proc.stderr


@needs_namespace
def test_init_reports_an_executable_that_cannot_run(tmp_path):
    a = App(argv=("gone",), exe="/nonexistent/gone", env=(), cwd="/", identity=Identity(), hostname="h")
    proc = run_init(tmp_path, a)
    assert proc.stdout.splitlines()[-1] == "ldt-app-exit: 127"
    assert "/nonexistent/gone" in proc.stderr


@needs_namespace
def test_init_without_a_config_says_so(tmp_path):
    env = {"LDT_INIT_NO_SYSTEM": "1", "LDT_BUSYBOX": BUSYBOX, "LDT_APP_CONFIG": str(tmp_path / "none")}
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", BUSYBOX, "sh", str(GUEST / "app-init.sh")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.stdout == "ldt-app-exit: 255\n"
    assert "nothing to run" in proc.stderr


@needs_namespace
def test_init_in_a_tree_with_nothing_but_our_files(tmp_path):
    """A distroless-like root: no shell, no libc; the kernel's view of init=/.ldt/init (shebang
    to /.ldt/busybox), the default paths, and a static app (busybox's echo under another name)."""
    root = tmp_path / "root"
    for f in app.guest_files(App(argv=("hello", "$HOME", "a b"), exe="/app/echo", env=(("HOME", "/"),), cwd="/app",
                                 identity=Identity(65532, 65532), hostname="h"), app.InitKind.LDT, Path(BUSYBOX)):
        dest = root / f.path.lstrip("/")
        if f.mode & 0o040000:
            dest.mkdir(parents=True)
            continue
        if f.source:
            shutil.copy(f.source, dest)
        else:
            dest.write_bytes(f.data)
        dest.chmod(f.mode)
    (root / "app").mkdir()
    shutil.copy(BUSYBOX, root / "app" / "echo")
    (root / "proc").mkdir()
    (root / "dev").mkdir()  # in the VM: devtmpfs, mounted by the init (skipped here)
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc=/proc", f"--root={root}", "/.ldt/init"],
                          env={"LDT_INIT_NO_SYSTEM": "1"}, capture_output=True, text=True, timeout=30)
    assert proc.stdout == "$HOME a b\nldt-app-exit: 0\n", proc.stderr


@pytest.mark.parametrize(("variables", "line"), [
    ({"EXIT_CODE": "exited", "EXIT_STATUS": "0"}, "ldt-app-exit: 0"),
    ({"EXIT_CODE": "exited", "EXIT_STATUS": "3"}, "ldt-app-exit: 3"),
    ({"EXIT_CODE": "killed", "EXIT_STATUS": "TERM"}, "ldt-app-exit: 143"),
    ({"EXIT_CODE": "dumped", "EXIT_STATUS": "SEGV"}, "ldt-app-exit: 139"),
    ({"EXIT_CODE": "killed", "EXIT_STATUS": "SIGKILL"}, "ldt-app-exit: 137"),
    ({}, "ldt-app-exit: 255"),
])
@pytest.mark.parametrize("shell", ["/bin/sh", "busybox"])
def test_exit_hook_reports_like_docker(tmp_path, variables, line, shell):
    cmd = [BUSYBOX, "sh"] if shell == "busybox" else [shell]
    if cmd[0] is None:
        pytest.skip("busybox is not installed")
    console = tmp_path / "console"
    subprocess.run([*cmd, str(GUEST / "app-exit.sh")], env={**variables, "LDT_CONSOLE": str(console),
                                                             "PATH": "/usr/bin:/bin"}, check=True)
    assert console.read_text() == line + "\n"
    assert app.exit_status(console.read_text()) == int(line.split()[-1])


def test_python_is_the_one_the_tests_use():
    assert Path(PYTHON).exists() or sys.platform != "linux"
