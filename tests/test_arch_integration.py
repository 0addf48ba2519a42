"""arch-install against a real pacman repository the tests make (tests/pacman_repo.py), as root and
rootless as a user the tests make, and trees made rootless (pacstrap -N, mmdebstrap's unshare mode)
read by run-dir as that user. One boot: the rootless arch-install tree under run-dir, as the user.

LDT_ARCH_MIRROR=URL (a pacman Server line, e.g. https://geo.mirror.pkgbuild.com/$repo/os/$arch) runs
arch-install against a real mirror too; unset, that test is skipped."""

from __future__ import annotations

import os
import pwd
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pacman_repo
import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project, on_console, require_docker

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
USER = "ldtt-arch"
TOOLS = ("pacstrap", "pacman", "repo-add", "bsdtar", "newuidmap", "unshare", "gpg")


def require_root_and_tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run ./setup.sh")
    if os.geteuid() != 0:
        pytest.skip("these tests make a user of their own: run them as root (as CI does)")


@pytest.fixture(scope="module")
def shared_tmp() -> Iterator[Path]:
    """A folder the test user can read (pytest's own is root's only); removed at the end (as root)."""
    require_root_and_tools()
    d = Path(tempfile.mkdtemp(prefix="ldtt-arch-"))
    os.chmod(d, 0o755)
    yield d
    subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


@pytest.fixture(scope="module")
def mirror(shared_tmp: Path, hello_tgz: Path) -> tuple[str, Path]:
    """The test repository: (its Server line, file://…/$repo/os/$arch, and its armored public key)."""
    return pacman_repo.build_repo(shared_tmp / "mirror", hello_tgz, shared_tmp / "gnupg")


@pytest.fixture(scope="module")
def user(shared_tmp: Path) -> Iterator[str]:
    """A non-root user with a sub-id range of its own (as useradd gives one), removed afterwards."""
    subprocess.run(["userdel", "-r", USER], capture_output=True)
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
    uid = pwd.getpwnam(USER).pw_uid
    for f in ("/etc/subuid", "/etc/subgid"):  # useradd adds one when login.defs says so; else we do
        text = Path(f).read_text() if Path(f).exists() else ""
        if not any(line.split(":")[0] == USER for line in text.splitlines()):
            subprocess.run(["usermod", "--add-subuids" if f.endswith("uid") else "--add-subgids",
                            "400000-465535", USER], check=True)
    yield USER
    subprocess.run(["pkill", "-KILL", "-u", str(uid)], capture_output=True)
    subprocess.run(["userdel", "-r", USER], capture_output=True)
    for f in ("/etc/subuid", "/etc/subgid"):
        text = Path(f).read_text()
        Path(f).write_text("".join(line for line in text.splitlines(keepends=True) if not line.startswith(USER + ":")))


def as_user(user: str, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """argv run as `user` (runuser: no password, no new terminal), with env set."""
    extra = [f"{k}={v}" for k, v in (env or {}).items()]
    return ["runuser", "-u", user, "--", "env", "HOME=/tmp", *extra, *argv]


def tool(name: str, user: str | None = None) -> list[str]:
    """A console script; as the user through Debian's python3 with this venv's packages on its path,
    since the venv's own interpreter may lie under /root, where no user can reach it."""
    if user is None:
        return [str(BIN / name)]
    system = "/usr/bin/python3"
    if subprocess.run([system, "-c", f"import sys; sys.exit(sys.version_info[:2] != {sys.version_info[:2]})"]
                      ).returncode:
        pytest.skip(f"{system} is not Python {sys.version_info[0]}.{sys.version_info[1]} like the venv's")
    path = ":".join([str(ROOT), *site.getsitepackages()])
    func = name.replace("-", "_")
    module = "arch" if name == "arch-install" else "cli"
    return ["env", f"PYTHONPATH={path}", system, "-c",
            f"import sys; sys.argv[0] = {name!r}; from pipeline.{module} import {'main' if module == 'arch' else func}"
            f" as main; main()"]


def arch_install(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    argv = [*tool("arch-install", user), *args]
    return subprocess.run(as_user(user, *argv) if user else argv, capture_output=True, text=True, timeout=900,
                          cwd="/tmp")


def test_arch_install_as_root_makes_a_tree_with_its_kernel_and_initramfs(mirror, shared_tmp):
    url, key = mirror
    tree = shared_tmp / "root-tree"
    p = arch_install(str(tree), "--mirror", url, "--key", str(key))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == f"Arch Linux in {tree} (kernel linux); boot it: run-dir {tree}\n"
    assert "running as root, which it does not need" in p.stderr
    assert (tree / "boot" / "vmlinuz-linux").stat().st_size > 1 << 20
    assert (tree / "boot" / "initramfs-linux.img").stat().st_size > 1 << 20  # the package's hook made it
    assert os.readlink(tree / "usr" / "bin" / "ls") == "/usr/bin/busybox"  # busybox's .INSTALL ran
    assert sorted(x.name.rsplit("-", 2)[0] for x in (tree / "var/lib/pacman/local").iterdir() if x.is_dir()) == [
        "base", "busybox", "filesystem", "ldt-mkinitramfs", "linux"]
    assert (tree / "etc" / "shadow").stat().st_uid == 0 and (tree / "etc" / "shadow").stat().st_mode & 0o777 == 0o600

    # check_boot on the tree as on a recipe: every mode (tgz, bios, uefi) headless to the marker, the table
    project = shared_tmp / "check-project"
    project.mkdir()
    p = subprocess.run([str(BIN / "run-dir"), "--check", "--marker", f"{pacman_repo.MARKER}: arch", str(tree)],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "LDT_ROOT": str(project)})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith("dir-root-tree ")]
    assert [(r[1], r[2]) for r in rows] == [("tgz", "pass"), ("bios", "pass"), ("uefi", "pass")], p.stdout


def test_arch_install_bad_input_is_one_line_and_leaves_nothing(mirror, shared_tmp):
    url, key = mirror
    common = ["--key", str(key)]

    def fails(tree: Path, *args: str) -> str:
        p = arch_install(str(tree), *args)
        assert p.returncode == 2, p.stderr[-3000:]
        error = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert len(error) == 1, p.stderr[-3000:]
        return error[0] + "\n" + p.stderr.split(error[0], 1)[1]

    tree = shared_tmp / "bad"
    out = fails(tree, "--mirror", url, *common, "--packages", "base,no-such-package")
    assert "no package 'no-such-package' in core, extra at " + url in out and not tree.exists()

    out = fails(tree, "--mirror", "http://127.0.0.1:9/$repo/os/$arch", *common)
    assert "the mirror http://127.0.0.1:9/$repo/os/$arch is not reachable" in out and not tree.exists()

    tree.mkdir()
    (tree / "x").write_text("")
    assert "exists and is not an empty folder" in fails(tree, "--mirror", url, *common)
    (tree / "x").unlink()

    other = shared_tmp / "other-mirror"
    shutil.copytree(Path(url.removeprefix("file://").split("/$repo")[0]), other, symlinks=True)
    pacman_repo.tamper(other)
    out = fails(tree, "--mirror", f"file://{other}/$repo/os/$arch", *common)
    assert "do not verify against the key" in out
    assert tree.is_dir() and not any(tree.iterdir())  # an empty folder given stays, emptied

    keep = shared_tmp / "kept"
    p = arch_install(str(keep), "--mirror", f"file://{other}/$repo/os/$arch", *common, "--keep")
    assert p.returncode == 2 and keep.is_dir()


def test_rootless_arch_install_boots_under_run_dir_as_the_user(mirror, shared_tmp, user):
    """pacstrap -N as a user: the tree is the user's and their sub-ids'; run-dir (as the user) reads it
    in the same user namespace and boots it to the base package's marker."""
    url, key = mirror
    home = shared_tmp / "user"
    home.mkdir()
    shutil.chown(home, user, user)
    tree = home / "arch"
    p = arch_install(str(tree), "--mirror", url, "--key", str(key), user=user)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pacstrap -N, rootless" in p.stderr
    uid = pwd.getpwnam(user).pw_uid
    assert tree.stat().st_uid == uid and (tree / "etc" / "shadow").stat().st_uid == uid  # root inside

    project = home / "project"
    project.mkdir()
    shutil.chown(project, user, user)
    argv = as_user(user, *tool("run-dir", user), "--no-net", str(tree), env={"LDT_ROOT": str(project)})
    argv = ["/usr/sbin/runuser" if Path("/usr/sbin/runuser").exists() else shutil.which("runuser"), *argv[1:]]
    seen, status = on_console(argv, home, until=pacman_repo.MARKER.encode() + b": arch")
    assert b"root image: " in seen and status == 0
    tgz = next((project / "cache" / "store" / "tgz").glob("*/rootfs.tgz"))
    with tarfile.open(tgz) as t:
        shadow = t.getmember("./etc/shadow")
    assert (shadow.uid, shadow.gid, shadow.mode) == (0, 0, 0o600)  # read the way pacstrap -N made it


def test_a_tree_mmdebstrap_made_rootless_is_read_with_its_real_owners_as_the_user(shared_tmp, user):
    """mmdebstrap --mode=unshare maps root to the first sub-id: run-dir's import reads it in that
    namespace (no boot: the booting of a debian-install tree is test_formats_integration's)."""
    home = shared_tmp / "mm"
    home.mkdir()
    shutil.chown(home, user, user)
    tree = home / "tree"
    p = subprocess.run(as_user(user, "mmdebstrap", "--mode=unshare", "--variant=extract", "--include=base-files",
                               "bookworm", str(tree), "http://deb.debian.org/debian"),
                       capture_output=True, text=True, timeout=900, cwd="/tmp")
    assert p.returncode == 0, p.stderr[-3000:]
    assert tree.stat().st_uid != pwd.getpwnam(user).pw_uid  # a sub-id's
    project = home / "project"
    project.mkdir()
    shutil.chown(project, user, user)
    code = ("import sys; from pathlib import Path; from pipeline import rootfs_import; from pipeline.project import "
            "Project; t = Path(sys.argv[1]); r = rootfs_import.adhoc_recipe(t, 'dir'); p = Project(Path(sys.argv[2]), "
            "extra=(r,)); rootfs_import.import_tree(p, t, r); print(p.store.pointer(r.name, 'rootfs.tgz').resolve())")
    python = tool("run-dir", user)[:3]  # env PYTHONPATH=… /usr/bin/python3
    p = subprocess.run(as_user(user, *python, "-c", code, str(tree), str(project)), capture_output=True,
                       text=True, timeout=600, cwd="/tmp")
    assert p.returncode == 0, p.stderr[-3000:]
    with tarfile.open(p.stdout.strip().splitlines()[-1]) as t:
        members = {m.name: m for m in t.getmembers()}
    assert (members["./etc/debian_version"].uid, members["./etc/debian_version"].gid) == (0, 0)
    assert max(max(m.uid, m.gid) for m in members.values()) < 1000  # real owners (e.g. _apt's 42), no sub-ids
    assert "./boot" in members


@pytest.mark.skipif(not os.environ.get("LDT_ARCH_MIRROR"), reason="LDT_ARCH_MIRROR (a reachable Arch mirror's "
                    "Server line, e.g. https://geo.mirror.pkgbuild.com/$repo/os/$arch) is not set")
def test_arch_install_from_a_real_mirror_boots(shared_tmp):
    tree = shared_tmp / "real"
    p = arch_install(str(tree), "--mirror", os.environ["LDT_ARCH_MIRROR"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tree / "boot" / "vmlinuz-linux").exists() and (tree / "boot" / "initramfs-linux.img").exists()
    seen, status = on_console([str(BIN / "run-dir"), "--no-net", str(tree)], shared_tmp)
    assert b"root image: " in seen and status == 0


def test_an_arch_bootstrap_recipe_builds_its_tgz_with_pacstrap(mirror, shared_tmp):
    """examples/arch-base with the test repository as its mirror, in a throwaway project: build_tgz
    runs pacstrap (no Docker) and the tree becomes the recipe's tgz; check_boot boots it in tgz mode."""
    url, key = mirror
    toml = (ROOT / "examples" / "arch-base" / "recipe.toml").read_text()
    toml = toml.replace('mirror = "https://geo.mirror.pkgbuild.com/$repo/os/$arch"', f'mirror = "{url}"')
    toml = toml.replace('# key = "mirror.asc"', 'key = "mirror.asc"')
    toml += f'marker = "{pacman_repo.MARKER}: arch"\n'
    project = make_project(shared_tmp / "bootstrap-project",
                           {"arch-base": {"recipe.toml": toml, "mirror.asc": key.read_text()}}, seed_store=False)
    try:
        doit("build_tgz:arch-base", cwd=project)
        with tarfile.open(project / "cache" / "recipes" / "arch-base" / "rootfs.tgz") as t:
            names = set(t.getnames())
            hostname = t.extractfile(next(n for n in ("./etc/hostname", "etc/hostname") if n in names)).read()
    finally:  # (nothing imports a bootstrap tgz into the engine until a FROM needs it; tidy anyway)
        subprocess.run("docker images --format '{{.Repository}}:{{.Tag}}' ldt/arch-base | xargs -r docker rmi",
                       shell=True, capture_output=True)
    assert {"./boot/vmlinuz-linux", "./boot/initramfs-linux.img", "./usr/bin/busybox"} <= names
    assert not any(n.startswith("./var/cache/pacman/pkg/") and n.endswith(".zst") for n in names)
    assert not any(n.startswith("./etc/pacman.d/gnupg/") for n in names)  # no private key in a shared image
    assert hostname == b"arch-base\n"


def test_an_arch_dockerfile_recipe_pacstraps_into_mnt(mirror, shared_tmp):
    """examples/arch-mnt (Debian's pacman in a docker build, into /mnt, [build] rootfs = "/mnt") with the
    test repository in its build context: the tgz is the Arch tree, nothing of the builder."""
    require_docker()
    url, key = mirror
    files = {f.name: f.read_text() for f in (ROOT / "examples" / "arch-mnt").iterdir()}
    files["recipe.toml"] += '\n[build.args]\nMIRROR = "file:///ldt-recipe/mirror/$repo/os/$arch"\n'
    files["mirror.asc"] = key.read_text()
    project = make_project(shared_tmp / "mnt-project", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML},
                                                        "arch-mnt": files})
    shutil.copytree(Path(url.removeprefix("file://").split("/$repo")[0]), project / "recipes" / "arch-mnt" / "mirror",
                    symlinks=True)
    try:
        doit("build_tgz:arch-mnt", cwd=project)
        with tarfile.open(project / "cache" / "recipes" / "arch-mnt" / "rootfs.tgz") as t:
            names = set(t.getnames())
    finally:
        subprocess.run("docker images --format '{{.Repository}}:{{.Tag}}' ldt/arch-mnt | xargs -r docker rmi",
                       shell=True, capture_output=True)
    assert {"./boot/vmlinuz-linux", "./boot/initramfs-linux.img", "./usr/bin/busybox", "./usr/bin/init"} <= names
    assert not any(n.startswith(("./ldt-recipe", "./mnt/")) for n in names)  # the builder stayed out
    assert "./usr/bin/pacman" not in names and "./usr/bin/apt-get" not in names
