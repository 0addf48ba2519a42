"""Recipes: discover recipes/<name>/, parse recipe.toml, find FROM edges between recipes.

A recipe is a folder holding a Dockerfile or a Containerfile (the same format; the folder
is the build context) or a recipe.toml with a [bootstrap] table (an mmdebstrap base image,
no Docker needed).
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.app import AppSettings
from pipeline.console import CheckSettings
from pipeline.errors import UserError

IMAGE_REPO = "ldt"  # recipe images are tagged ldt/<name>:latest
DEFAULT_RECIPE = "hello"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


DISTROS = ("debian", "arch")  # [bootstrap] distro: mmdebstrap, or pacstrap (pipeline/arch.py)
ARCH_MIRROR = "https://geo.mirror.pkgbuild.com/$repo/os/$arch"


@dataclass(frozen=True)
class Bootstrap:
    """Settings of a bootstrap recipe: mmdebstrap's (Debian), or pacstrap's (distro = "arch": packages
    are the whole set, default base and linux; mirror a pacman Server line; key an armored public
    key file in the recipe folder that signs that mirror, instead of the Arch keyring)."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    mirror: str = "http://deb.debian.org/debian"
    distro: str = "debian"
    key: str | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    dir: Path
    build_args: tuple[tuple[str, str], ...] = ()
    platform: str = "linux/amd64"
    bootstrap: Bootstrap | None = None
    # Settings of the later stages (kernel, disk, boot check, VM).
    kernel: str | None = None  # kernel version to boot; default: the newest in /boot
    initrd: bool = True  # False: the recipe boots without an initrd
    cmdline: str = ""  # extra kernel command line
    headroom_mib: int = 256  # free space added to the root filesystem
    size_mib: int | None = None  # fixed root filesystem size instead of content + headroom
    qcow2: bool = False  # also convert the disk images to qcow2
    memory: str = "1G"
    cpus: int = 2
    boot_marker: str | None = None  # regex on the serial console; None: a login prompt
    bootable: bool = True  # False: no boot stages (e.g. a base image without a kernel)
    check: bool = True  # False: not in the boot matrix (an image with no login prompt, like virt's)
    boot_timeout: int = 600
    http: str | None = None  # boot check: an HTTP answer at this path on the app's first EXPOSEd port
    kernel_from: str | None = None  # the recipe whose kernel boots this one; None: own, else `virt`'s
    secure_boot: bool = False  # [boot] secure_boot: the UKI signed with your db key, booted under Secure Boot
    verity: bool = False  # [disk] verity: a read-only root checked by dm-verity, its root hash in the UKI
    checks: CheckSettings = CheckSettings()  # [check]: commands run inside each booted mode
    app: AppSettings = AppSettings()  # [app]: the image's ENTRYPOINT/CMD as the VM's job, or not
    parents: tuple[str, ...] = field(default=(), compare=False)  # recipes this one builds FROM
    build_file: str = "Dockerfile"  # or "Containerfile": whichever the folder holds (BUILD_FILES)
    rootfs: str | None = None  # [build] rootfs: the image's folder that is the root filesystem (e.g. "/mnt")

    @property
    def dockerfile(self) -> Path:
        return self.dir / self.build_file

    @property
    def toml(self) -> Path:
        return self.dir / "recipe.toml"

    @property
    def image(self) -> str:
        return image_name(self.name)

    def settings(self) -> dict[str, Any]:
        """Every setting, as plain data (goes into cache keys and doit's uptodate digests)."""
        return {
            "build_args": dict(self.build_args),
            "platform": self.platform,
            "rootfs": self.rootfs,
            "bootstrap": None if self.bootstrap is None else {
                "suite": self.bootstrap.suite,
                "variant": self.bootstrap.variant,
                "packages": list(self.bootstrap.packages),
                "mirror": self.bootstrap.mirror,
                # only an Arch recipe says its distro: a Debian bootstrap's settings (and key) stay as they were
                **({"distro": self.bootstrap.distro, "key": self.bootstrap.key}
                   if self.bootstrap.distro != "debian" else {}),
            },
            "kernel": self.kernel,
            "initrd": self.initrd,
            "cmdline": self.cmdline,
            "headroom_mib": self.headroom_mib,
            "size_mib": self.size_mib,
            "qcow2": self.qcow2,
            "memory": self.memory,
            "cpus": self.cpus,
            "boot_marker": self.boot_marker,
            "bootable": self.bootable,
            "check": self.check,
            "boot_timeout": self.boot_timeout,
            "http": self.http,
            "kernel_from": self.kernel_from,
            "secure_boot": self.secure_boot,
            "verity": self.verity,
            "checks": self.checks.settings(),
            "app": {"enabled": self.app.enabled, "argv": None if self.app.argv is None else list(self.app.argv),
                    "env": dict(self.app.env)},
        }


def image_name(recipe: str) -> str:
    return f"{IMAGE_REPO}/{recipe}"


# recipe.toml schema: table -> key -> (type, Recipe field or None for nested handling)
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "build": {"args": dict, "platform": str, "rootfs": str},
    "bootstrap": {"suite": str, "variant": str, "packages": list, "mirror": str, "distro": str, "key": str},
    "boot": {"bootable": bool, "check": bool, "kernel": str, "initrd": bool, "cmdline": str, "marker": str,
             "timeout": int, "http": str, "kernel_from": str, "secure_boot": bool},
    "disk": {"headroom_mib": int, "size_mib": int, "qcow2": bool, "verity": bool},
    "vm": {"memory": str, "cpus": int},
    "app": AppSettings.SCHEMA,
    "check": CheckSettings.SCHEMA,
}
PLATFORMS = ("linux/amd64",)
VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd", "important",
            "debootstrap", "standard")


def _line_of(text: str, table: str | None, key: str | None) -> int:
    """Best-effort line number of `key` in `[table]` (or of the table header)."""
    lines = text.splitlines()
    current = None
    header_line = 1
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        m = re.match(r"^\[\s*([^\]]+?)\s*\]", stripped)
        if m:
            current = m.group(1)
            if table is None and key is not None and (current == key or current.startswith(key + ".")):
                return i
            if current == table:
                header_line = i
                if key is None:
                    return i
            continue
        if current == table and key is not None and re.match(rf"^\"?{re.escape(key)}\"?\s*=", stripped):
            return i
        if table is None and current is None and key and re.match(rf"^{re.escape(key)}\s*[=.]", stripped):
            return i
    return header_line


def _err(path: Path, text: str, table: str | None, key: str | None, message: str, hint: str) -> UserError:
    return UserError(f"{path}:{_line_of(text, table, key)}: {message}", hint=hint)


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "an array"}
    return names.get(t, str(t)) if isinstance(t, type) else " or ".join(names[x] for x in t)


def parse_toml(path: Path) -> dict[str, dict[str, Any]]:
    """Read and validate recipe.toml: unknown tables/keys and wrong types name file, key and line."""
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: {e}", hint="see https://toml.io for the syntax") from e
    for table, value in data.items():
        if table not in SCHEMA:
            raise _err(path, text, None, table, f"unknown table [{table}]",
                       f"known tables: {', '.join(f'[{t}]' for t in SCHEMA)}")
        if not isinstance(value, dict):
            raise _err(path, text, None, table, f"'{table}' must be a table", f"write [{table}] on its own line")
        for key, v in value.items():
            expected = SCHEMA[table].get(key)
            if expected is None:
                raise _err(path, text, table, key, f"unknown key '{key}' in [{table}]",
                           f"known keys in [{table}]: {', '.join(SCHEMA[table])}")
            # bool is a subclass of int: keep them apart
            if not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
                raise _err(path, text, table, key,
                           f"[{table}] {key} must be {_type_name(expected)}, not {type(v).__name__}",
                           f"e.g. {key} = {_example(expected)}")
    build = data.get("build", {})
    for k, v in build.get("args", {}).items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise _err(path, text, "build", "args", f"build arg '{k}' must be a string",
                       f'write args = {{ {k} = "value" }}')
    if build.get("platform", "linux/amd64") not in PLATFORMS:
        raise _err(path, text, "build", "platform", f"unsupported platform '{build['platform']}'",
                   f"supported: {', '.join(PLATFORMS)}")
    rootfs = build.get("rootfs")
    if rootfs is not None and not valid_rootfs(rootfs):
        raise _err(path, text, "build", "rootfs", f"rootfs '{rootfs}' is not an absolute folder path",
                   'the folder of the built image that holds the root filesystem, e.g. rootfs = "/mnt"')
    boot = data.get("bootstrap", {})
    if any(not isinstance(p, str) for p in boot.get("packages", [])):
        raise _err(path, text, "bootstrap", "packages", "packages must be an array of strings",
                   'e.g. packages = ["systemd-sysv"]')
    if boot.get("distro", "debian") not in DISTROS:
        raise _err(path, text, "bootstrap", "distro", f"unknown distro '{boot['distro']}'",
                   f"one of: {', '.join(DISTROS)}")
    if boot.get("distro", "debian") == "arch":
        for k in ("suite", "variant"):
            if k in boot:
                raise _err(path, text, "bootstrap", k, f"{k} is mmdebstrap's: an Arch bootstrap has none",
                           'remove it (Arch is rolling; packages = ["base", "linux"] chooses what goes in)')
    elif "key" in boot:
        raise _err(path, text, "bootstrap", "key", "key is for an Arch mirror (pacman-key)",
                   "remove it: mmdebstrap checks Debian's mirror with the debian-archive-keyring")
    key = boot.get("key")
    if key is not None and (key.startswith("/") or ".." in key.split("/") or not (path.parent / key).is_file()):
        raise _err(path, text, "bootstrap", "key", f"key '{key}' is not a file in the recipe's folder",
                   'an armored public key beside recipe.toml, e.g. key = "mirror.asc"')
    if boot.get("variant", "minbase") not in VARIANTS:
        raise _err(path, text, "bootstrap", "variant", f"unknown mmdebstrap variant '{boot['variant']}'",
                   f"one of: {', '.join(VARIANTS)}")
    for table, key in (("vm", "cpus"), ("disk", "headroom_mib"), ("disk", "size_mib"), ("boot", "timeout")):
        v = data.get(table, {}).get(key)
        if v is not None and v <= 0:
            raise _err(path, text, table, key, f"[{table}] {key} must be positive", f"e.g. {key} = 2")
    mem = data.get("vm", {}).get("memory")
    if mem is not None and not re.fullmatch(r"\d+[MG]?", mem):
        raise _err(path, text, "vm", "memory", f"memory '{mem}' is not a size", 'e.g. memory = "2G"')
    marker = data.get("boot", {}).get("marker")
    if marker is not None:
        try:
            re.compile(marker)
        except re.error as e:
            raise _err(path, text, "boot", "marker", f"marker is not a regular expression: {e}",
                       "escape special characters, e.g. 'Welcome to Debian'") from e
    http = data.get("boot", {}).get("http")
    if http is not None and not http.startswith("/"):
        raise _err(path, text, "boot", "http", f"http '{http}' is not a path", 'e.g. http = "/"')
    kernel_from = data.get("boot", {}).get("kernel_from")
    if kernel_from is not None and not NAME_RE.match(kernel_from):
        raise _err(path, text, "boot", "kernel_from", f"kernel_from '{kernel_from}' is not a recipe name",
                   'e.g. kernel_from = "virt"')
    if data.get("boot", {}).get("secure_boot") and data.get("boot", {}).get("bootable") is False:
        raise _err(path, text, "boot", "secure_boot",
                   "secure_boot signs the UEFI disk: a recipe that does not boot has none",
                   "remove secure_boot, or set bootable = true")
    check = data.get("check", {})
    if check and data.get("boot", {}).get("check") is False:
        raise _err(path, text, "check", None,
                   "[check] runs commands in the boot check, which [boot] check = false turns off",
                   "remove [check], or the line check = false")
    if data.get("disk", {}).get("verity") and data.get("boot", {}).get("bootable") is False:
        raise _err(path, text, "disk", "verity", "verity protects a booted root: a recipe that does not boot has none",
                   "remove verity, or set bootable = true")
    AppSettings.from_table(  # validated here, with file and line; load() makes the value
        data.get("app", {}),
        lambda key, message, hint: _err(path, text, "app", key, f"[app] {key}: {message}", f"e.g. {hint}"))
    CheckSettings.from_table(
        check, lambda key, message, hint: _err(path, text, "check", key, f"[check] {key}: {message}", f"e.g. {hint}"))
    return data


def valid_rootfs(value: str) -> bool:
    """An absolute, normalised path other than / itself (leave the key out for the whole image)."""
    return (value.startswith("/") and not value.startswith("//") and value != "/"
            and posixpath.normpath(value) == value and "\0" not in value)


BUILD_FILES = ("Dockerfile", "Containerfile")  # a Containerfile is a Dockerfile by another name


def build_file(recipe_dir: Path) -> Path | None:
    """The folder's Dockerfile or Containerfile (None: neither); both is an error naming both."""
    found = [recipe_dir / n for n in BUILD_FILES if (recipe_dir / n).is_file()]
    if len(found) > 1:
        raise UserError(f"{recipe_dir}: has both a {found[0].name} and a {found[1].name}",
                        hint="they are the same format: keep one of them")
    return found[0] if found else None


def _example(t: type | tuple[type, ...]) -> str:
    return {str: '"value"', int: "2", bool: "true", dict: '{ KEY = "value" }', list: '["a", "b"]'}.get(
        t if isinstance(t, type) else t[0], "…")


FROM_RE = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE | re.MULTILINE)
ARG_RE = re.compile(r"^\s*ARG\s+(\w+)(?:=(\S*))?", re.IGNORECASE | re.MULTILINE)


def from_images(dockerfile_text: str, build_args: dict[str, str] | None = None) -> list[str]:
    """The images a Dockerfile builds FROM (stage names of multi-stage builds left out)."""
    args = {m.group(1): _unquote(m.group(2) or "") for m in ARG_RE.finditer(dockerfile_text)}
    args.update(build_args or {})
    stages: set[str] = set()
    images = []
    for m in FROM_RE.finditer(dockerfile_text):
        ref = re.sub(r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), ""), m.group(1))
        if ref.lower() not in stages and ref != "scratch":
            images.append(ref)
        if m.group(2):
            stages.add(m.group(2).lower())
    return images


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def recipe_of_image(ref: str) -> str | None:
    """'ldt/hello' or 'ldt/hello:latest' -> 'hello'; other images -> None."""
    repo, _, tag = ref.partition(":")
    if "@" in repo or not repo.startswith(IMAGE_REPO + "/") or tag not in ("", "latest"):
        return None
    return repo[len(IMAGE_REPO) + 1:]


def load(recipe_dir: Path) -> Recipe:
    name = recipe_dir.name
    if not NAME_RE.match(name):
        raise UserError(f"{recipe_dir}: recipe name '{name}' is not a valid image name",
                        hint="use lowercase letters, digits, '.', '_' and '-'")
    data = parse_toml(recipe_dir / "recipe.toml") if (recipe_dir / "recipe.toml").exists() else {}
    app = AppSettings.from_table(data.get("app", {}))
    dockerfile = build_file(recipe_dir)
    bootstrap = None
    if "bootstrap" in data:
        if dockerfile is not None:
            raise UserError(f"{recipe_dir}: has both a {dockerfile.name} and a [bootstrap] table",
                            hint=f"a bootstrap recipe has no {dockerfile.name}; remove one of them")
        b = data["bootstrap"]
        distro = b.get("distro", Bootstrap.distro)
        arch = distro == "arch"
        bootstrap = Bootstrap(
            suite=b.get("suite", Bootstrap.suite), variant=b.get("variant", Bootstrap.variant),
            packages=tuple(b.get("packages", ("base", "linux") if arch else ())),
            mirror=b.get("mirror", ARCH_MIRROR if arch else Bootstrap.mirror), distro=distro, key=b.get("key"))
        if "rootfs" in data.get("build", {}):
            raise UserError(f"{recipe_dir / 'recipe.toml'}: [build] rootfs needs a Dockerfile, not a [bootstrap] table",
                            hint="mmdebstrap's tree is the root filesystem already: remove rootfs")
    elif dockerfile is None:
        raise UserError(f"{recipe_dir}: no Dockerfile and no [bootstrap] table in recipe.toml",
                        hint="add a Dockerfile or Containerfile (FROM ldt/debian-bookworm) or remove the folder")
    build, boot, disk, vm, check = (data.get(t, {}) for t in ("build", "boot", "disk", "vm", "check"))
    args = tuple(sorted((k, str(v)) for k, v in build.get("args", {}).items()))
    parents: tuple[str, ...] = ()
    if dockerfile is not None:
        refs = from_images(dockerfile.read_text(), dict(args))
        parents = tuple(dict.fromkeys(p for p in map(recipe_of_image, refs) if p))
    return Recipe(
        name=name, dir=recipe_dir, build_args=args, platform=build.get("platform", "linux/amd64"),
        bootstrap=bootstrap, kernel=boot.get("kernel"), initrd=boot.get("initrd", True),
        cmdline=boot.get("cmdline", ""), boot_marker=boot.get("marker", Recipe.boot_marker),
        boot_timeout=boot.get("timeout", Recipe.boot_timeout),
        headroom_mib=disk.get("headroom_mib", Recipe.headroom_mib), size_mib=disk.get("size_mib"),
        qcow2=disk.get("qcow2", False), memory=vm.get("memory", Recipe.memory), cpus=vm.get("cpus", Recipe.cpus),
        parents=parents, build_file=dockerfile.name if dockerfile else "Dockerfile", rootfs=build.get("rootfs"),
        bootable=boot.get("bootable", _default_bootable(bootstrap)), check=boot.get("check", True),
        http=boot.get("http"), kernel_from=boot.get("kernel_from"), secure_boot=boot.get("secure_boot", False),
        verity=disk.get("verity", False), app=app,
        checks=CheckSettings.from_table(check),
    )


def _default_bootable(bootstrap: Bootstrap | None) -> bool:
    """Dockerfile recipes boot; a bootstrap recipe only when it installs a kernel."""
    if bootstrap is not None and bootstrap.distro == "arch":
        return any(p == "linux" or p.startswith("linux-") for p in bootstrap.packages)
    return bootstrap is None or any(p.startswith("linux-image") for p in bootstrap.packages)


def discover(recipes_dir: Path) -> dict[str, Recipe]:
    """All recipes, validated: every FROM ldt/<x> names a recipe, and there is no cycle."""
    if not recipes_dir.is_dir():
        return {}
    found = {d.name: load(d) for d in sorted(recipes_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    for r in found.values():
        for p in r.parents:
            if p not in found:
                raise UserError(f"{r.dockerfile}: FROM {image_name(p)} names no recipe",
                                hint=f"known recipes: {', '.join(found) or '(none)'}; "
                                     f"add recipes/{p}/ or fix the FROM line")
        if r.kernel_from is not None and r.kernel_from != r.name and not (
                r.kernel_from in found and found[r.kernel_from].bootable):
            text = r.toml.read_text()
            bootable = [n for n, x in found.items() if x.bootable and n != r.name]
            raise _err(r.toml, text, "boot", "kernel_from", f"kernel_from '{r.kernel_from}' names no bootable recipe",
                       f"bootable recipes: {', '.join(bootable) or '(none)'}")
    order(found)  # raises on a cycle
    return found


def order(recipes: dict[str, Recipe]) -> list[str]:
    """Recipe names, parents before children; a FROM cycle is an error."""
    done: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join(path[path.index(name):] + [name])
            raise UserError(f"FROM cycle between recipes: {cycle}", hint="a recipe cannot build FROM itself")
        state[name] = "visiting"
        for p in recipes[name].parents:
            visit(p, path + [name])
        state[name] = "done"
        done.append(name)

    for n in sorted(recipes):
        visit(n, [])
    return done


def ancestors(recipes: dict[str, Recipe], name: str) -> list[str]:
    seen: list[str] = []
    stack = list(recipes[name].parents)
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.append(p)
            stack.extend(recipes[p].parents)
    return seen


def get(recipes: dict[str, Recipe], name: str) -> Recipe:
    if name not in recipes:
        raise UserError(f"unknown recipe '{name}'", hint=f"known recipes: {', '.join(sorted(recipes)) or '(none)'}")
    return recipes[name]
