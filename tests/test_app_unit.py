"""pipeline.app as values: docker's composition and environment, USER, the executable, the two inits' files."""

import io
import re
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline import app, rootfs
from pipeline.app import AppConfig, AppSettings, Identity, InitKind, RootfsFacts
from pipeline.errors import UserError

SH = ["/bin/sh", "-c"]  # how the image config stores the shell form
TRICKY = ["", "a b", "it's", 'say "hi"', "$HOME", "${X}", "100%", "%n", "back\\slash", "line1\nline2",
          "tab\there", "ünïcödé ☃", ";", "--flag=x", "*", "`id`", "\\n"]


# ---------------------------------------------------------------- docker's ENTRYPOINT/CMD table

# The table of the Dockerfile reference ("Understand how CMD and ENTRYPOINT interact"), with each
# instruction as the image config stores it. Columns: no ENTRYPOINT, ENTRYPOINT e0 p0 (shell form),
# ENTRYPOINT ["e0", "p0"]; rows: no CMD, CMD ["e1", "p1"], CMD ["p1", "p2"], CMD e1 p1.
EP_SHELL, EP_EXEC = SH + ["e0 p0"], ["e0", "p0"]
TABLE = [
    ([], [], None),
    ([], EP_SHELL, SH + ["e0 p0"]),
    ([], EP_EXEC, ["e0", "p0"]),
    (["e1", "p1"], [], ["e1", "p1"]),
    (["e1", "p1"], EP_SHELL, SH + ["e0 p0", "e1", "p1"]),
    (["e1", "p1"], EP_EXEC, ["e0", "p0", "e1", "p1"]),
    (["p1", "p2"], [], ["p1", "p2"]),
    (["p1", "p2"], EP_SHELL, SH + ["e0 p0", "p1", "p2"]),
    (["p1", "p2"], EP_EXEC, ["e0", "p0", "p1", "p2"]),
    (SH + ["e1 p1"], [], SH + ["e1 p1"]),
    (SH + ["e1 p1"], EP_SHELL, SH + ["e0 p0", "/bin/sh", "-c", "e1 p1"]),
    (SH + ["e1 p1"], EP_EXEC, ["e0", "p0", "/bin/sh", "-c", "e1 p1"]),
]


@pytest.mark.parametrize(("cmd", "entrypoint", "expected"), TABLE)
def test_docker_composition_table(cmd, entrypoint, expected):
    cfg = {"Cmd": cmd or None, "Entrypoint": entrypoint or None}
    config = AppConfig.from_image_config(cfg)
    if expected is None:
        assert config is None  # docker: "no command specified"
    else:
        assert config.argv == tuple(expected) == app.docker_argv(entrypoint, cmd)


def test_shell_form_entrypoint_ignores_cmd_when_it_runs():
    """The table's '/bin/sh -c e0 p0' for every CMD row: CMD's words only become sh's $0, $1."""
    argv = app.docker_argv(SH + ["echo ran e0"], ["echo", "CMD-RAN"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out == "ran e0\n"


def test_from_image_config_reads_what_docker_image_config_records():
    cfg = {"Env": ["PATH=/app/bin:/usr/bin", "A=1=2", "EMPTY="], "Cmd": ["serve"], "Entrypoint": ["/app/run"],
           "WorkingDir": "/srv", "User": "app:web", "Labels": {"x": "y"},
           "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "443/tcp": {}}, "StopSignal": "SIGQUIT"}
    config = AppConfig.from_image_config(cfg)
    assert config == AppConfig(entrypoint=("/app/run",), cmd=("serve",),
                               env=(("PATH", "/app/bin:/usr/bin"), ("A", "1=2"), ("EMPTY", "")),
                               working_dir="/srv", user="app:web", exposed_ports=("53/udp", "443/tcp", "8080/tcp"),
                               stop_signal=signal.SIGQUIT)
    assert config.tcp_ports == (443, 8080)


def test_from_image_config_defaults():
    config = AppConfig.from_image_config({"Cmd": ["/bin/true"]})
    assert (config.env, config.working_dir, config.user, config.stop_signal) == ((), "/", "", signal.SIGTERM)


def test_from_image_config_rejects_a_malformed_list():
    with pytest.raises(UserError, match="Cmd must be a list of strings"):
        AppConfig.from_image_config({"Cmd": "echo hi"})


@pytest.mark.parametrize(("text", "number"), [("SIGTERM", 15), ("TERM", 15), ("15", 15), ("sigkill", 9),
                                              ("SIGRTMIN+3", signal.SIGRTMIN + 3), ("RTMAX-1", signal.SIGRTMAX - 1),
                                              (signal.SIGUSR1, 10)])
def test_signal_number(text, number):
    assert app.signal_number(text) == number


@pytest.mark.parametrize("text", ["SIGNOPE", "0", "999", "", "RTMIN+99"])
def test_signal_number_rejects(text):
    with pytest.raises(UserError, match="unknown StopSignal"):
        app.signal_number(text)


def test_signal_name():
    assert app.signal_name(15) == "SIGTERM"
    assert app.signal_name(signal.SIGRTMIN + 3) == "SIGRTMIN+3"


# ---------------------------------------------------------------- [app] settings


def test_settings_from_table():
    s = AppSettings.from_table({"argv": ["/bin/app", "-v"], "env": {"A": "1"}, "enabled": True})
    assert s == AppSettings(enabled=True, argv=("/bin/app", "-v"), env=(("A", "1"),))
    assert AppSettings.from_table({}) == AppSettings()


@pytest.mark.parametrize(("table", "message"), [
    ({"argv": "/bin/app"}, "argv: must be list"),
    ({"argv": []}, "argv: must be a non-empty array of strings"),
    ({"argv": ["/bin/app", 1]}, "argv: must be a non-empty array of strings"),
    ({"env": {"A": 1}}, "env: 'A' must be a string"),
    ({"enabled": "no"}, "enabled: must be bool"),
    ({"command": ["x"]}, "unknown key 'command'"),
])
def test_settings_errors_name_the_key(table, message):
    with pytest.raises(UserError, match=re.escape(message)):
        AppSettings.from_table(table)


def test_settings_errors_go_through_the_callers_factory():
    def error(key, message, hint):
        return UserError(f"recipes/x/recipe.toml:7: [app] {key}: {message}", hint=hint)

    with pytest.raises(UserError, match=r"^recipes/x/recipe.toml:7: \[app\] command") as e:
        AppSettings.from_table({"command": []}, error)
    assert e.value.hint == "known keys in [app]: enabled, argv, env"


def test_apply():
    image = AppConfig(entrypoint=("/e",), cmd=("c",), env=(("A", "1"), ("B", "2")))
    assert app.apply(AppSettings(enabled=False), image) is None
    assert app.apply(AppSettings(), image) == image
    over = app.apply(AppSettings(argv=("/x", "y"), env=(("B", "3"), ("C", "4"))), image)
    assert over.argv == ("/x", "y")
    assert over.env == (("A", "1"), ("B", "3"), ("C", "4"))  # replaced in place, new ones last
    assert app.apply(AppSettings(), None) is None  # not an app: boot the OS
    assert app.apply(AppSettings(argv=("/bin/sh",)), None).argv == ("/bin/sh",)


# ---------------------------------------------------------------- USER

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App,,,:/home/app:/bin/sh
nohome:x:1001:1001::
# a comment
broken line
"""
GROUP = """\
root:x:0:
app:x:1000:
web:x:33:app,daemon
staff:x:50:app
"""


@pytest.mark.parametrize(("spec", "expected"), [
    ("", Identity(0, 0, "/root", "root")),
    ("root", Identity(0, 0, "/root", "root")),
    ("app", Identity(1000, 1000, "/home/app", "app", (33, 50))),
    ("1000", Identity(1000, 1000, "/home/app", "app", (33, 50))),
    ("4242", Identity(4242, 0, "/")),  # numeric, no entry: used as it is, gid 0, home /
    ("app:web", Identity(1000, 33, "/home/app", "app")),  # explicit group: no supplementary groups
    ("app:50", Identity(1000, 50, "/home/app", "app")),
    ("1000:4321", Identity(1000, 4321, "/home/app", "app")),
    ("4242:4321", Identity(4242, 4321, "/")),
    ("4242:web", Identity(4242, 33, "/")),
    ("daemon", Identity(1, 1, "/usr/sbin", "daemon", (33,))),
    ("nohome", Identity(1001, 1001, "/", "nohome")),
])
def test_resolve_user(spec, expected):
    assert app.resolve_user(spec, PASSWD, GROUP) == expected


def test_resolve_user_unknown_name_is_a_user_error():
    with pytest.raises(UserError, match="USER nobody: no user 'nobody' in /etc/passwd") as e:
        app.resolve_user("nobody", PASSWD, GROUP)
    assert "useradd nobody" in e.value.hint


def test_resolve_user_unknown_group_is_a_user_error():
    with pytest.raises(UserError, match="USER app:wheel: no group 'wheel' in /etc/group"):
        app.resolve_user("app:wheel", PASSWD, GROUP)


def test_resolve_user_without_passwd():
    assert app.resolve_user("", None, None) == Identity()
    assert app.resolve_user("65532:65532", None, None) == Identity(65532, 65532, "/")  # distroless nonroot
    with pytest.raises(UserError, match="no user 'app' in the image"):
        app.resolve_user("app", None, None)


# ---------------------------------------------------------------- environment


def test_container_env_like_docker_run():
    env = app.container_env((("A", "1"),), hostname="box", home="/home/app")
    assert env == (("PATH", app.DEFAULT_PATH), ("HOSTNAME", "box"), ("A", "1"), ("HOME", "/home/app"))


def test_container_env_image_values_win():
    env = app.container_env((("HOME", "/data"), ("PATH", "/app/bin"), ("HOSTNAME", "x")), hostname="box", home="/")
    assert env == (("PATH", "/app/bin"), ("HOSTNAME", "x"), ("HOME", "/data"))


def test_parse_env_bare_name_and_duplicates():
    assert app.parse_env(["A=1", "B", "A=2"]) == (("A", "2"), ("B", ""))


# ---------------------------------------------------------------- the executable

FILES = frozenset({"usr/bin/python3.11", "usr/local/bin/tool", "usr/bin/tool", "app/run", "srv/bin/x",
                   "usr/lib/systemd/systemd"})
LINKS = {"bin": "usr/bin", "usr/bin/python3": "python3.11", "usr/bin/dangling": "/nowhere",
         "sbin": "usr/sbin", "usr/sbin/init": "../lib/systemd/systemd"}


def find(argv0, path=app.DEFAULT_PATH, workdir="/"):
    return app.find_executable(argv0, path=path, workdir=workdir, files=FILES, symlinks=LINKS)


def test_find_executable_on_path_first_match_wins():
    assert find("tool") == "/usr/local/bin/tool"
    assert find("tool", path="/usr/bin:/usr/local/bin") == "/usr/bin/tool"


def test_find_executable_through_symlinks():
    assert find("python3") == "/usr/bin/python3"  # a symlink to python3.11: the PATH entry is kept
    assert find("/bin/python3") == "/bin/python3"  # merged /usr: /bin -> usr/bin


def test_find_executable_relative_with_a_slash_is_relative_to_workdir():
    assert find("./run", workdir="/app") == "/app/run"
    assert find("bin/x", workdir="/srv") == "/srv/bin/x"
    assert find("x", path="bin", workdir="/srv") == "/srv/bin/x"  # a relative PATH entry too


def test_find_executable_missing_names_it_and_the_path():
    with pytest.raises(UserError, match=re.escape("executable node is not in the image (PATH=/usr/bin:/bin)")):
        find("node", path="/usr/bin:/bin")
    with pytest.raises(UserError, match=re.escape("executable ./run is not in the image (no executable /run)")):
        find("./run")
    with pytest.raises(UserError, match="dangling"):
        find("dangling", path="/usr/bin")


# ---------------------------------------------------------------- init kind, resolve, files


def test_init_kind():
    assert app.init_kind(FILES, LINKS) is InitKind.SYSTEMD
    assert app.init_kind(FILES, {"sbin/init": "/bin/busybox"}) is InitKind.LDT
    assert app.init_kind(frozenset(), {}) is InitKind.LDT
    assert InitKind.LDT.kernel_args == "init=/.ldt/init"
    assert InitKind.SYSTEMD.kernel_args == ""


FACTS = RootfsFacts(FILES, LINKS, PASSWD, GROUP)


def test_resolve_puts_it_together():
    config = AppConfig(entrypoint=("python3", "-m", "http.server"), cmd=("8000",), env=(("PYTHONUNBUFFERED", "1"),),
                       working_dir="/srv/", user="app", stop_signal=signal.SIGINT)
    assert app.resolve(config, FACTS, hostname="web") == app.App(
        argv=("python3", "-m", "http.server", "8000"), exe="/usr/bin/python3",
        env=(("PATH", app.DEFAULT_PATH), ("HOSTNAME", "web"), ("PYTHONUNBUFFERED", "1"), ("HOME", "/home/app")),
        cwd="/srv", identity=Identity(1000, 1000, "/home/app", "app", (33, 50)), stop_signal=signal.SIGINT,
        hostname="web")


def test_resolve_uses_the_images_path():
    config = AppConfig(cmd=("x",), env=(("PATH", "/srv/bin"),))
    assert app.resolve(config, FACTS, hostname="h").exe == "/srv/bin/x"


@pytest.mark.parametrize(("config", "message"), [
    (AppConfig(), "no command"),
    (AppConfig(cmd=("tool",), user="ghost"), "no user 'ghost'"),
    (AppConfig(cmd=("tool",), env=(("-x", "1"),)), "'-x' cannot be passed"),
    (AppConfig(cmd=("tool", "a\0b")), "NUL"),
])
def test_resolve_errors(config, message):
    with pytest.raises(UserError, match=message):
        app.resolve(config, FACTS, hostname="h")


def test_scan_rootfs(tmp_path):
    tgz = tmp_path / "rootfs.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        def add(name, data=b"", mode=0o644, kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("./etc/", kind=tarfile.DIRTYPE, mode=0o755)
        add("./etc/passwd", PASSWD.encode())
        add("./etc/group", GROUP.encode())
        add("./usr/bin/python3.11", b"\x7fELF", mode=0o755)
        add("./usr/bin/python3", kind=tarfile.SYMTYPE, link="python3.11")
        add("./usr/bin/py", kind=tarfile.LNKTYPE, link="usr/bin/python3.11", mode=0o755)
        add("./usr/share/doc.txt", b"not executable")
    facts = rootfs.scan_rootfs(tgz)
    assert facts == RootfsFacts(frozenset({"usr/bin/python3.11", "usr/bin/py"}), {"usr/bin/python3": "python3.11"},
                                PASSWD, GROUP)


SAMPLE = app.App(argv=("python3", "app.py", "a b"), exe="/usr/bin/python3",
                 env=(("PATH", "/usr/bin:/bin"), ("HOSTNAME", "web"), ("HOME", "/home/app")), cwd="/srv",
                 identity=Identity(1000, 1000, "/home/app", "app"), stop_signal=signal.SIGQUIT, hostname="web")


def test_app_init_config_exact_text():
    assert app.app_init_config(SAMPLE) == """\
# The app of this image, for /.ldt/init; written by LDT (pipeline/app.py). Sourced, not run.
LDT_UID=1000
LDT_GID=1000
LDT_CWD=/srv
LDT_HOSTNAME=web
LDT_STOP_SIGNAL=3
set -- \\
  PATH=/usr/bin:/bin \\
  HOSTNAME=web \\
  HOME=/home/app \\
  /usr/bin/python3 \\
  app.py \\
  'a b'
"""


@pytest.mark.parametrize("shell", [["/bin/sh"], ["/bin/busybox", "sh"], ["/bin/bash", "--posix"]])
def test_app_init_config_round_trips_through_a_real_shell(tmp_path, shell):
    if not Path(shell[0]).exists():
        pytest.skip(f"{shell[0]} is not installed")
    env = tuple((f"V{i}", v) for i, v in enumerate(TRICKY)) + (("my-var.x", "odd name"),)
    tricky = app.App(argv=("prog", *TRICKY), exe="/opt/my app/prog", env=env, cwd="/work dir/it's",
                     identity=Identity(7, 8), hostname="h$x")
    conf = tmp_path / "app.conf"
    conf.write_text(app.app_init_config(tricky))
    script = '. "$1"; printf "%s\\0" "$LDT_UID" "$LDT_GID" "$LDT_CWD" "$LDT_HOSTNAME" "$LDT_STOP_SIGNAL"; ' \
             'shift 0; printf "%s\\0" "$@"'
    out = subprocess.run([*shell, "-c", script.replace('"$1"', str(conf)), "sh"], capture_output=True,
                         check=True).stdout.decode()
    words = out.split("\0")[:-1]
    assert words[:5] == ["7", "8", "/work dir/it's", "h$x", "15"]
    assert words[5:] == [f"{n}={v}" for n, v in env] + ["/opt/my app/prog", *TRICKY]


@pytest.mark.parametrize(("word", "quoted"), [
    ("plain", '"plain"'),
    ("", '""'),
    ("a b", '"a b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("it's", '"it\'s"'),
    ("$HOME", '"$$HOME"'),
    ("100%", '"100%%"'),
    ("back\\slash", '"back\\\\slash"'),
    ("l1\nl2", '"l1\\nl2"'),
    ("tab\t", '"tab\\t"'),
    ("bell\x07esc\x1b", '"bell\\aesc\\x1b"'),
    ("ünï ☃", '"ünï ☃"'),
    (";", '";"'),
])
def test_systemd_word(word, quoted):
    assert app.systemd_word(word) == quoted


def test_systemd_environment():
    assert app.systemd_environment("A", 'x "y" $z 5% \\ \n') == '"A=x \\"y\\" $z 5%% \\\\ \\n"'
    with pytest.raises(UserError, match="letters, digits and _"):
        app.systemd_environment("my-var", "1")


def test_systemd_unit_exact_text():
    assert app.systemd_unit(SAMPLE) == """\
# The image's app (ENTRYPOINT/CMD) as docker would run it; written by LDT (pipeline/app.py).
[Unit]
Description=The image's app (ENTRYPOINT and CMD)
Wants=network-online.target
After=network-online.target
SuccessAction=exit-force
FailureAction=exit-force

[Service]
Type=exec
ExecStart="@/usr/bin/python3" "python3" "app.py" "a b"
ExecStopPost=+/.ldt/app-exit
Environment="PATH=/usr/bin:/bin"
Environment="HOSTNAME=web"
Environment="HOME=/home/app"
WorkingDirectory=/srv
User=app
Group=1000
KillSignal=SIGQUIT
TimeoutStopSec=10s
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def test_systemd_unit_needs_a_passwd_entry():
    with pytest.raises(UserError, match="uid 4242 has no /etc/passwd entry"):
        app.systemd_unit(app.App(argv=("x",), exe="/x", env=(), cwd="/", identity=Identity(4242)))


def _unescape(token: str) -> str:
    """A word of systemd's 'Command Line:' dump (C-style escapes inside double quotes)."""
    if not token.startswith('"'):
        return token
    simple = {"n": "\n", "t": "\t", "a": "\a", "b": "\b", "f": "\f", "r": "\r", "v": "\v"}
    return re.sub(r"\\(x[0-9a-f]{2}|.)",
                  lambda m: chr(int(m[1][1:], 16)) if m[1].startswith("x") else simple.get(m[1], m[1]),
                  token[1:-1])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_unit_round_trips_through_systemds_parser(tmp_path):
    """systemd-analyze verify, at debug level, dumps the unit as systemd parsed it."""
    env = tuple((f"V{i}", v) for i, v in enumerate(TRICKY))
    tricky = app.App(argv=("echo", *TRICKY), exe="/bin/echo", env=env, cwd="/tmp",
                     identity=Identity(0, 0, "/root", "root"), hostname="h")
    unit = tmp_path / "ldt-test.service"
    unit.write_text(app.systemd_unit(tricky))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                          env={"SYSTEMD_LOG_LEVEL": "debug", "PATH": "/usr/bin:/bin"})
    out = proc.stdout + proc.stderr
    assert f"{unit}:" not in out, out  # no "FILE:LINE: …" complaint about any of our lines
    line = next(ln for ln in out.splitlines() if "Command Line: " in ln and ln.strip().split(": ", 1)[1]
                .startswith("echo"))
    words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', line.split("Command Line: ", 1)[1])
    # `$$` becomes `$` when the command runs; the dump shows the words before that step
    assert [_unescape(w) for w in words] == [w.replace("$", "$$") for w in ("echo", *TRICKY)]
    dumped = re.findall(r"^\t\tEnvironment: (.*(?:\n(?!\t).*)*)", out, re.MULTILINE)
    assert dumped == [f"{n}={v}" for n, v in env]


def test_guest_files():
    ldt = app.guest_files(SAMPLE, InitKind.LDT, busybox=Path("/bin/busybox"))
    assert [(f.path, oct(f.mode)) for f in ldt] == [("/.ldt", "0o40755"), ("/.ldt/busybox", "0o755"),
                                                    ("/.ldt/init", "0o755"), ("/.ldt/app.conf", "0o644")]
    assert ldt[1].source == Path("/bin/busybox")
    assert ldt[2].data.startswith(b"#!/.ldt/busybox sh\n")
    assert ldt[3].data == app.app_init_config(SAMPLE).encode()
    sd = app.guest_files(SAMPLE, InitKind.SYSTEMD)
    assert [(f.path, f.link) for f in sd] == [
        ("/.ldt", None), ("/.ldt/app-exit", None), ("/etc/systemd/system/ldt-app.service", None),
        ("/etc/systemd/system/multi-user.target.wants/ldt-app.service", "../ldt-app.service")]
    assert sd[1].data.startswith(b"#!/bin/sh\n")


def test_is_static_elf():
    assert not app.is_static_elf(b"#!/bin/sh\n")
    assert not app.is_static_elf(Path("/bin/ls").read_bytes()[:65536])  # dynamic: has PT_INTERP
    if Path("/bin/busybox").exists():
        assert app.is_static_elf(Path("/bin/busybox").read_bytes()[:65536])


def test_host_busybox_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="no busybox") as e:
        app.host_busybox(tmp_path / "busybox")
    assert "busybox-static" in e.value.hint
    with pytest.raises(UserError, match="not a static busybox"):
        app.host_busybox(Path("/bin/ls"))


def test_exit_status_reads_the_last_marker():
    assert app.exit_status("boot\nldt-app-exit: 0\r\n") == 0
    assert app.exit_status("ldt-app-exit: 1\nldt-app-exit: 143\n[  1.0] reboot: Power down\n") == 143
    assert app.exit_status("echo ldt-app-exit: 3 inside a line\n") is None
    assert app.exit_status("") is None
