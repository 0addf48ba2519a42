"""What each tool needs of the host (root, the Docker socket, /dev/kvm, user namespaces), said once
at its start: a note when root is not needed, the one-line fix when some access is missing.

The decisions are pure functions of a `Facts` value (uid, what is accessible), so tests need no
root and no daemon; `probe()` reads the host, `announce(tool)` does both at an entry point, and
`help_sentence(tool)` is the sentence about root for the tool's --help.
"""

from __future__ import annotations

import enum
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.notices import first_time

DOCKER_SOCKET = "/var/run/docker.sock"
KVM = "/dev/kvm"


class Need(enum.StrEnum):
    """One thing a tool needs of the host."""

    ROOTLESS = "rootless"  # never needs root: as root, a note says so
    DOCKER_SOCKET = "docker-socket"  # the Docker daemon's socket ($DOCKER_HOST or /var/run/docker.sock)
    KVM_OPTIONAL = "kvm-optional"  # read-write /dev/kvm for KVM; without it TCG (works, slower)
    USERNS = "userns"  # as a user: user namespaces and /etc/subuid, /etc/subgid entries (mmdebstrap unshare)
    READS_TREE = "reads-tree"  # reads every file of a folder (said in --help only: the folder is an argument)

    def sentence(self) -> str:
        """This need, as part of a tool's --help."""
        return {
            Need.ROOTLESS: "Root is not needed: it runs as any user.",
            Need.DOCKER_SOCKET: "Needs access to the Docker daemon's socket ($DOCKER_HOST, else "
                                f"{DOCKER_SOCKET}; the docker group, which is as good as root), not root itself.",
            Need.KVM_OPTIONAL: f"KVM needs read-write {KVM} (the kvm group); without it the VM runs under TCG, "
                               "slower.",
            Need.USERNS: "As a user it runs mmdebstrap in a user namespace (its unshare mode: needs "
                         "/etc/subuid and /etc/subgid entries); as root, mmdebstrap's root mode.",
            Need.READS_TREE: "It reads every file of DIR: a tree made by root (with files only root may read) "
                             "needs root.",
        }[self]


@dataclass(frozen=True)
class Tool:
    name: str
    needs: frozenset[Need]


def _tool(name: str, *needs: Need) -> Tool:
    return Tool(name, frozenset(needs))


TOOLS: dict[str, Tool] = {t.name: t for t in (
    _tool("build-tgz", Need.DOCKER_SOCKET),
    _tool("suco", Need.DOCKER_SOCKET),
    _tool("build-syslinux-bios", Need.ROOTLESS),
    _tool("build-efistub", Need.ROOTLESS),
    _tool("run-tgz", Need.ROOTLESS, Need.KVM_OPTIONAL),
    _tool("run-dir", Need.ROOTLESS, Need.READS_TREE, Need.KVM_OPTIONAL),
    _tool("run-bios", Need.ROOTLESS, Need.KVM_OPTIONAL),
    _tool("run-uefi", Need.ROOTLESS, Need.KVM_OPTIONAL),
    _tool("virt", Need.ROOTLESS, Need.KVM_OPTIONAL),
    _tool("debian-install", Need.ROOTLESS, Need.USERNS),
    _tool("arch-install", Need.ROOTLESS, Need.USERNS),  # its own wording of these: pipeline/arch.py
)}
ORDER = (Need.ROOTLESS, Need.READS_TREE, Need.DOCKER_SOCKET, Need.USERNS, Need.KVM_OPTIONAL)  # of the sentences


class Access(enum.StrEnum):
    """Can this user use a device or socket?"""

    OK = "ok"
    MISSING = "missing"
    DENIED = "denied"
    REMOTE = "remote"  # $DOCKER_HOST names a TCP or SSH daemon: nothing to check here


@dataclass(frozen=True)
class Facts:
    """What the checks depend on; `probe()` fills it from the host."""

    uid: int
    user: str = "you"
    docker_socket: str = DOCKER_SOCKET
    docker: Access = Access.OK
    kvm: Access = Access.OK
    userns_problem: tuple[str, str] | None = None  # why mmdebstrap's unshare mode cannot work here, and the fix


@dataclass(frozen=True)
class Notice:
    text: str
    hint: str | None = None
    fatal: bool = False  # True: the tool cannot work; announce() raises it as a UserError


def help_sentence(tool: str) -> str:
    """The sentences about root (and the access it needs) for the tool's --help."""
    needs = TOOLS[tool].needs
    return " ".join(n.sentence() for n in ORDER if n in needs)


def notices(tool: str, facts: Facts) -> list[Notice]:
    """What to say at the start of `tool`, given the facts: at most one line per need."""
    needs = TOOLS[tool].needs
    out: list[Notice] = []
    if Need.ROOTLESS in needs and facts.uid == 0:
        out.append(Notice(f"{tool}: running as root, which it does not need (any user can run it)"))
    if Need.DOCKER_SOCKET in needs:
        if facts.docker is Access.MISSING:
            out.append(Notice(f"{tool}: no Docker daemon socket at {facts.docker_socket}",
                              "start the daemon (`sudo systemctl start docker`), or set DOCKER_HOST", fatal=True))
        elif facts.docker is Access.DENIED:
            out.append(Notice(f"{tool}: {facts.user} may not use the Docker daemon's socket {facts.docker_socket}",
                              f"`sudo usermod -aG docker {facts.user}` and log in again (the docker group is as "
                              "good as root), or use a rootless daemon through DOCKER_HOST", fatal=True))
    if Need.USERNS in needs and facts.uid != 0 and facts.userns_problem:
        why, fix = facts.userns_problem
        out.append(Notice(f"{tool}: mmdebstrap cannot run rootless here: {why}", f"{fix}, or run it as root",
                          fatal=True))
    if Need.KVM_OPTIONAL in needs:
        if facts.kvm is Access.DENIED:
            out.append(Notice(f"{tool}: {KVM} is not read-write for {facts.user}, so the VM runs under TCG (slower); "
                              f"for KVM: `sudo usermod -aG kvm {facts.user}` and log in again"))
        elif facts.kvm is Access.MISSING:
            out.append(Notice(f"{tool}: no {KVM}, so the VM runs under TCG (slower); for KVM enable virtualization "
                              "in the firmware (or nested virtualization) and load kvm_intel or kvm_amd"))
    return out


# -- the host ---------------------------------------------------------------------------------------


def docker_socket(env: dict[str, str] | os._Environ[str]) -> str | None:
    """The daemon's Unix socket path ($DOCKER_HOST or the default); None for a remote daemon."""
    host = env.get("DOCKER_HOST", "")
    if not host:
        return DOCKER_SOCKET
    if host.startswith("unix://"):
        return host.removeprefix("unix://")
    return None


def path_access(path: str) -> Access:
    if not os.path.exists(path):
        return Access.MISSING
    return Access.OK if os.access(path, os.R_OK | os.W_OK) else Access.DENIED


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def subid_has(text: str | None, user: str, uid: int) -> bool:
    """/etc/subuid or /etc/subgid text: an entry `user:start:count` (or `uid:…`) with a non-zero count."""
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[2].isdigit() and int(parts[2]) > 0:
            return True
    return False


def userns_problem(*, uid: int, user: str, userns_clone: str | None, max_userns: str | None,
                   apparmor_restrict: str | None, subuid: str | None, subgid: str | None,
                   newuidmap: bool) -> tuple[str, str] | None:
    """Why mmdebstrap's unshare mode cannot work for this user, and the fix; None when it can.

    userns_clone: /proc/sys/kernel/unprivileged_userns_clone (Debian kernels; None: not there);
    max_userns: /proc/sys/user/max_user_namespaces; apparmor_restrict:
    /proc/sys/kernel/apparmor_restrict_unprivileged_userns (Ubuntu 23.10+)."""
    if userns_clone is not None and userns_clone.strip() == "0":
        return "the kernel refuses unprivileged user namespaces", "`sudo sysctl kernel.unprivileged_userns_clone=1`"
    if max_userns is not None and max_userns.strip() == "0":
        return "user namespaces are disabled", "`sudo sysctl user.max_user_namespaces=15000`"
    if apparmor_restrict is not None and apparmor_restrict.strip() == "1":
        return ("AppArmor restricts unprivileged user namespaces",
                "`sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`")
    if not subid_has(subuid, user, uid) or not subid_has(subgid, user, uid):
        return (f"no /etc/subuid and /etc/subgid range for {user}",
                f"`sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`")
    if not newuidmap:
        return "newuidmap and newgidmap are missing", "`sudo apt-get install uidmap`"
    return None


def probe(tool: str) -> Facts:
    """The facts `tool` depends on, read from this host (quick: a few stat and read calls)."""
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    needs = TOOLS[tool].needs
    socket = docker_socket(os.environ)
    docker = Access.OK
    if Need.DOCKER_SOCKET in needs:
        docker = Access.REMOTE if socket is None else path_access(socket)
    kvm = path_access(KVM) if Need.KVM_OPTIONAL in needs else Access.OK
    problem = None
    if Need.USERNS in needs and uid != 0:
        problem = userns_problem(
            uid=uid, user=user, userns_clone=_read("/proc/sys/kernel/unprivileged_userns_clone"),
            max_userns=_read("/proc/sys/user/max_user_namespaces"),
            apparmor_restrict=_read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
            subuid=_read("/etc/subuid"), subgid=_read("/etc/subgid"), newuidmap=bool(shutil.which("newuidmap")))
    return Facts(uid=uid, user=user, docker_socket=socket or "", docker=docker, kvm=kvm, userns_problem=problem)


def announce(tool: str, facts: Facts | None = None, *, seen: Path | None = None) -> None:
    """At a tool's start: a missing access it needs is a UserError; its other notes are printed
    (one line each, stderr), once: with `seen` (a folder), a note already shown there is not
    repeated, so a tool used like sudo stays quiet on every later run."""
    for n in notices(tool, facts if facts is not None else probe(tool)):
        if n.fatal:
            raise UserError(n.text.removeprefix(f"{tool}: "), hint=n.hint)
        if seen is not None and not first_time(seen, n.text):
            continue
        print(n.text, file=sys.stderr, flush=True)
