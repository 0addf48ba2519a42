"""A real pacman repository for the tests, made here: no Arch mirror is reachable from these machines.

Packages are .pkg.tar.zst archives as makepkg writes them (.PKGINFO, .MTREE, optional .INSTALL, then
the files, owned by root), each signed with a GPG key the tests make, in a database made by
repo-add (signed too). Two repositories laid out as a mirror ($repo/os/x86_64/), core and extra as
Arch has them (so arch-install's defaults work against it), hold enough for a tree that boots under
run-dir:

- filesystem: the folder skeleton (/bin, /lib, /sbin as links into /usr), passwd, group, shadow,
  os-release (ID=arch);
- busybox (in extra, as in Arch): Debian's busybox-static binary; its .INSTALL scriptlet (run by pacman in the new root)
  installs the applet links;
- base: depends on both; /usr/bin/init, a script that prints MARKER and waits;
- linux: the Debian kernel and the modules a virtio VM needs, laid out as Arch's (the kernel in
  /usr/lib/modules/<version>/vmlinuz with a pkgbase file), depending on the virtual package
  "initramfs";
- ldt-mkinitramfs (provides initramfs): an alpm hook on usr/lib/modules/*/vmlinuz, as mkinitcpio's,
  which copies the kernel to /boot/vmlinuz-linux and builds /boot/initramfs-linux.img with the tree's
  own busybox (cpio): our app initrd's /init (pipeline/guest/app-initrd.sh), busybox and the modules.

The kernel and modules come from the hello recipe's rootfs tgz (the Debian kernel every test boots).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import initramfs

MARKER = "LDT-ARCH-BOOTED"  # what pacman_repo_files/init.sh prints
REPO = "core"
EXTRA = ("busybox",)  # the packages in the extra repository
ARCH = "x86_64"
GUEST = Path(__file__).resolve().parent.parent / "pipeline" / "guest"
FILES = Path(__file__).resolve().parent / "pacman_repo_files"  # the packages' scripts (shellcheck-clean)



HOOK = """[Trigger]
Type = Path
Operation = Install
Operation = Upgrade
Target = usr/lib/modules/*/vmlinuz

[Action]
Description = Building the initramfs (ldt-mkinitramfs)...
When = PostTransaction
Exec = /usr/bin/ldt-mkinitramfs
NeedsTargets
"""


@dataclass
class Package:
    name: str
    files: dict[str, bytes | str] = field(default_factory=dict)  # path -> content; str: a symlink target
    modes: dict[str, int] = field(default_factory=dict)  # path -> mode (default 0644, dirs 0755)
    dirs: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    install: str | None = None  # .INSTALL scriptlet
    version: str = "1-1"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{ARCH}.pkg.tar.zst"

    def pkginfo(self, size: int) -> str:
        lines = [f"pkgname = {self.name}", f"pkgbase = {self.name}", f"pkgver = {self.version}",
                 f"pkgdesc = {self.name} of the LDT test repository", "url = https://example.invalid",
                 f"builddate = {int(time.time())}", "packager = LDT tests <tests@ldt.invalid>", f"size = {size}",
                 f"arch = {ARCH}", "license = MIT"]
        lines += [f"depend = {d}" for d in self.depends] + [f"provides = {p}" for p in self.provides]
        return "\n".join(lines) + "\n"


def build_package(pkg: Package, work: Path, out: Path) -> Path:
    """The package as makepkg makes it: the tree, .PKGINFO, .INSTALL, .MTREE (bsdtar), then the archive."""
    root = work / pkg.name
    root.mkdir(parents=True)
    for d in pkg.dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, pkg.modes.get(d, 0o755))
    size = 0
    for path, content in pkg.files.items():
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.symlink_to(content)
        else:
            p.write_bytes(content)
            os.chmod(p, pkg.modes.get(path, 0o644))
            size += len(content)
    (root / ".PKGINFO").write_text(pkg.pkginfo(size))
    meta = [".PKGINFO"]
    if pkg.install:
        (root / ".INSTALL").write_text(pkg.install)
        meta.append(".INSTALL")
    top = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    owner = ["--uid", "0", "--gid", "0", "--uname", "root", "--gname", "root"]
    env = {**os.environ, "LANG": "C"}
    subprocess.run(["bsdtar", "-czf", ".MTREE", "--format=mtree", *owner,
                    "--options=!all,use-set,type,uid,gid,mode,time,size,md5,sha256,link", *meta, *top],
                   cwd=root, check=True, env=env)
    target = out / pkg.filename
    subprocess.run(["bsdtar", "-cf", str(target), "--zstd", *owner, ".MTREE", *meta, *top],
                   cwd=root, check=True, env=env)
    return target


# -- the test key ---------------------------------------------------------------------------------


def make_key(home: Path, name: str = "LDT test repository") -> tuple[str, Path]:
    """A signing key in a new GNUPGHOME; returns its fingerprint and its armored public key file."""
    home.mkdir(mode=0o700, parents=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"{name} <tests@ldt.invalid>",
                    "ed25519", "sign", "never"], check=True, env=env, capture_output=True)
    out = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], check=True, env=env,
                         capture_output=True, text=True).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))
    public = home.parent / f"{home.name}.asc"
    public.write_bytes(subprocess.run(["gpg", "--batch", "--export", "--armor", fpr], check=True, env=env,
                                      capture_output=True).stdout)
    return fpr, public


# -- the packages ----------------------------------------------------------------------------------


def _modules_rel(name: str) -> str | None:
    """'usr/lib/modules/V/kernel/x.ko' -> 'kernel/x.ko' (None outside a modules folder)."""
    if not name.startswith(("usr/lib/modules/", "lib/modules/")):
        return None
    parts = name.split("/modules/", 1)[1].split("/", 1)
    return parts[1] if len(parts) == 2 else None


def kernel_files(rootfs_tgz: Path) -> tuple[str, bytes, dict[str, bytes]]:
    """(version, vmlinuz, {path under /usr/lib/modules/<version>/: bytes}) with the modules a virtio VM
    loads and modules.dep, from a Debian rootfs tgz (two passes over the stream); "ldt-order" is the
    load order."""
    version, vmlinuz, meta = None, b"", {}
    with tarfile.open(rootfs_tgz, "r|gz") as t:
        for ti in t:
            name = ti.name.removeprefix("./")
            if name.startswith("boot/vmlinuz-") and ti.isfile():
                version, vmlinuz = name.removeprefix("boot/vmlinuz-"), t.extractfile(ti).read()
            elif ti.isfile() and _modules_rel(name) in ("modules.dep", "modules.softdep", "modules.alias"):
                meta[_modules_rel(name)] = t.extractfile(ti).read().decode()
    assert version and vmlinuz and "modules.dep" in meta, f"{rootfs_tgz}: no kernel"
    order = initramfs.module_load_order(meta["modules.dep"], meta.get("modules.softdep", ""),
                                        meta.get("modules.alias", ""), initramfs.APP_INITRD_MODULES)
    files: dict[str, bytes] = {}
    with tarfile.open(rootfs_tgz, "r|gz") as t:
        for ti in t:
            rel = _modules_rel(ti.name.removeprefix("./"))
            if ti.isfile() and rel in order:
                files[rel] = t.extractfile(ti).read()
    missing = [rel for rel in order if rel not in files]
    assert not missing, f"modules the VM needs not in the tgz: {missing}"
    files["modules.dep"] = meta["modules.dep"].encode()
    files["ldt-order"] = "".join(f"{rel}\n" for rel in order).encode()
    return version, vmlinuz, files


def packages(rootfs_tgz: Path) -> list[Package]:
    version, vmlinuz, modules = kernel_files(rootfs_tgz)
    order = modules.pop("ldt-order")
    busybox = Path("/bin/busybox").read_bytes()
    mods = f"usr/lib/modules/{version}"
    linux = Package("linux", depends=("initramfs",), files={
        f"{mods}/vmlinuz": vmlinuz, f"{mods}/pkgbase": b"linux\n",
        **{f"{mods}/{rel}": data for rel, data in modules.items()}})
    mkinitramfs = Package("ldt-mkinitramfs", provides=("initramfs",), depends=("busybox",), files={
        "usr/bin/ldt-mkinitramfs": (FILES / "ldt-mkinitramfs.sh").read_bytes(),
        "usr/share/libalpm/hooks/90-ldt-mkinitramfs.hook": HOOK.encode(),
        "usr/lib/ldt-mkinitramfs/init": (GUEST / "app-initrd.sh").read_bytes(),
        "usr/lib/ldt-mkinitramfs/modules": order,
        "usr/lib/ldt-mkinitramfs/console.cpio": initramfs.make_cpio({}, char_devices={"dev/console": (5, 1)}),
    }, modes={"usr/bin/ldt-mkinitramfs": 0o755, "usr/lib/ldt-mkinitramfs/init": 0o755})
    filesystem = Package(
        "filesystem",
        dirs=("usr/bin", "usr/lib", "etc", "dev", "proc", "sys", "run", "tmp", "root", "boot", "var/lib", "home",
              "mnt"),
        modes={"root": 0o700, "tmp": 0o1777, "proc": 0o555, "sys": 0o555, "etc/shadow": 0o600},
        files={"bin": "usr/bin", "sbin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib", "usr/sbin": "bin",
               "etc/passwd": b"root:x:0:0::/root:/bin/sh\nbin:x:1:1::/:/usr/bin/nologin\n",
               "etc/group": b"root:x:0:root\nbin:x:1:root,bin\n",
               "etc/hostname": b"archlinux\n",
               "etc/shadow": b"root::14871::::::\nbin:!*:19000::::::\n",
               "etc/os-release": b'NAME="Arch Linux"\nPRETTY_NAME="Arch Linux (LDT test repository)"\nID=arch\n'})
    busybox_pkg = Package("busybox", depends=("filesystem",), files={"usr/bin/busybox": busybox,
                                                                    "usr/bin/sh": "busybox"},
                          modes={"usr/bin/busybox": 0o755},
                          install="post_install() {\n  /usr/bin/busybox --install -s /usr/bin\n}\n")
    base = Package("base", depends=("filesystem", "busybox"), files={"usr/bin/init": (FILES / "init.sh").read_bytes()},
                   modes={"usr/bin/init": 0o755})
    return [filesystem, busybox_pkg, base, mkinitramfs, linux]


def build_repo(dest: Path, rootfs_tgz: Path, gnupg: Path) -> tuple[str, Path]:
    """The mirror at dest (dest/core/os/x86_64/: packages, their .sig, core.db), signed with a new key;
    returns the mirror's Server line (file://) and the armored public key."""
    fpr, public = make_key(gnupg)
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    work = dest.parent / f"{dest.name}-work"
    pkgs = packages(rootfs_tgz)
    for repo in (REPO, "extra"):
        out = dest / repo / "os" / ARCH
        out.mkdir(parents=True)
        built = [build_package(p, work, out) for p in pkgs if (p.name in EXTRA) == (repo == "extra")]
        for f in built:
            subprocess.run(["gpg", "--batch", "-u", fpr, "--detach-sign", "--no-armor", str(f)], check=True,
                           env=env, capture_output=True)
        subprocess.run(["repo-add", "-q", "-s", "-k", fpr, str(out / f"{repo}.db.tar.gz"), *map(str, built)],
                       check=True, env=env, capture_output=True)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    stop_agent(gnupg)
    return f"file://{dest}/$repo/os/$arch", public


def stop_agent(home: Path) -> None:
    """The gpg-agent that key generation and signing started for this GNUPGHOME."""
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def tamper(mirror_dir: Path) -> None:
    """Re-sign core.db with another key: the database no longer verifies against the repository's key."""
    out = mirror_dir / REPO / "os" / ARCH
    home = mirror_dir.parent / "other-gnupg"
    fpr, _ = make_key(home, "Someone else")
    db = out / f"{REPO}.db.tar.gz"
    for sig in (out / f"{REPO}.db.sig", out / f"{REPO}.db.tar.gz.sig"):
        sig.unlink(missing_ok=True)
    subprocess.run(["gpg", "--batch", "-u", fpr, "--detach-sign", "--no-armor", str(db)], check=True,
                   env={**os.environ, "GNUPGHOME": str(home)}, capture_output=True)
    (out / f"{REPO}.db.sig").symlink_to(f"{REPO}.db.tar.gz.sig")
    stop_agent(home)


def listing(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.getnames()
