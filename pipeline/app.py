"""The app of a container image: what `docker run IMAGE` would run, made to run as a VM (issue 10).

Pure values and functions; the stage graph does the I/O (reads image-config.json and the rootfs,
writes `guest_files()` into it, boots, reads the exit marker from the console):

    AppConfig.from_image_config(cfg)   the image's ENTRYPOINT, CMD, ENV, WORKDIR, USER, EXPOSE, STOPSIGNAL
    apply(AppSettings, AppConfig)      the recipe's [app] table on top (off, argv override, env added)
    resolve(config, rootfs facts)      → App: argv, the executable, the full environment, uid/gid, cwd
    init_kind(files, symlinks)         systemd runs the app as a unit; anything else gets our busybox init
    guest_files(app, kind)             what to add to the root filesystem for that init

Both inits print EXIT_MARKER ("ldt-app-exit: N") on the console when the app ends and power the
VM off; `exit_status(console_text)` reads it back, so a run reports the app's status like
`docker run` does (N is the exit code, or 128 + the signal that killed it).
"""

from __future__ import annotations

import enum
import posixpath
import re
import shlex
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.tarstream import resolve_link

# docker's PATH for a Linux container whose image sets none (moby: system.DefaultPathEnv)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_STOP_SIGNAL = signal.SIGTERM

# Our files inside the guest: one private directory no image uses.
GUEST_DIR = "/.ldt"
BUSYBOX = f"{GUEST_DIR}/busybox"
INIT = f"{GUEST_DIR}/init"  # pipeline/guest/app-init.sh, run by the kernel as PID 1 (init=/.ldt/init)
INIT_CONFIG = f"{GUEST_DIR}/app.conf"  # written by app_init_config()
EXIT_HOOK = f"{GUEST_DIR}/app-exit"  # pipeline/guest/app-exit.sh, the unit's ExecStopPost=
UNIT_NAME = "ldt-app.service"
HOST_BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static

EXIT_MARKER = "ldt-app-exit:"
EXIT_MARKER_RE = re.compile(rf"^{EXIT_MARKER} (\d+)\r?$", re.MULTILINE)

Env = tuple[tuple[str, str], ...]  # ordered NAME, value pairs (docker keeps the image's order)


# --------------------------------------------------------------------------------------------
# The image's config and the recipe's [app] table
# --------------------------------------------------------------------------------------------


def docker_argv(entrypoint: Sequence[str], cmd: Sequence[str]) -> tuple[str, ...]:
    """The argv docker executes: ENTRYPOINT followed by CMD, whatever their form.

    The image config stores the shell form already as ["/bin/sh", "-c", "…"], so one rule gives
    every row of the Dockerfile reference's ENTRYPOINT/CMD table: no ENTRYPOINT runs CMD; an
    exec-form ENTRYPOINT gets CMD as arguments; a shell-form ENTRYPOINT gets them too, but as
    `sh -c`'s $0, $1…, so CMD does not run ("/bin/sh -c exec_entry p1_entry" in the table).
    Neither: () (docker refuses to start: "no command specified").
    """
    return (*entrypoint, *cmd)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise UserError(f"image config: {what} must be a list of strings, not {value!r}")
    return tuple(value)


def parse_env(entries: Iterable[str]) -> Env:
    """An image's Env list ("NAME=value") as pairs; a bare "NAME" has the empty value."""
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        name, _, value = entry.partition("=")
        pairs.append((name, value))
    return merge_env((), pairs)


def merge_env(base: Iterable[tuple[str, str]], added: Iterable[tuple[str, str]]) -> Env:
    """docker's ReplaceOrAppendEnvValues: a name already set keeps its place, new ones go last."""
    out = dict(base)
    for name, value in added:
        out[name] = value
    return tuple(out.items())


def signal_number(name: str | int) -> int:
    """A STOPSIGNAL as docker accepts it ("SIGTERM", "TERM", "15", "SIGRTMIN+3") → its number."""
    text = str(name).strip().upper()
    if text.isdigit():
        n = int(text)
        if 0 < n <= signal.SIGRTMAX:
            return n
    bare = text.removeprefix("SIG")
    m = re.fullmatch(r"RT(MIN|MAX)([+-]\d+)?", bare)
    if m:
        n = (signal.SIGRTMIN if m.group(1) == "MIN" else signal.SIGRTMAX) + int(m.group(2) or 0)
        if signal.SIGRTMIN <= n <= signal.SIGRTMAX:
            return n
    elif bare and hasattr(signal.Signals, f"SIG{bare}"):
        return int(signal.Signals[f"SIG{bare}"])
    raise UserError(f"image config: unknown StopSignal {name!r}", hint="use a name like SIGTERM or a number")


def signal_name(n: int) -> str:
    """The name systemd and kill(1) understand: SIGTERM, SIGRTMIN+3."""
    if signal.SIGRTMIN < n <= signal.SIGRTMAX:
        return f"SIGRTMIN+{n - signal.SIGRTMIN}"
    return signal.Signals(n).name


@dataclass(frozen=True)
class AppConfig:
    """What the image says to run: the `Config` of `docker inspect` (and of image-config.json)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Env = ()
    working_dir: str = "/"
    user: str = ""  # "", "name", "uid", "name:group", "uid:gid"
    exposed_ports: tuple[str, ...] = ()  # "80/tcp", "53/udp"
    stop_signal: int = DEFAULT_STOP_SIGNAL

    @classmethod
    def from_image_config(cls, cfg: Mapping[str, Any]) -> AppConfig | None:
        """The app of an image config; None when it has neither ENTRYPOINT nor CMD (not an app)."""
        entrypoint = _strings(cfg.get("Entrypoint"), "Entrypoint")
        cmd = _strings(cfg.get("Cmd"), "Cmd")
        if not entrypoint and not cmd:
            return None
        return cls(
            entrypoint=entrypoint,
            cmd=cmd,
            env=parse_env(_strings(cfg.get("Env"), "Env")),
            working_dir=cfg.get("WorkingDir") or "/",
            user=cfg.get("User") or "",
            exposed_ports=tuple(sorted(cfg.get("ExposedPorts") or {}, key=_port_order)),
            stop_signal=signal_number(cfg.get("StopSignal") or DEFAULT_STOP_SIGNAL),
        )

    @property
    def argv(self) -> tuple[str, ...]:
        return docker_argv(self.entrypoint, self.cmd)

    @property
    def tcp_ports(self) -> tuple[int, ...]:
        """EXPOSEd TCP ports: what a run could forward from the host (qemu hostfwd)."""
        return tuple(int(p.split("/")[0]) for p in self.exposed_ports if p.partition("/")[2] in ("", "tcp"))


def _port_order(port: str) -> tuple[int, str]:
    number, _, proto = port.partition("/")
    return (int(number) if number.isdigit() else 0, proto)


def _default_error(key: str, message: str, hint: str) -> UserError:
    return UserError(f"recipe.toml [app] {key}: {message}", hint=hint)


@dataclass(frozen=True)
class AppSettings:
    """The recipe's [app] table: `enabled = false` boots the image as an OS, `argv` replaces
    ENTRYPOINT and CMD (docker run --entrypoint … args), `env` is added (docker run -e)."""

    enabled: bool = True
    argv: tuple[str, ...] | None = None
    env: Env = ()

    SCHEMA = {"enabled": bool, "argv": list, "env": dict}  # key -> TOML type, for recipes.SCHEMA

    @classmethod
    def from_table(cls, table: Mapping[str, Any],
                   error: Callable[[str, str, str], UserError] = _default_error) -> AppSettings:
        """Validate [app]; `error(key, message, hint)` builds the UserError (recipes.py adds file and line)."""
        for key, value in table.items():
            expected = cls.SCHEMA.get(key)
            if expected is None:
                raise error(key, f"unknown key '{key}'", f"known keys in [app]: {', '.join(cls.SCHEMA)}")
            if not isinstance(value, expected):
                raise error(key, f"must be {expected.__name__}, not {type(value).__name__}",
                            {"enabled": "enabled = false", "argv": 'argv = ["/app", "--flag"]',
                             "env": 'env = { LOG_LEVEL = "debug" }'}[key])
        argv = table.get("argv")
        if argv is not None and (not argv or not all(isinstance(a, str) for a in argv)):
            raise error("argv", "must be a non-empty array of strings", 'argv = ["/app", "--flag"]')
        env = table.get("env", {})
        for name, value in env.items():
            if not isinstance(value, str):
                raise error("env", f"'{name}' must be a string", f'env = {{ {name} = "value" }}')
            if not name or "=" in name:
                raise error("env", f"'{name}' is not a variable name", 'env = { LOG_LEVEL = "debug" }')
        return cls(enabled=table.get("enabled", True), argv=None if argv is None else tuple(argv),
                   env=tuple(env.items()))


def apply(settings: AppSettings, config: AppConfig | None) -> AppConfig | None:
    """The image's app with the recipe's [app] on top; None: boot the image as an OS."""
    if not settings.enabled:
        return None
    if config is None:
        if settings.argv is None:
            return None
        config = AppConfig()
    if settings.argv is not None:
        config = replace(config, entrypoint=settings.argv, cmd=())
    return replace(config, env=merge_env(config.env, settings.env))


# --------------------------------------------------------------------------------------------
# USER against /etc/passwd and /etc/group, the environment, the executable
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who the app runs as, resolved the way docker's runtime does (runc's GetExecUser)."""

    uid: int = 0
    gid: int = 0
    home: str = "/"
    name: str | None = None  # the passwd entry's name, when there is one
    groups: tuple[int, ...] = ()  # supplementary groups (implicit membership in /etc/group)


def _table(text: str | None, fields: int) -> list[list[str]]:
    """Lines of passwd/group split on ':', padded to `fields` (short lines count, as in runc)."""
    rows = []
    for line in (text or "").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        rows.append(parts + [""] * (fields - len(parts)))
    return rows


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def resolve_user(spec: str, passwd: str | None, group: str | None) -> Identity:
    """USER ("name", "uid", "name:group", "uid:gid", "", …) against the image's passwd/group text.

    Like docker: a name must exist; a number is used as it is (with the gid and home of its
    passwd entry when there is one, else gid 0 and home /); a group given explicitly sets the
    gid, otherwise the user's groups in /etc/group become supplementary groups.
    """
    user_arg, has_group, group_arg = spec.partition(":")
    uid_arg = _int(user_arg)
    users = [u for u in _table(passwd, 7) if _int(u[2]) is not None and _int(u[3]) is not None]

    def matches(u: list[str]) -> bool:
        if user_arg == "":
            return u[2] == "0"
        return int(u[2]) == uid_arg if uid_arg is not None else u[0] == user_arg

    found = next((u for u in users if matches(u)), None)
    if found is not None:
        ident = Identity(uid=int(found[2]), gid=int(found[3]), home=found[5] or "/", name=found[0])
    elif user_arg == "":
        ident = Identity()
    elif uid_arg is not None:
        ident = Identity(uid=uid_arg)
    else:
        where = "/etc/passwd" if passwd is not None else "the image (it has no /etc/passwd)"
        raise UserError(f"USER {spec}: no user '{user_arg}' in {where}",
                        hint=f"add it in the Dockerfile (useradd {user_arg}), or use a numeric uid")
    groups = [g for g in _table(group, 4) if _int(g[2]) is not None]
    if has_group and group_arg:
        gid_arg = _int(group_arg)
        match = next((g for g in groups if (int(g[2]) == gid_arg if gid_arg is not None else g[0] == group_arg)),
                     None)
        if match is not None:
            return replace(ident, gid=int(match[2]))
        if gid_arg is None:
            raise UserError(f"USER {spec}: no group '{group_arg}' in /etc/group",
                            hint=f"add it in the Dockerfile (groupadd {group_arg}), or use a numeric gid")
        return replace(ident, gid=gid_arg)
    if ident.name is not None:
        member = tuple(int(g[2]) for g in groups if ident.name in g[3].split(","))
        return replace(ident, groups=member)
    return ident


def container_env(env: Env, *, hostname: str, home: str) -> Env:
    """The environment docker gives the app: PATH (docker's default) and HOSTNAME first, the
    image's Env over them, HOME from the user's passwd entry when the image sets none."""
    out = merge_env((("PATH", DEFAULT_PATH), ("HOSTNAME", hostname)), env)
    if not any(name == "HOME" for name, _ in out):
        out = (*out, ("HOME", home))
    return out


def env_value(env: Env, name: str) -> str | None:
    return next((v for n, v in env if n == name), None)


def find_executable(argv0: str, *, path: str, workdir: str, files: frozenset[str] | set[str],
                    symlinks: Mapping[str, str]) -> str:
    """The absolute path argv[0] runs, looked up like runc does: PATH when it has no slash,
    else relative to WORKDIR. `files`: the executable regular files of the root filesystem
    and `symlinks` its symlinks (link → target), as tarstream.member_path names them."""

    def present(candidate: str) -> bool:
        return resolve_link(candidate.lstrip("/"), dict(symlinks)) in files

    if not argv0:
        raise UserError("the app's argv[0] is empty", hint="set ENTRYPOINT/CMD, or argv in [app]")
    if "/" in argv0:
        candidate = posixpath.normpath(posixpath.join(workdir, argv0))
        if present(candidate):
            return candidate
        raise UserError(f"the app's executable {argv0} is not in the image (no executable {candidate})",
                        hint="fix ENTRYPOINT/CMD or WORKDIR in the Dockerfile, or argv in [app]")
    for entry in path.split(":"):
        candidate = posixpath.normpath(posixpath.join(workdir, entry or ".", argv0))
        if present(candidate):
            return candidate
    raise UserError(f"the app's executable {argv0} is not in the image (PATH={path})",
                    hint="install it in the Dockerfile, use its full path, or set PATH with ENV")


# --------------------------------------------------------------------------------------------
# The resolved app
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """Everything a guest init needs to run the app the way `docker run` would."""

    argv: tuple[str, ...]
    exe: str  # absolute path of argv[0] in the guest
    env: Env  # the complete environment
    cwd: str
    identity: Identity
    stop_signal: int = DEFAULT_STOP_SIGNAL
    hostname: str = "ldt"


@dataclass(frozen=True)
class RootfsFacts:
    """What resolve() and init_kind() need to know about a root filesystem (rootfs.scan_rootfs reads it)."""

    files: frozenset[str]  # executable regular files, relative paths
    symlinks: Mapping[str, str]
    passwd: str | None  # /etc/passwd text, None when absent
    group: str | None
    kernels: tuple[str, ...] = ()  # versions of the kernels in /boot (none: the VM borrows one)


def resolve(config: AppConfig, facts: RootfsFacts, *, hostname: str) -> App:
    """AppConfig + the root filesystem → App, or one UserError naming what is missing."""
    argv = config.argv
    if not argv:
        raise UserError("the image has no command (no ENTRYPOINT and no CMD)", hint="set argv in [app]")
    identity = resolve_user(config.user, facts.passwd, facts.group)
    env = container_env(config.env, hostname=hostname, home=identity.home)
    for name, value in env:
        if not name or "=" in name or name.startswith("-") or "\0" in name + value:
            raise UserError(f"environment variable {name!r} cannot be passed to the app",
                            hint="rename it in the Dockerfile's ENV or in [app] env")
    if any("\0" in a for a in argv):
        raise UserError("the app's argv contains a NUL character", hint="fix ENTRYPOINT/CMD")
    cwd = posixpath.normpath(posixpath.join("/", config.working_dir))
    exe = find_executable(argv[0], path=env_value(env, "PATH") or "", workdir=cwd, files=facts.files,
                          symlinks=facts.symlinks)
    if "=" in exe:
        raise UserError(f"the app's executable {exe} has '=' in its path", hint="rename it in the image")
    return App(argv=argv, exe=exe, env=env, cwd=cwd, identity=identity, stop_signal=config.stop_signal,
               hostname=hostname)


# --------------------------------------------------------------------------------------------
# Which init runs it, and the files each one needs
# --------------------------------------------------------------------------------------------


class InitKind(enum.StrEnum):
    SYSTEMD = "systemd"  # the image boots its own systemd; the app is ldt-app.service
    LDT = "ldt"  # our static busybox + app-init.sh as PID 1

    @property
    def kernel_args(self) -> str:
        """What the kernel command line needs for this init."""
        return f"init={INIT}" if self is InitKind.LDT else ""


def init_kind(files: frozenset[str] | set[str], symlinks: Mapping[str, str]) -> InitKind:
    """SYSTEMD when the image's /sbin/init is systemd; any other image gets our init."""
    target = resolve_link("sbin/init", dict(symlinks))
    if target in files and posixpath.basename(target) == "systemd" and "lib/systemd" in target:
        return InitKind.SYSTEMD
    return InitKind.LDT


@dataclass(frozen=True)
class GuestFile:
    """One entry to add to the root filesystem: content, a host file to copy, or a symlink."""

    path: str  # absolute, in the guest
    mode: int = 0o644
    data: bytes = b""
    source: Path | None = None
    link: str | None = None


def guest_script(name: str) -> bytes:
    """A shell script of pipeline/guest/ (shipped as package data)."""
    return resources.files("pipeline").joinpath("guest", name).read_bytes()


def is_static_elf(head: bytes) -> bool:
    """True for an ELF executable without an interpreter (runs in an image without libc)."""
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # 64-bit little endian only
        return False
    phoff = int.from_bytes(head[0x20:0x28], "little")
    phentsize = int.from_bytes(head[0x36:0x38], "little")
    phnum = int.from_bytes(head[0x38:0x3A], "little")
    for i in range(phnum):
        entry = head[phoff + i * phentsize: phoff + (i + 1) * phentsize]
        if len(entry) < 4:
            raise UserError("ELF header cut short: pass the first 64 KiB of the file")
        if int.from_bytes(entry[:4], "little") == 3:  # PT_INTERP
            return False
    return True


def host_busybox(path: Path = HOST_BUSYBOX) -> Path:
    """The static busybox our init runs on; one line saying how to get it when it is missing."""
    hint = "install it: sudo apt-get install busybox-static (or run ./setup.sh)"
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError as e:
        raise UserError(f"{path}: no busybox to boot app images without an init", hint=hint) from e
    if not is_static_elf(head):
        raise UserError(f"{path} is not a static busybox: it cannot run in an image without libc", hint=hint)
    return path


def guest_files(app: App, kind: InitKind, busybox: Path = HOST_BUSYBOX) -> tuple[GuestFile, ...]:
    """What the root filesystem needs so that booting it runs the app, for either init."""
    if kind is InitKind.SYSTEMD:
        unit_dir = "/etc/systemd/system"
        return (
            GuestFile(GUEST_DIR, mode=0o755 | 0o040000),
            GuestFile(EXIT_HOOK, mode=0o755, data=guest_script("app-exit.sh")),
            GuestFile(f"{unit_dir}/{UNIT_NAME}", data=systemd_unit(app).encode()),
            GuestFile(f"{unit_dir}/multi-user.target.wants/{UNIT_NAME}", mode=0o777, link=f"../{UNIT_NAME}"),
        )
    return (
        GuestFile(GUEST_DIR, mode=0o755 | 0o040000),
        GuestFile(BUSYBOX, mode=0o755, source=busybox),
        GuestFile(INIT, mode=0o755, data=guest_script("app-init.sh")),
        GuestFile(INIT_CONFIG, data=app_init_config(app).encode()),
    )


VERSION = 1  # of what this module writes into an image: bump when guest_files() changes its output


@dataclass(frozen=True)
class Plan:
    """What the app stage decided for one image (its app.json): the app and the init that runs it
    (both None: the image boots as an OS), the TCP ports to forward, the image's own kernels."""

    app: App | None = None
    init: InitKind | None = None
    tcp_ports: tuple[int, ...] = ()
    kernels: tuple[str, ...] = ()

    @property
    def kernel_args(self) -> str:
        return self.init.kernel_args if self.init is not None else ""

    def describe(self) -> str:
        if self.app is None:
            return "no app: the image boots as an OS"
        who = self.app.identity.name or f"uid {self.app.identity.uid}"
        ports = f", TCP ports {', '.join(map(str, self.tcp_ports))}" if self.tcp_ports else ""
        assert self.init is not None
        by = "a systemd unit" if self.init is InitKind.SYSTEMD else "our init"
        return f"app {shlex.join(self.app.argv)} as {who} in {self.app.cwd}, run by {by}{ports}"

    def to_json(self) -> dict[str, Any]:
        a = self.app
        return {
            "app": None if a is None else {
                "argv": list(a.argv), "exe": a.exe, "env": [list(kv) for kv in a.env], "cwd": a.cwd,
                "uid": a.identity.uid, "gid": a.identity.gid, "home": a.identity.home, "user": a.identity.name,
                "groups": list(a.identity.groups), "stop_signal": int(a.stop_signal), "hostname": a.hostname},
            "init": None if self.init is None else str(self.init),
            "tcp_ports": list(self.tcp_ports),
            "kernels": list(self.kernels),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        a = data.get("app")
        app = None if a is None else App(
            argv=tuple(a["argv"]), exe=a["exe"], env=tuple((n, v) for n, v in a["env"]), cwd=a["cwd"],
            identity=Identity(uid=a["uid"], gid=a["gid"], home=a["home"], name=a["user"], groups=tuple(a["groups"])),
            stop_signal=a["stop_signal"], hostname=a["hostname"])
        init = data.get("init")
        return cls(app, None if init is None else InitKind(init), tuple(data.get("tcp_ports", ())),
                   tuple(data.get("kernels", ())))


def plan(image_config: Mapping[str, Any], settings: AppSettings, facts: RootfsFacts, *, hostname: str) -> Plan:
    """The image config and the recipe's [app] against the root filesystem: what the VM runs.
    A UserError (no such executable, user or group) before anything is built or booted."""
    config = apply(settings, AppConfig.from_image_config(image_config))
    if config is None:
        return Plan(kernels=facts.kernels)
    resolved = resolve(config, facts, hostname=hostname)
    kind = init_kind(facts.files, facts.symlinks)
    if kind is InitKind.SYSTEMD:
        systemd_unit(resolved)  # its UserErrors (no passwd entry, an unwritable WORKDIR) now, not at boot
    return Plan(resolved, kind, config.tcp_ports, facts.kernels)


def exit_status(console: str) -> int | None:
    """The app's exit status from the console output of a run, None if it never said."""
    found = EXIT_MARKER_RE.findall(console)
    return int(found[-1]) if found else None


# --------------------------------------------------------------------------------------------
# Our init's config: POSIX shell, sourced by app-init.sh
# --------------------------------------------------------------------------------------------


def app_init_config(app: App) -> str:
    """/.ldt/app.conf: LDT_* variables and `set --` to the arguments of `env -i`: the
    environment as NAME=value words, then the executable and argv[1:]. Every word is
    POSIX-quoted, so any value (quotes, $, newlines, unicode) reaches the app unchanged.

    argv[0] becomes the executable's absolute path: busybox can neither exec a name from PATH
    without preferring its own applet of that name, nor set argv[0] apart from the path.
    """
    q = shlex.quote
    words = [f"{name}={value}" for name, value in app.env] + [app.exe, *app.argv[1:]]
    lines = [
        "# The app of this image, for /.ldt/init; written by LDT (pipeline/app.py). Sourced, not run.",
        f"LDT_UID={app.identity.uid}",
        f"LDT_GID={app.identity.gid}",
        f"LDT_CWD={q(app.cwd)}",
        f"LDT_HOSTNAME={q(app.hostname)}",
        f"LDT_STOP_SIGNAL={int(app.stop_signal)}",
        "set -- \\",
        *(f"  {q(w)} \\" for w in words[:-1]),
        f"  {q(words[-1])}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# systemd: ldt-app.service
# --------------------------------------------------------------------------------------------

_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
              "\\": "\\\\", '"': '\\"'}


def _c_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def systemd_word(word: str) -> str:
    """One word of a command line (systemd.service "Command lines"): double-quoted, C escapes,
    `%` as `%%` (specifiers) and `$` as `$$` (variable expansion); "" stays an empty argument."""
    if "\0" in word:
        raise UserError("the app's argv contains a NUL character", hint="fix ENTRYPOINT/CMD")
    return '"' + _c_escape(word).replace("%", "%%").replace("$", "$$") + '"'


ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def systemd_environment(name: str, value: str) -> str:
    """One Environment= assignment: the whole NAME=value quoted, C escapes, `%` as `%%`
    (Environment= expands specifiers, not variables: `$` stays)."""
    if not ENV_NAME_RE.fullmatch(name):
        raise UserError(f"environment variable {name!r}: systemd only passes names of letters, digits and _",
                        hint="rename it in the Dockerfile's ENV, or set enabled = false in [app]")
    return '"' + _c_escape(f"{name}={value}").replace("%", "%%") + '"'


def _unit_path(path: str) -> str:
    if any(ord(c) < 0x20 for c in path) or path != path.strip():
        raise UserError(f"WORKDIR {path!r} cannot be written in a systemd unit", hint="rename the directory")
    return path.replace("%", "%%")


def systemd_unit(app: App) -> str:
    """ldt-app.service for an image whose init is systemd.

    Exit: ExecStopPost= (as root: `+`) prints EXIT_MARKER with the status on /dev/console, then
    SuccessAction=/FailureAction=exit-force stop the manager. In a container that is an exit with
    the app's status; in a VM systemd-shutdown cannot exit and powers off instead (shutdown.c:
    "We cannot exit() on the host"), so the host reads the status from the marker line.
    """
    ident = app.identity
    if ident.name is None:
        raise UserError(f"uid {ident.uid} has no /etc/passwd entry: systemd will not run a service as it",
                        hint="add the user in the Dockerfile (useradd), or set enabled = false in [app]")
    exec_start = " ".join(systemd_word(w) for w in (f"@{app.exe}", *app.argv))
    lines = [
        "# The image's app (ENTRYPOINT/CMD) as docker would run it; written by LDT (pipeline/app.py).",
        "[Unit]",
        "Description=The image's app (ENTRYPOINT and CMD)",
        "Wants=network-online.target",
        "After=network-online.target",
        "SuccessAction=exit-force",
        "FailureAction=exit-force",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_start}",
        f"ExecStopPost=+{EXIT_HOOK}",
        *(f"Environment={systemd_environment(n, v)}" for n, v in app.env),
        f"WorkingDirectory={_unit_path(app.cwd)}",
        f"User={ident.name}",
        f"Group={ident.gid}",
        f"KillSignal={signal_name(app.stop_signal)}",
        "TimeoutStopSec=10s",  # docker stop's default grace period
        "StandardOutput=journal+console",
        "StandardError=journal+console",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"
