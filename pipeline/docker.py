"""The Docker engine, through the Docker SDK for Python. The only module that imports it.

The SDK is imported lazily: `doit list` and no-op runs never pay for it. Functions take a
client (see `client()`), so tests can pass a fake one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

START_HINT = "start it with `sudo systemctl start docker` (or `sudo dockerd &`), or run ./setup.sh"


def client():
    """A connected client, or one clear line saying the daemon is not reachable."""
    import docker
    from docker.errors import DockerException

    try:
        c = docker.from_env(timeout=600)
        c.ping()
    except DockerException as e:
        reason = str(e).split("(", 1)[0].strip() or "no answer"
        raise UserError(f"the Docker daemon is not reachable: {reason}", hint=START_HINT) from e
    return c


# recipe.toml holds settings of the pipeline, not of the image: never part of the build context,
# so editing a boot setting does not rebuild the tgz.
NOT_CONTEXT = ("recipe.toml",)


def ignore_patterns(context: Path) -> list[str]:
    ignore = context / ".dockerignore"
    patterns = list(NOT_CONTEXT)
    if ignore.is_file():
        patterns += [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    return patterns


def build_file_name(context: Path) -> str:
    """The context's build file: Dockerfile, or Containerfile (the same format by another name)."""
    from pipeline.recipes import build_file

    found = build_file(context)
    return found.name if found else "Dockerfile"


def context_files(context: Path, dockerfile: str | None = None) -> list[str]:
    """Files of a build context that the engine sees, after .dockerignore (docker's own matcher);
    the build file (default: whichever of Dockerfile/Containerfile is there) is always one.
    Without a .dockerignore, the only pattern is NOT_CONTEXT's (top-level names), so the walk is
    ours: importing the SDK for its matcher cost a no-op doit 0.1 s."""
    dockerfile = dockerfile or build_file_name(context)
    if (context / ".dockerignore").is_file():
        from docker.utils.build import exclude_paths

        paths = exclude_paths(str(context), ignore_patterns(context), dockerfile=dockerfile)
    else:
        paths = {p for p in _walk(context) if p not in NOT_CONTEXT} | {dockerfile}
    return sorted(p for p in paths if not (context / p).is_dir() or (context / p).is_symlink())


def _walk(context: Path) -> Iterator[str]:
    """Every file and symlink under context, relative to it (a symlink to a folder not followed)."""
    for folder, dirs, files in os.walk(context):
        rel = os.path.relpath(folder, context)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            yield name if rel == "." else os.path.join(rel, name)


def image_id(c, ref: str) -> str | None:
    from docker.errors import ImageNotFound

    try:
        return c.images.get(ref).id
    except ImageNotFound:
        return None


def image_config(c, ref: str) -> dict[str, Any]:
    """The parts of an image's config that `docker import` can restore (ENV, CMD, …)."""
    cfg = c.images.get(ref).attrs.get("Config") or {}
    keep = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts", "StopSignal")
    return {k: cfg[k] for k in keep if cfg.get(k)}


def config_changes(cfg: dict[str, Any]) -> list[str]:
    """Dockerfile instructions that re-create an image config on `docker import`."""
    import json

    out = [f"ENV {e.split('=', 1)[0]}={json.dumps(e.split('=', 1)[1])}" for e in cfg.get("Env", [])]
    for key, instr in (("Cmd", "CMD"), ("Entrypoint", "ENTRYPOINT")):
        if cfg.get(key):
            out.append(f"{instr} {json.dumps(cfg[key])}")
    if cfg.get("WorkingDir"):
        out.append(f"WORKDIR {cfg['WorkingDir']}")
    if cfg.get("User"):
        out.append(f"USER {cfg['User']}")
    for k, v in (cfg.get("Labels") or {}).items():
        out.append(f"LABEL {json.dumps(k)}={json.dumps(v)}")
    for port in cfg.get("ExposedPorts") or {}:
        out.append(f"EXPOSE {port}")
    if cfg.get("StopSignal"):
        out.append(f"STOPSIGNAL {cfg['StopSignal']}")
    return out


def tag(c, image: str, ref: str) -> None:
    repo, _, t = ref.partition(":")
    c.images.get(image).tag(repo, t or "latest")


def untag(c, ref: str) -> bool:
    """Take tag `ref` off its image when the image keeps another tag (ours always keep their
    keyed one); an image is never deleted. Whether a tag was taken off."""
    from docker.errors import ImageNotFound

    try:
        image = c.images.get(ref)
    except ImageNotFound:
        return False
    if len(image.tags) < 2:
        return False
    c.images.remove(ref, noprune=True)
    return True


def import_tgz(c, tgz: Path, ref: str, changes: list[str] | None = None) -> str:
    """Import a rootfs tarball as image `ref`; returns the image id."""
    repo, _, t = ref.partition(":")
    c.api.import_image_from_file(str(tgz), repository=repo, tag=t or "latest", changes=changes or None)
    found = image_id(c, ref)
    if found is None:
        raise UserError(f"docker import of {tgz} did not produce {ref}")
    return found


def ensure_base(c, ref: str, recipe: str, bootstraps: list[str]) -> str:
    """A non-recipe base image: local, or pulled now; else one line naming a recipe to use."""
    from docker.errors import APIError, ImageNotFound

    found = image_id(c, ref)
    if found is not None:
        return found
    try:
        return c.images.pull(ref).id
    except (APIError, ImageNotFound) as e:
        raise UserError(
            f"recipe '{recipe}': base image {ref} is neither local nor pullable "
            f"({(e.explanation if isinstance(e, APIError) else None) or e})",
            hint=_base_hint(bootstraps)) from e


def _base_hint(bootstraps: list[str]) -> str:
    images = ", ".join(f"FROM ldt/{r}" for r in bootstraps)
    if images:
        return f"build from a bootstrap recipe's image instead ({images}), or `docker load` the image"
    return "add a bootstrap recipe (recipe.toml with [bootstrap]) and build FROM ldt/<it>, or `docker load` the image"


STEP_RE = re.compile(r"^Step \d+/\d+ : (.*)$")
PULL_ERRORS = ("pull access denied", "manifest unknown", "not found: manifest", "repository does not exist",
               "no such host", "dial tcp", "i/o timeout", "toomanyrequests", "connection refused",
               "failed to resolve", "server misbehaving", "tls handshake")


def build(c, context: Path, ref: str, *, buildargs: dict[str, str], platform: str, recipe: str,
          known_recipes: list[str], echo: Callable[[str], None], dockerfile: str | None = None) -> str:
    """docker build with the log streamed live through `echo`; returns the image id.

    `dockerfile`: the build file's name in the context (default: its Dockerfile or Containerfile).

    A failing step raises one line naming the step, with the tail of its log.
    """
    from docker.errors import APIError
    from docker.utils.build import tar

    log: list[str] = []
    step = ""
    image = None
    partial = ""  # the engine splits lines across items: echo whole lines only
    dockerfile = dockerfile or build_file_name(context)
    try:
        # the context is uploaded before the call returns; the log streams afterwards
        with tar(str(context), exclude=ignore_patterns(context), dockerfile=(dockerfile, None)) as ctx:
            stream = c.api.build(fileobj=ctx, custom_context=True, tag=ref, buildargs=buildargs, dockerfile=dockerfile,
                                 platform=platform, rm=True, forcerm=True, decode=True, pull=False)
        for item in stream:
            if "stream" in item:
                *lines, partial = (partial + item["stream"]).split("\n")
                for line in lines:
                    if not line.strip():
                        continue
                    if m := STEP_RE.match(line):
                        step = m.group(1)
                        log = []
                    log.append(line)
                    echo(line)
            elif "aux" in item and "ID" in item["aux"]:
                image = item["aux"]["ID"]
            elif "error" in item:
                raise _build_error(item["error"], step, log, recipe, known_recipes)
    except APIError as e:
        raise _build_error(str(e.explanation or e), step, log, recipe, known_recipes) from e
    if image is None:
        image = image_id(c, ref)
    if image is None:
        raise UserError(f"recipe '{recipe}': docker build finished without an image", hint="run with LDT_VERBOSE=1")
    return image


def _build_error(message: str, step: str, log: list[str], recipe: str, known: list[str]) -> UserError:
    message = message.strip()
    if step.upper().startswith("FROM") or any(s in message.lower() for s in PULL_ERRORS):
        base = step.split()[1] if step.upper().startswith("FROM") and len(step.split()) > 1 else "the base image"
        return UserError(f"recipe '{recipe}': base image {base} is neither local nor pullable ({message})",
                         hint=_base_hint(known))
    tail = "\n".join("    " + line for line in log[-20:])
    where = f"step `{step}` failed" if step else "build failed"
    return UserError(f"recipe '{recipe}': {where}: {message}\n{tail}",
                     hint=f"fix recipes/{recipe}/Dockerfile; the full log is above")


LABEL = "org.ldt.pipeline"  # on every container the pipeline creates: "<host>:<pid>" of its creator


def creator_label() -> dict[str, str]:
    return {LABEL: f"{socket.gethostname()}:{os.getpid()}"}


def _creator_gone(value: str) -> bool:
    """The creator named by a label ran on this host and has exited."""
    host, _, pid = value.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_leftovers(c) -> list[str]:
    """Remove the containers of pipeline runs that were killed (their creator is gone); their names."""
    removed = []
    for container in c.containers.list(all=True, filters={"label": LABEL}):
        if _creator_gone(container.labels.get(LABEL, "")):
            with contextlib.suppress(Exception):
                container.remove(force=True)
                removed.append(container.name)
    return removed


@contextlib.contextmanager
def exported(c, image: str, chunk_size: int = 1 << 20) -> Iterator[Iterator[bytes]]:
    """The filesystem of `image` as a stream of tar chunks, from a temporary container.

    The container is removed on every path: success, failure and Ctrl-C; one a killed run
    left (kill -9) carries the label and is removed by the next export or `doit store_gc`.
    """
    remove_leftovers(c)
    container = c.containers.create(image, command=["/bin/true"], entrypoint=[], network_disabled=True,
                                    labels=creator_label())
    try:
        yield container.export(chunk_size=chunk_size)
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
)  # bits 0..37 in kernel order; PERFMON, BPF, CHECKPOINT_RESTORE are unknown to Debian 12's engine (20.10)


def host_capabilities(status: str | None = None) -> list[str]:
    """Names of the capabilities in this process's bounding set (the engine's, on one host)."""
    if status is None:
        status = Path("/proc/self/status").read_text()
    bits = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd:")), 16)
    return [name for i, name in enumerate(CAPABILITIES) if bits >> i & 1]


def run_privileged(c, image: str, argv: list[str], workdir: Path, *, tty: bool) -> int:
    """suco: argv in a --privileged --cap-add SYS_ADMIN container of `image`, the host's `workdir`
    at /work; stdin, stdout and stderr passed through (a TTY when interactive); returns the exit status."""
    import sys

    from docker.errors import APIError

    binds = {str(workdir): {"bind": "/work", "mode": "rw"}}

    def create(**privileges: Any):
        host_config = c.api.create_host_config(binds=binds, **privileges)
        created = c.api.create_container(image, command=argv, entrypoint=[], working_dir="/work", tty=tty,
                                         stdin_open=True, host_config=host_config)  # not detached: StdinOnce
        return c.containers.get(created["Id"])

    containers = [create(privileged=True, cap_add=["SYS_ADMIN"])]
    try:
        sock = _attach(c, containers[-1])
        try:
            containers[-1].start()
        except APIError as e:
            if "apply caps" not in str(e):
                raise UserError(f"suco: the container did not start: {e.explanation or e}") from e
            # The engine itself lacks some capability (nested in a container, as on these CI machines),
            # so --privileged cannot be granted: take every capability the host has, unconfined.
            caps = host_capabilities()
            print(f"suco: this host does not allow --privileged; running with its {len(caps)} capabilities, "
                  "unconfined", file=sys.stderr)
            try:
                containers.append(create(cap_add=caps, security_opt=["seccomp=unconfined", "apparmor=unconfined"]))
                sock = _attach(c, containers[-1])
                containers[-1].start()
            except APIError as e2:
                raise UserError(f"suco: the container did not start: {e2.explanation or e2}") from e2
        _relay(sock, tty)
        return int(containers[-1].wait().get("StatusCode", 1))
    finally:
        for container in containers:
            with contextlib.suppress(Exception):
                container.remove(force=True)


def _attach(c, container):
    sock = c.api.attach_socket(container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
    return getattr(sock, "_sock", sock)


def _relay(raw, tty: bool) -> None:
    """stdin -> container (EOF closes its stdin); its output -> stdout/stderr until it closes."""
    import os
    import select
    import socket
    import sys
    import threading

    def feed() -> None:
        try:
            fd = sys.stdin.fileno()
            while chunk := os.read(fd, 65536):
                raw.sendall(chunk)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_WR)

    threading.Thread(target=feed, daemon=True).start()
    out = {1: sys.stdout.buffer, 2: sys.stderr.buffer}
    buf = b""
    while True:
        ready, _, _ = select.select([raw], [], [], 1.0)
        if not ready:
            continue
        data = raw.recv(65536)
        if not data:
            return
        if tty:  # one raw stream
            out[1].write(data)
            out[1].flush()
            continue
        buf += data  # multiplexed: 8-byte headers [stream, 0, 0, 0, size (big endian)]
        while len(buf) >= 8 and len(buf) >= 8 + int.from_bytes(buf[4:8], "big"):
            size = int.from_bytes(buf[4:8], "big")
            stream = out.get(buf[0], out[2])
            stream.write(buf[8:8 + size])
            stream.flush()
            buf = buf[8 + size:]
