"""arch-install and userns.py without running pacstrap: the command lines, pacman.conf, the one-line
errors, and how a tree made rootless is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import arch, userns
from pipeline.arch import Install
from pipeline.errors import UserError
from pipeline.recipes import ARCH_MIRROR
from pipeline.userns import Mapping, Range


def test_pacstrap_as_root_and_as_a_user():
    assert arch.pacstrap_cmd(Path("/t/pacman.conf"), Path("/srv/arch"), ("base", "linux"), rootless=False) == [
        "pacstrap", "-C", "/t/pacman.conf", "-K", "-M", "/srv/arch", "base", "linux"]
    assert arch.pacstrap_cmd(Path("c"), Path("d"), ("base",), rootless=True)[:2] == ["pacstrap", "-N"]


def test_pacman_conf_names_the_mirror_for_each_repository_and_checks_signatures():
    conf = arch.pacman_conf(Install(mirror="file:///m/$repo/os/$arch", repos=("core",)), Path("/k/gnupg"))
    assert "Architecture = x86_64\n" in conf and "GPGDir = /k/gnupg\n" in conf
    assert "SigLevel = Required DatabaseOptional\n" in conf
    assert "[core]\nServer = file:///m/$repo/os/$arch\n" in conf and "[extra]" not in conf
    default = arch.pacman_conf(Install(), Path("/g"))
    assert f"[core]\nServer = {ARCH_MIRROR}\n" in default and f"[extra]\nServer = {ARCH_MIRROR}\n" in default


def test_server_fills_in_repo_and_arch():
    assert Install(mirror="https://m/$repo/os/$arch").server("core") == "https://m/core/os/x86_64"


def test_keyring_is_archs_or_the_given_key():
    g = Path("/g")
    assert arch.pacman_key_cmds(g, None, None) == [
        ["pacman-key", "--gpgdir", "/g", "--init"], ["pacman-key", "--gpgdir", "/g", "--populate", "archlinux"]]
    assert arch.pacman_key_cmds(g, Path("/k.asc"), "ABCD")[1:] == [
        ["pacman-key", "--gpgdir", "/g", "--add", "/k.asc"], ["pacman-key", "--gpgdir", "/g", "--lsign-key", "ABCD"]]


def test_fingerprint_of_gpg_colons():
    text = "pub:-:255:22:AAAA:1:::-:::scESC::::::23::0:\nfpr:::::::::F00DF00D:\nsub:x\nfpr:::::::::SUBKEY:\n"
    assert arch.fingerprint_of(text) == "F00DF00D"
    assert arch.fingerprint_of("") is None


def test_parse_packages():
    assert arch.parse_packages(" base, linux,vim,base ") == ("base", "linux", "vim")
    with pytest.raises(UserError, match="'Vim;' is not an Arch package name"):
        arch.parse_packages("Vim;")
    with pytest.raises(UserError, match="no package named"):
        arch.parse_packages(" , ")


@pytest.mark.parametrize(("stderr", "says"), [
    ("error: target not found: nosuch\n", "no package 'nosuch' in core, extra at "),
    ("error: core: signature from \"X\" is invalid\nerror: failed to synchronize all databases (invalid or "
     "corrupted database (PGP signature))\n", "do not verify against the Arch keyring"),
    ("error: failed retrieving file 'core.db' from m : Could not resolve host: m\n", "did not answer"),
])
def test_pacmans_failures_become_one_line(stderr, says):
    e = arch.failure(stderr, Install())
    assert e is not None and says in e.message and e.hint


def test_an_unknown_failure_is_left_to_pacmans_words():
    assert arch.failure("error: something new\n", Install()) is None


def test_no_pacstrap_is_one_line_naming_the_debian_packages(monkeypatch):
    monkeypatch.setattr(arch.shutil, "which", lambda name: None if name == "pacstrap" else "/usr/bin/" + name)
    with pytest.raises(UserError, match="pacstrap not found") as info:
        arch.check_tools()
    assert "apt-get install arch-install-scripts pacman-package-manager archlinux-keyring" in info.value.hint


def test_a_file_mirror_without_its_database_is_unreachable(tmp_path):
    with pytest.raises(UserError, match=r"the mirror file://.* is not reachable \(core.db: no "):
        arch.check_mirror(Install(mirror=f"file://{tmp_path}/$repo/os/$arch", repos=("core",)))
    (tmp_path / "core" / "os" / "x86_64").mkdir(parents=True)
    (tmp_path / "core" / "os" / "x86_64" / "core.db").write_bytes(b"")
    arch.check_mirror(Install(mirror=f"file://{tmp_path}/$repo/os/$arch", repos=("core",)))


def test_an_http_mirror_that_does_not_answer_is_one_line():
    with pytest.raises(UserError, match=r"the mirror http://127.0.0.1:9/\$repo is not reachable"):
        arch.check_mirror(Install(mirror="http://127.0.0.1:9/$repo", repos=("core",)), timeout=5)


def test_the_target_must_be_new_or_empty(tmp_path):
    arch.check_target(tmp_path / "new")
    (tmp_path / "x").write_text("")
    with pytest.raises(UserError, match="not an empty folder"):
        arch.check_target(tmp_path)


def test_kernel_of_wants_arch_names(tmp_path):
    (tmp_path / "boot").mkdir()
    with pytest.raises(UserError, match="without a kernel and its initramfs"):
        arch.kernel_of(tmp_path)
    for name in ("vmlinuz-linux", "initramfs-linux.img", "vmlinuz-linux-lts"):
        (tmp_path / "boot" / name).write_text("")
    assert arch.kernel_of(tmp_path) == "linux"


def test_a_failed_install_removes_what_it_made(monkeypatch, tmp_path):
    monkeypatch.setattr(arch.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(arch, "check_mirror", lambda spec: None)

    def half_made(spec, target, rootless):
        (target / "etc").mkdir()
        raise UserError("the mirror m did not answer")

    monkeypatch.setattr(arch, "pacstrap", half_made)
    with pytest.raises(UserError, match="did not answer"):
        arch.arch_install(Install(), tmp_path / "new", uid=0)
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError):
        arch.arch_install(Install(), tmp_path / "kept", uid=0, keep=True)
    assert (tmp_path / "kept" / "etc").is_dir()


def test_help_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as info:
        arch.arch_install_main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: arch-install" in out and "run-dir DIR" in out and "pacstrap -N" in out
    assert "pacman-package-manager archlinux-keyring" in out


# -- userns.py -------------------------------------------------------------------------------------


def test_first_range():
    text = "bob:200000:65536\nalice:100000:65536\nalice:300000:10\n"
    assert userns.first_range(text, "alice", 1000) == Range(100000, 65536)
    assert userns.first_range("1000:5:7\n", "alice", 1000) == Range(5, 7)
    assert userns.first_range(text, "carol", 1002) is None


def test_mapping_follows_the_owner_of_the_top_folder():
    ids = Range(100000, 65536)
    assert userns.mapping_of(100000, uid=1000, subids=ids) is Mapping.ROOT_IS_SUBID  # mmdebstrap unshare
    assert userns.mapping_of(1000, uid=1000, subids=ids) is Mapping.ROOT_IS_USER  # pacstrap -N
    assert userns.mapping_of(0, uid=1000, subids=ids) is Mapping.NONE  # root's tree: read as it is
    assert userns.mapping_of(100000, uid=0, subids=ids) is Mapping.NONE  # root reads anything
    assert userns.mapping_of(1000, uid=1000, subids=None) is Mapping.NONE  # no sub-ids: as before


def test_mapping_wraps_a_reader():
    tar = ["tar", "-cf", "-", "."]
    assert Mapping.NONE.wrap(tar) == tar
    assert Mapping.ROOT_IS_SUBID.wrap(tar) == ["unshare", "--user", "--map-auto", "--setuid", "0", "--setgid", "0",
                                               *tar]
    assert Mapping.ROOT_IS_USER.wrap(tar) == ["unshare", "--user", "--map-auto", "--map-root-user", *tar]


def test_stat_manifest_parses_finds_output():
    out = b"etc\x00755\x000\x000\x004096\x001.5\x00\x00bin\x00777\x000\x000\x007\x001.0\x00usr/bin\x00"
    assert userns.parse_stat_manifest(out) == [["bin", "777", "0", "0", "7", "1.0", "usr/bin"],
                                               ["etc", "755", "0", "0", "4096", "1.5", ""]]
    assert userns.stat_manifest_cmd(Path("/t"), Mapping.NONE)[:4] == ["find", "/t", "-mindepth", "1"]


# -- [bootstrap] distro = "arch" in recipe.toml ------------------------------------------------------


def _recipe(tmp_path: Path, toml: str, **files: str):
    from pipeline import recipes

    d = tmp_path / "arch-base"
    d.mkdir(parents=True)
    (d / "recipe.toml").write_text(toml)
    for name, text in files.items():
        (d / name).write_text(text)
    return recipes.load(d)


def test_an_arch_bootstrap_recipe_defaults_to_base_linux_from_archs_mirror(tmp_path):
    r = _recipe(tmp_path, '[bootstrap]\ndistro = "arch"\n')
    assert (r.bootstrap.distro, r.bootstrap.packages, r.bootstrap.mirror) == ("arch", ("base", "linux"), ARCH_MIRROR)
    assert r.bootable and r.settings()["bootstrap"]["distro"] == "arch"
    r = _recipe(tmp_path / "k", '[bootstrap]\ndistro = "arch"\npackages = ["base"]\nmirror = "file:///m/$repo"\n'
                'key = "m.asc"\n', **{"m.asc": "KEY"})
    assert r.bootstrap.key == "m.asc" and not r.bootable  # no kernel: a base image, like Debian's


def test_the_mirrors_key_file_is_an_input_of_the_tgz(tmp_path):
    """A new key (another mirror trusted) is a new tgz, not the old one restored from the store."""
    from pipeline import builders
    from pipeline.project import Project

    r = _recipe(tmp_path, '[bootstrap]\ndistro = "arch"\nmirror = "file:///m/$repo"\nkey = "m.asc"\n', **{"m.asc": "A"})
    p = Project(tmp_path)
    before = builders.tgz_inputs(p, r)
    (r.dir / "m.asc").write_text("B")
    assert builders.tgz_inputs(p, r) != before and builders.tgz_inputs(p, r)["key"][0]["path"] == "m.asc"


def test_a_debian_bootstrap_keeps_its_settings_and_so_its_key(tmp_path):
    r = _recipe(tmp_path, '[bootstrap]\nsuite = "bookworm"\n')
    assert r.bootstrap.distro == "debian" and set(r.settings()["bootstrap"]) == {"suite", "variant", "packages",
                                                                                  "mirror"}


@pytest.mark.parametrize(("toml", "says"), [
    ('[bootstrap]\ndistro = "gentoo"\n', "unknown distro 'gentoo'"),
    ('[bootstrap]\ndistro = "arch"\nsuite = "bookworm"\n', "suite is mmdebstrap's"),
    ('[bootstrap]\nkey = "k.asc"\n', "key is for an Arch mirror"),
    ('[bootstrap]\ndistro = "arch"\nkey = "../k.asc"\n', "is not a file in the recipe's folder"),
])
def test_arch_bootstrap_errors_name_the_key(tmp_path, toml, says):
    with pytest.raises(UserError, match=says):
        _recipe(tmp_path, toml)


@pytest.mark.parametrize("script", sorted(str(p) for p in (Path(__file__).parent / "pacman_repo_files").glob("*.sh")))
def test_the_test_repositorys_scripts_are_shellcheck_clean(script):
    import shutil
    import subprocess

    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed by ./setup.sh"
    proc = subprocess.run([shellcheck, "-s", "sh", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
