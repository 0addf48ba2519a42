"""arch-install DIR: a bootable Arch Linux tree in a folder (kernel and initramfs in DIR/boot), made
with pacstrap; `run-dir DIR` boots it. Also the tgz of a bootstrap recipe with distro = "arch".

Debian packages the tools: arch-install-scripts (pacstrap), pacman-package-manager (pacman,
pacman-key) and archlinux-keyring (the keys Arch's mirrors sign with). pacstrap gets a pacman.conf
written here: the mirror as the Server of each repository, the architecture, SigLevel Required with
a keyring made for this run (Arch's keys, or with --key the one key that signs a mirror of your own).

Rootless when not root: pacstrap -N (a user namespace, `unshare --map-auto --map-root-user`, through
the user's /etc/subuid and /etc/subgid ranges), so the tree belongs to the user and their sub-ids;
userns.py reads it back that way. As root pacstrap's own root mode (mounts in DIR while it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import access, userns
from pipeline.entrypoint import entry_point
from pipeline.errors import UserError
from pipeline.install import check_target, kernels_with_initrd
from pipeline.recipes import ARCH_MIRROR, Bootstrap
from pipeline.run import Step, log, run, spawn
from pipeline.tgz import Fixups, filter_tar, write_tgz

TOOL = "arch-install"
PACKAGES = ("base", "linux")  # base; linux pulls an initramfs generator (mkinitcpio) that its hook runs
REPOS = ("core", "extra")
ARCHITECTURE = "x86_64"
DEBIAN_PACKAGES = "arch-install-scripts pacman-package-manager archlinux-keyring"
TOOLS = ("pacstrap", "pacman", "pacman-key")
NAME_RE = re.compile(r"[a-z0-9@_+][a-z0-9@._+-]*")  # pacman's package names (lower case in practice)


@dataclass(frozen=True)
class Install:
    """What to install: the command line's options."""

    packages: tuple[str, ...] = PACKAGES
    mirror: str = ARCH_MIRROR
    repos: tuple[str, ...] = REPOS
    key: Path | None = None  # an armored public key that signs the mirror; None: Arch's keyring

    def server(self, repo: str) -> str:
        return self.mirror.replace("$repo", repo).replace("$arch", ARCHITECTURE)


def pacman_conf(spec: Install, gpgdir: Path) -> str:
    """The pacman.conf pacstrap installs with: nothing of the host's, every signature checked."""
    lines = ["[options]", f"Architecture = {ARCHITECTURE}", f"GPGDir = {gpgdir}",
             "SigLevel = Required DatabaseOptional", "LocalFileSigLevel = Optional", "ParallelDownloads = 5", ""]
    for repo in spec.repos:
        lines += [f"[{repo}]", f"Server = {spec.mirror}", ""]
    return "\n".join(lines)


def pacstrap_cmd(conf: Path, target: Path, packages: Sequence[str], rootless: bool) -> list[str]:
    """pacstrap into target (an existing folder) with our pacman.conf: -K a fresh keyring in the tree
    (pacman's hooks fill it), -M/-G nothing of the host's, -N as a user."""
    return ["pacstrap", *(["-N"] if rootless else []), "-C", os.fspath(conf), "-K", "-M", os.fspath(target),
            *packages]


def pacman_key_cmds(gpgdir: Path, key: Path | None, fingerprint: str | None) -> list[list[str]]:
    """The keyring pacman checks the mirror against: Arch's (archlinux-keyring), or one key of yours."""
    base = ["pacman-key", "--gpgdir", os.fspath(gpgdir)]
    if key is None:
        return [[*base, "--init"], [*base, "--populate", "archlinux"]]
    assert fingerprint is not None
    return [[*base, "--init"], [*base, "--add", os.fspath(key)], [*base, "--lsign-key", fingerprint]]


def fingerprint_of(colons: str) -> str | None:
    """The first primary key's fingerprint in `gpg --with-colons` output."""
    primary = False
    for line in colons.splitlines():
        f = line.split(":")
        if f[0] == "pub":
            primary = True
        elif f[0] == "fpr" and primary and len(f) > 9:
            return f[9]
    return None


def parse_packages(text: str) -> tuple[str, ...]:
    """'base, linux,vim' -> ('base', 'linux', 'vim'); a bad name is a UserError."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    for n in names:
        if not NAME_RE.fullmatch(n):
            raise UserError(f"--packages: '{n}' is not an Arch package name", hint="e.g. --packages base,linux,vim")
    if not names:
        raise UserError("--packages: no package named", hint=f"e.g. --packages {','.join(PACKAGES)}")
    return names


def failure(stderr: str, spec: Install) -> UserError | None:
    """pacstrap's failure as one line: what pacman said went wrong, and the fix (None: not a known case)."""
    m = re.search(r"target not found: (\S+)", stderr)
    if m:
        return UserError(f"no package '{m.group(1)}' in {', '.join(spec.repos)} at {spec.mirror}",
                         hint="check the name (`pacman -Ss` on an Arch system), or the repositories")
    if re.search(r"signature|PGP|invalid or corrupted (database|package)|unknown trust|key .* (could not|unknown)",
                 stderr):
        return UserError(f"the packages of {spec.mirror} do not verify against "
                         + (f"the key {spec.key}" if spec.key else "the Arch keyring (archlinux-keyring)"),
                         hint="give the mirror's own signing key with --key FILE" if spec.key is None
                         else "give the key that signed this mirror's packages and database")
    if re.search(r"failed retrieving file|failed to synchronize|could not resolve|Could not connect", stderr):
        return UserError(f"the mirror {spec.mirror} did not answer", hint="check the URL and the network, "
                         "or give another --mirror")
    return None


# -- the host ------------------------------------------------------------------------------------


def check_tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        raise UserError(f"{', '.join(missing)} not found",
                        hint=f"`sudo apt-get install {DEBIAN_PACKAGES}` (or run ./setup.sh)")


def check_mirror(spec: Install, timeout: float = 20) -> None:
    """Each repository's database is there: else one line naming the mirror, before anything is made."""
    for repo in spec.repos:
        url = f"{spec.server(repo)}/{repo}.db"
        why = None
        if url.startswith("file://"):
            if not Path(url.removeprefix("file://")).is_file():
                why = f"no {url.removeprefix('file://')}"
        else:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                    pass
            except (urllib.error.URLError, OSError, ValueError) as e:
                why = str(getattr(e, "reason", e))
        if why:
            raise UserError(f"the mirror {spec.mirror} is not reachable ({repo}.db: {why})",
                            hint="check the URL (a pacman Server line: $repo and $arch are filled in) and the "
                            "network, or give another --mirror")


def rootless_problem(uid: int) -> UserError | None:
    """debian-install's checks of user namespaces and sub-id ranges (access.py), said for pacstrap."""
    if uid == 0:
        return None
    why_fix = access.probe("debian-install").userns_problem
    if why_fix is None:
        return None
    why, fix = why_fix
    return UserError(f"pacstrap cannot run rootless here: {why}", hint=f"{fix}, or run it as root")


@contextlib.contextmanager
def keyring(spec: Install, rootless: bool) -> Iterator[Path]:
    """A pacman.conf and the keyring it names, in a folder that goes when the block ends (pacman-key wants
    root: as a user it runs in pacstrap -N's namespace, where the folder is root's)."""
    with tempfile.TemporaryDirectory(prefix="ldt-arch-") as tmp:
        gpgdir = Path(tmp) / "gnupg"
        fpr = None
        if spec.key is not None:
            if not spec.key.is_file():
                raise UserError(f"{spec.key}: no such key file", hint="an armored public key (gpg --export -a KEYID)")
            out = run(["gpg", "--batch", "--with-colons", "--import-options", "show-only", "--import", spec.key],
                      capture=True, check=False, env={"GNUPGHOME": tmp}).stdout.decode(errors="replace")
            fpr = fingerprint_of(out)
            if fpr is None:
                raise UserError(f"{spec.key}: not a public key", hint="an armored public key (gpg --export -a KEYID)")
        mapping = userns.Mapping.ROOT_IS_USER if rootless else userns.Mapping.NONE
        try:
            for cmd in pacman_key_cmds(gpgdir, spec.key, fpr):
                run(mapping.wrap(cmd), capture=True)
            conf = Path(tmp) / "pacman.conf"
            conf.write_text(pacman_conf(spec, gpgdir))
            os.chmod(tmp, 0o755)  # pacstrap -N reads it as "root" of its namespace: it is ours already
            yield conf
        finally:
            stop_agent(gpgdir, mapping)


def stop_agent_cmd(gpgdir: Path) -> list[str]:
    """pacman-key --init starts a gpg-agent for its keyring, which would outlive us."""
    return ["gpgconf", "--homedir", os.fspath(gpgdir), "--kill", "all"]


def stop_agent(gpgdir: Path, mapping: userns.Mapping) -> None:
    if gpgdir.is_dir():
        run(mapping.wrap(stop_agent_cmd(gpgdir)), check=False, capture=True)


def mounts_below(target: Path) -> list[str]:
    """Mount points inside target (pacstrap's, if it died without its cleanup): never removed through."""
    prefix = os.fspath(target.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [f.split()[4] for f in lines if len(f.split()) > 4 and f.split()[4].startswith(prefix)]


def clear(target: Path, created: bool, mapping: userns.Mapping) -> None:
    """Remove what a failed install left: the folder if we made it, else its contents."""
    if not target.exists():
        return
    left = mounts_below(target)
    if left:
        log(f"{TOOL}: left {target} as it is: {left[0]} is still mounted there")
        return
    cmd = ["rm", "-rf", "--one-file-system", os.fspath(target)] if created else \
        ["find", os.fspath(target), "-xdev", "-mindepth", "1", "-delete"]
    run(mapping.wrap(cmd), check=False)


def pacstrap(spec: Install, target: Path, rootless: bool) -> None:
    """Run pacstrap into target (made by the caller); a failure is one line (failure())."""
    with keyring(spec, rootless) as conf:
        # its progress goes to stderr, as mmdebstrap's: stdout is the one line that says what was made
        proc = run(pacstrap_cmd(conf, target, spec.packages, rootless), check=False, stdout=sys.stderr.fileno(),
                   stderr=subprocess.PIPE)
        # -K's keyring in the tree (pacman-key --init there) started an agent too
        stop_agent(target / "etc" / "pacman.d" / "gnupg",
                   userns.Mapping.ROOT_IS_USER if rootless else userns.Mapping.NONE)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        known = failure(err, spec)
        if known:
            raise known
        sys.stderr.write(err)  # not a case we know: what pacman said, then the line
        raise UserError(f"pacstrap failed with exit status {proc.returncode}", hint="see pacman's messages above")
    sys.stderr.write("".join(t + "\n" for t in err.splitlines() if "warning" in t.lower()))


def kernel_of(target: Path) -> str:
    """The kernel the tree boots (boot/vmlinuz-NAME with boot/initramfs-NAME.img), or a UserError."""
    with_initrd = kernels_with_initrd(target, lambda k: f"initramfs-{k}.img")
    if not with_initrd:
        raise UserError(f"{target}/boot: pacstrap finished without a kernel and its initramfs",
                        hint="keep linux (and an initramfs generator, mkinitcpio) in --packages")
    return with_initrd[-1]


def arch_install(spec: Install, target: Path, uid: int | None = None, keep: bool = False) -> str:
    """Make the tree; returns its kernel name (e.g. linux). On failure nothing is left unless keep."""
    check_tools()
    check_target(target)
    uid = os.geteuid() if uid is None else uid
    problem = rootless_problem(uid)
    if problem:
        raise problem
    check_mirror(spec)
    rootless = uid != 0
    created = not target.exists()
    target.mkdir(exist_ok=True)
    mode = "pacstrap -N, rootless" if rootless else "pacstrap as root"
    try:
        with Step(f"{TOOL}: Arch Linux ({' '.join(spec.packages)}) into {target} ({mode})"):
            pacstrap(spec, target, rootless)
        return kernel_of(target)
    except BaseException:
        if not keep:
            clear(target, created, userns.Mapping.ROOT_IS_USER if rootless else userns.Mapping.NONE)
        raise


# -- a bootstrap recipe with distro = "arch" ---------------------------------------------------------


def bootstrap_tgz(b: Bootstrap, recipe_dir: Path, out: Path, hostname: str) -> None:
    """The recipe's rootfs tgz: pacstrap into a scratch tree beside `out`, then tar it through the
    same filter as every tgz (hostname, resolver), read the way it was made."""
    spec = Install(packages=b.packages, mirror=b.mirror, key=recipe_dir / b.key if b.key else None)
    tree = out.parent / "arch-tree"
    rootless = os.geteuid() != 0
    mapping = userns.Mapping.ROOT_IS_USER if rootless else userns.Mapping.NONE
    check_tools()
    problem = rootless_problem(os.geteuid())
    if problem:
        raise problem
    check_mirror(spec)
    tree.mkdir()
    try:
        with Step(f"{hostname}: pacstrap {' '.join(spec.packages)}"):
            pacstrap(spec, tree, rootless)
        if "linux" in spec.packages:
            kernel_of(tree)
        tar = mapping.wrap(["tar", "-C", os.fspath(tree), "--numeric-owner", "--xattrs", "--xattrs-include=*",
                            "--sort=name", "--exclude=./var/cache/pacman/pkg/*", "--exclude=./etc/pacman.d/gnupg/*",
                            "-cf", "-", "."])  # no package cache, no keyring with its private master key
        with spawn(tar, stdout=-1) as proc:  # -1: subprocess.PIPE
            assert proc.stdout is not None
            write_tgz(iter(lambda: proc.stdout.read(1 << 20), b""), out, Fixups(hostname), f"pacstrap {hostname}",
                      filter_tar)
            proc.wait()
            if proc.returncode != 0:
                raise UserError(f"reading the pacstrap tree failed (tar exit status {proc.returncode})")
    finally:
        clear(tree, True, mapping)


# -- the command ---------------------------------------------------------------------------------------


def help_text() -> str:
    return ("Install a bootable Arch Linux (kernel and initramfs in DIR/boot) into DIR with pacstrap; boot it with "
            "`run-dir DIR`. Needs the Debian packages " + DEBIAN_PACKAGES + ". "
            + access.Need.ROOTLESS.sentence() + " As a user it runs pacstrap -N in a user namespace (needs "
            "/etc/subuid and /etc/subgid entries); as root, pacstrap's root mode.")


def arch_install_main(argv: Sequence[str] | None) -> int:
    """arch-install DIR: a bootable Arch Linux tree in DIR, made with pacstrap (rootless when not root)."""
    ap = argparse.ArgumentParser(prog=TOOL, description=help_text())
    ap.add_argument("dir", type=Path, help="a new or empty folder")
    ap.add_argument("--packages", default=",".join(PACKAGES), metavar="PKG,…",
                    help="the packages, comma-separated (default: %(default)s)")
    ap.add_argument("--mirror", default=ARCH_MIRROR, metavar="URL",
                    help="a pacman Server line ($repo, $arch filled in; file:// works) (default: %(default)s)")
    ap.add_argument("--repos", default=",".join(REPOS), metavar="R,…", help="repositories (default: %(default)s)")
    ap.add_argument("--key", type=Path, metavar="FILE",
                    help="the armored public key that signs --mirror (default: Arch's keys, archlinux-keyring)")
    ap.add_argument("--keep", action="store_true", help="keep a half-made DIR when the install fails")
    args = ap.parse_args(argv)
    if os.geteuid() == 0:
        print(f"{TOOL}: running as root, which it does not need (any user can run it)", file=sys.stderr)
    repos = tuple(r.strip() for r in args.repos.split(",") if r.strip())
    spec = Install(packages=parse_packages(args.packages), mirror=args.mirror, repos=repos or REPOS,
                   key=args.key.absolute() if args.key else None)
    target = args.dir.absolute()
    kernel = arch_install(spec, target, keep=args.keep)
    print(f"Arch Linux in {target} (kernel {kernel}); boot it: run-dir {args.dir}")
    return 0


main = entry_point(arch_install_main)


if __name__ == "__main__":
    main()
