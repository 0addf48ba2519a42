"""Recipe discovery, recipe.toml validation, FROM parsing and the recipe graph (pure file logic: pyfakefs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import recipes
from pipeline.console import CheckSettings
from pipeline.errors import UserError
from pipeline.recipes import Bootstrap, Recipe, discover, from_images, order, recipe_of_image
from pipeline.stages import Project

ROOT = Path("/project")
RECIPES = ROOT / "recipes"
BOOTSTRAP = '[bootstrap]\nsuite = "bookworm"\nvariant = "minbase"\npackages = ["systemd-sysv", "udev"]\n'


def add(fs, name: str, **files: str) -> Path:
    """recipes/<name>/ with the given files (keyword `toml` stands for recipe.toml)."""
    d = RECIPES / name
    fs.create_dir(d)
    for fname, text in files.items():
        fs.create_file(d / ("recipe.toml" if fname == "toml" else fname), contents=text)
    return d


def raises_user_error(func, *args) -> UserError:
    with pytest.raises(UserError) as info:
        func(*args)
    assert info.value.hint, f"no hint on: {info.value.message}"
    return info.value


# -- discovery --------------------------------------------------------------------------------------


def test_discovers_dockerfile_and_bootstrap_recipes(fs):
    add(fs, "base", toml=BOOTSTRAP)
    add(fs, "app", Dockerfile="FROM ldt/base\nRUN true\n")
    found = discover(RECIPES)
    assert sorted(found) == ["app", "base"]
    base, app = found["base"], found["app"]
    assert base.bootstrap == Bootstrap(suite="bookworm", variant="minbase", packages=("systemd-sysv", "udev"))
    assert base.parents == ()
    assert app.bootstrap is None
    assert app.parents == ("base",)
    assert app.dir == RECIPES / "app"
    assert app.dockerfile == RECIPES / "app" / "Dockerfile"
    assert app.image == "ldt/app"


def test_discovery_skips_hidden_folders_and_plain_files(fs):
    add(fs, "base", toml=BOOTSTRAP)
    fs.create_dir(RECIPES / ".git")
    fs.create_file(RECIPES / "README.md", contents="not a recipe")
    assert list(discover(RECIPES)) == ["base"]


def test_no_recipes_folder_means_no_recipes(fs):
    assert discover(Path("/nowhere")) == {}


def test_folder_without_dockerfile_or_bootstrap_is_an_error(fs):
    add(fs, "empty")
    e = raises_user_error(discover, RECIPES)
    assert str(RECIPES / "empty") in e.message
    assert "no Dockerfile and no [bootstrap]" in e.message


def test_recipe_toml_without_bootstrap_and_no_dockerfile_is_an_error(fs):
    add(fs, "vmonly", toml='[vm]\nmemory = "2G"\n')
    e = raises_user_error(discover, RECIPES)
    assert "vmonly" in e.message and "no Dockerfile" in e.message


def test_dockerfile_and_bootstrap_together_is_an_error(fs):
    add(fs, "both", toml=BOOTSTRAP, Dockerfile="FROM scratch\n")
    e = raises_user_error(discover, RECIPES)
    assert str(RECIPES / "both") in e.message
    assert "both a Dockerfile and a [bootstrap]" in e.message


@pytest.mark.parametrize("name", ["Hello", "-dash", "_under", "with space", "ümlaut"])
def test_invalid_recipe_names(fs, name):
    add(fs, name, Dockerfile="FROM scratch\n")
    e = raises_user_error(discover, RECIPES)
    assert f"'{name}'" in e.message and "not a valid image name" in e.message


@pytest.mark.parametrize("name", ["a", "0ad", "my.recipe_v2-x"])
def test_valid_recipe_names(fs, name):
    add(fs, name, Dockerfile="FROM scratch\n")
    assert list(discover(RECIPES)) == [name]


def test_settings_from_recipe_toml(fs):
    add(fs, "app", Dockerfile="FROM scratch\n", toml="""\
[build]
args = { VERSION = "1.2", JOBS = 4 }
platform = "linux/amd64"

[boot]
kernel = "6.1.0-13-amd64"
initrd = false
cmdline = "quiet"
marker = 'Welcome'
timeout = 30

[disk]
headroom_mib = 64
size_mib = 2048
qcow2 = true

[vm]
memory = "2G"
cpus = 4
""")
    r = discover(RECIPES)["app"]
    assert r.build_args == (("JOBS", "4"), ("VERSION", "1.2"))  # sorted, values as strings
    assert (r.kernel, r.initrd, r.cmdline, r.boot_marker, r.boot_timeout) == ("6.1.0-13-amd64", False, "quiet",
                                                                               "Welcome", 30)
    assert (r.headroom_mib, r.size_mib, r.qcow2, r.memory, r.cpus) == (64, 2048, True, "2G", 4)


def test_defaults_without_recipe_toml(fs):
    add(fs, "app", Dockerfile="FROM scratch\n")
    r = discover(RECIPES)["app"]
    assert r == Recipe(name="app", dir=RECIPES / "app")
    assert r.initrd is True and r.platform == "linux/amd64" and r.build_args == ()


def test_secure_boot_is_a_boot_setting(fs):
    add(fs, "app", Dockerfile="FROM scratch\n", toml="[boot]\nsecure_boot = true\n")
    r = discover(RECIPES)["app"]
    assert r.secure_boot is True and r.settings()["secure_boot"] is True
    assert Recipe(name="x", dir=ROOT).settings()["secure_boot"] is False


def test_check_and_verity_tables(fs):
    add(fs, "app", Dockerfile="FROM scratch\n",
        toml='[disk]\nverity = true\n[check]\nrun = ["true", "id -u"]\nlogin = "admin"\n'
             'password_env = "APP_PW"\ntimeout = 60\n')
    r = discover(RECIPES)["app"]
    assert r.verity is True and r.settings()["verity"] is True
    assert r.checks == CheckSettings(run=("true", "id -u"), login="admin", password_env="APP_PW", timeout=60)
    assert r.settings()["checks"]["run"] == ["true", "id -u"]
    default = Recipe(name="x", dir=ROOT)
    assert default.verity is False and default.checks.run is None and default.checks.login == "root"


# -- recipe.toml errors: file, key, line, hint --------------------------------------------------------

TOML_ERRORS = {
    "unknown table": ("# a comment\n\n[nope]\nx = 1\n", 3, "[nope]", "known tables"),
    "unknown table after a good one": ('[vm]\ncpus = 2\n\n[vms]\nmemory = "1G"\n', 4, "[vms]", "[vm]"),
    "unknown key": ('[vm]\ncpus = 2\nmemroy = "2G"\n', 3, "memroy", "known keys in [vm]"),
    "wrong type": ('[vm]\nmemory = "1G"\n\ncpus = "2"\n', 4, "cpus", "cpus = 2"),
    "bool for an int": ("[boot]\n# seconds\ntimeout = true\n", 3, "timeout", "timeout = 2"),
    "int for a bool": ("[disk]\nheadroom_mib = 10\nqcow2 = 1\n", 3, "qcow2", "qcow2 = true"),
    "same key in another table first": ("[vm]\ncpus = 2\n[disk]\nsize_mib = 1\n[boot]\ntimeout = 'x'\n", 6,
                                        "timeout", "timeout = 2"),
    "bad platform": ('[build]\nargs = {}\nplatform = "linux/arm64"\n', 3, "platform", "linux/amd64"),
    "bad build arg": ("[build]\n\nargs = { DEBUG = true }\n", 3, "DEBUG", "args"),
    "bad variant": ('[bootstrap]\nsuite = "bookworm"\nvariant = "tiny"\n', 3, "variant", "minbase"),
    "bad packages": ('[bootstrap]\npackages = ["a", 2]\n', 2, "packages", "packages ="),
    "non-positive": ("[vm]\n\n\ncpus = 0\n", 4, "cpus", "cpus ="),
    "bad memory": ('[vm]\nmemory = "lots"\n', 2, "memory", "memory ="),
    "bad marker regex": ("[boot]\nkernel = \"6.1\"\nmarker = '(login'\n", 3, "marker", "escape"),
    "table is not a table": ("# x\nvm = 3\n", 2, "'vm'", "[vm]"),
    "secure_boot not a bool": ('[boot]\nsecure_boot = "yes"\n', 2, "secure_boot", "secure_boot = true"),
    "secure_boot without a boot": ("[boot]\nbootable = false\nsecure_boot = true\n", 3, "secure_boot", "bootable"),
    "verity without a boot": ("[boot]\nbootable = false\n[disk]\nverity = true\n", 4, "verity", "bootable"),
    "check run not strings": ('[check]\nrun = ["true", 3]\n', 2, "run", "run = ["),
    "check run empty command": ('[check]\nrun = [" "]\n', 2, "run", "run = ["),
    "check password_env": ('[check]\npassword_env = "my password"\n', 2, "password_env", "password_env ="),
    "check timeout": ("[check]\ntimeout = 0\n", 2, "timeout", "timeout ="),
    "check unknown key": ("[check]\nrnu = []\n", 2, "rnu", "known keys in [check]"),
    "check with boot check off": ('[boot]\ncheck = false\n[check]\nrun = ["true"]\n', 3, "[check]", "check = false"),
}


@pytest.mark.parametrize("text,line,key,hint", TOML_ERRORS.values(), ids=TOML_ERRORS.keys())
def test_recipe_toml_errors_name_file_key_and_line(fs, text, line, key, hint):
    d = add(fs, "app", toml=text)
    e = raises_user_error(recipes.parse_toml, d / "recipe.toml")
    assert f"{d / 'recipe.toml'}:{line}:" in e.message
    assert key in e.message
    assert hint in e.hint


def test_recipe_toml_error_surfaces_through_discover(fs):
    add(fs, "app", Dockerfile="FROM scratch\n", toml="[vm]\ncpus = true\n")
    e = raises_user_error(discover, RECIPES)
    assert "recipe.toml:2:" in e.message and "cpus" in e.message


def test_recipe_toml_syntax_error_names_the_file(fs):
    d = add(fs, "app", toml="[vm\ncpus = 2\n")
    e = raises_user_error(recipes.parse_toml, d / "recipe.toml")
    assert str(d / "recipe.toml") in e.message
    assert "toml" in e.hint


# -- FROM parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile,images", [
    ("FROM ldt/x\n", ["ldt/x"]),
    ("from ldt/x:latest\n", ["ldt/x:latest"]),
    ("# FROM ldt/commented\nFROM ldt/x\n", ["ldt/x"]),
    ("FROM --platform=linux/amd64 ldt/x AS build\nRUN make\n", ["ldt/x"]),
    ("FROM --platform=$BUILDPLATFORM ldt/x AS build\nRUN make\nFROM ldt/y\nCOPY --from=build /a /a\n",
     ["ldt/x", "ldt/y"]),
    ("FROM ldt/x AS Build\nFROM build AS final\nFROM final\n", ["ldt/x"]),  # stage names are not images
    ("FROM scratch\nCOPY a /\n", []),
    ("FROM debian:bookworm\n", ["debian:bookworm"]),
    ("ARG BASE=ldt/x\nFROM ${BASE}\n", ["ldt/x"]),
    ("ARG BASE=ldt/x\nFROM $BASE AS b\nFROM b\n", ["ldt/x"]),
    ("ARG TAG=latest\nFROM ldt/x:${TAG}\n", ["ldt/x:latest"]),
])
def test_from_images(dockerfile, images):
    assert from_images(dockerfile) == images


def test_from_images_build_args_override_arg_defaults():
    text = "ARG BASE=ldt/x\nFROM $BASE\n"
    assert from_images(text, {"BASE": "ldt/y"}) == ["ldt/y"]
    assert from_images("ARG BASE\nFROM ${BASE}\n", {"BASE": "ldt/z"}) == ["ldt/z"]


def test_from_images_quoted_arg_default():
    # Docker strips the quotes of `ARG BASE="ldt/x"`; the FROM edge must not be lost.
    assert from_images('ARG BASE="ldt/x"\nFROM ${BASE}\n') == ["ldt/x"]


@pytest.mark.parametrize("ref,recipe", [
    ("ldt/hello", "hello"),
    ("ldt/hello:latest", "hello"),
    ("ldt/hello:1.0", None),
    ("ldt/hello@sha256:abc", None),
    ("debian:bookworm", None),
    ("docker.io/library/debian", None),
    ("ldtx/hello", None),
])
def test_recipe_of_image(ref, recipe):
    assert recipe_of_image(ref) == recipe


def test_parents_follow_build_args_and_are_deduplicated(fs):
    add(fs, "base", toml=BOOTSTRAP)
    add(fs, "app", toml='[build]\nargs = { BASE = "ldt/base" }\n',
        Dockerfile="ARG BASE=ldt/elsewhere\nFROM $BASE AS one\nFROM ldt/base:latest\nFROM one\n")
    assert discover(RECIPES)["app"].parents == ("base",)


# -- the graph ----------------------------------------------------------------------------------------


def test_unknown_recipe_in_from_lists_known_recipes(fs):
    add(fs, "base", toml=BOOTSTRAP)
    add(fs, "app", Dockerfile="FROM ldt/nope\n")
    e = raises_user_error(discover, RECIPES)
    assert str(RECIPES / "app" / "Dockerfile") in e.message
    assert "ldt/nope" in e.message
    assert "known recipes: app, base" in e.hint


def test_from_cycle_names_the_cycle(fs):
    add(fs, "a", Dockerfile="FROM ldt/b\n")
    add(fs, "b", Dockerfile="FROM ldt/c\n")
    add(fs, "c", Dockerfile="FROM ldt/a\n")
    e = raises_user_error(discover, RECIPES)
    assert "cycle" in e.message
    assert "a -> b -> c -> a" in e.message


def test_recipe_from_itself_is_a_cycle(fs):
    add(fs, "a", Dockerfile="FROM ldt/a\n")
    e = raises_user_error(discover, RECIPES)
    assert "a -> a" in e.message


def graph(**edges: tuple[str, ...]) -> dict[str, Recipe]:
    return {n: Recipe(name=n, dir=RECIPES / n, parents=p) for n, p in edges.items()}


def test_order_puts_parents_first():
    # names chosen so that alphabetical order is wrong for every edge
    rs = graph(a=("m",), m=("z",), z=(), b=("z", "a"), y=())
    got = order(rs)
    assert sorted(got) == sorted(rs)
    for name, r in rs.items():
        for p in r.parents:
            assert got.index(p) < got.index(name), f"{p} must come before {name} in {got}"


def test_ancestors():
    rs = graph(a=("m",), m=("z",), z=(), b=("a",), y=())
    assert set(recipes.ancestors(rs, "b")) == {"a", "m", "z"}
    assert recipes.ancestors(rs, "y") == []


def test_project_recipe_unknown_lists_known_recipes(fs):
    add(fs, "base", toml=BOOTSTRAP)
    add(fs, "app", Dockerfile="FROM ldt/base\n")
    p = Project(ROOT)
    assert p.recipe("app").parents == ("base",)
    e = raises_user_error(p.recipe, "nope")
    assert "'nope'" in e.message
    assert "known recipes: app, base" in e.hint


def test_the_trusted_example_asks_for_secure_boot_verity_and_checks():
    r = recipes.load(Path(__file__).resolve().parent.parent / "examples" / "hello-trusted")
    assert r.secure_boot and r.verity and r.parents == ("hello",)
    assert r.checks.run is not None and len(r.checks.run) == 1
