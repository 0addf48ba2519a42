"""Root checks: what each tool says at its start, as pure functions of the facts (no root needed)."""

from __future__ import annotations

import pytest

from pipeline import access
from pipeline.access import TOOLS, Access, Facts, Need, help_sentence, notices, subid_has, userns_problem
from pipeline.errors import UserError

USER = Facts(uid=1000, user="alice")
ROOT = Facts(uid=0, user="root")
ROOTLESS_TOOLS = [name for name, t in TOOLS.items() if Need.ROOTLESS in t.needs]


def texts(tool: str, facts: Facts) -> list[str]:
    return [n.text for n in notices(tool, facts)]


def test_every_console_script_is_described():
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(TOOLS)


@pytest.mark.parametrize("tool", ROOTLESS_TOOLS)
def test_a_rootless_tool_as_root_notes_root_is_not_needed_once(tool):
    said = texts(tool, ROOT)
    assert said == [f"{tool}: running as root, which it does not need (any user can run it)"]
    assert all(not n.fatal for n in notices(tool, ROOT))


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_user_with_every_access_hears_nothing(tool):
    assert texts(tool, USER) == []


@pytest.mark.parametrize("tool", ["build-tgz", "suco"])
def test_docker_tools_as_root_say_nothing(tool):
    assert texts(tool, ROOT) == []


@pytest.mark.parametrize("tool", ["build-tgz", "suco"])
def test_docker_socket_denied_is_fatal_with_the_fix(tool):
    (n,) = notices(tool, Facts(uid=1000, user="alice", docker=Access.DENIED))
    assert n.fatal and "/var/run/docker.sock" in n.text and "alice" in n.text
    assert "usermod -aG docker alice" in n.hint and "\n" not in n.text + n.hint


def test_docker_socket_missing_names_the_socket_of_docker_host():
    (n,) = notices("suco", Facts(uid=1000, docker_socket="/run/user/1000/docker.sock", docker=Access.MISSING))
    assert n.fatal and n.text.endswith("/run/user/1000/docker.sock") and "systemctl start docker" in n.hint


def test_a_remote_docker_host_is_not_checked():
    assert notices("build-tgz", Facts(uid=1000, docker_socket="", docker=Access.REMOTE)) == []


@pytest.mark.parametrize("tool", ["run-tgz", "run-dir", "run-bios", "run-uefi", "virt"])
def test_run_tools_explain_the_kvm_fix_and_go_on_under_tcg(tool):
    (n,) = notices(tool, Facts(uid=1000, user="alice", kvm=Access.DENIED))
    assert not n.fatal and "TCG" in n.text and "usermod -aG kvm alice" in n.text
    (m,) = notices(tool, Facts(uid=1000, kvm=Access.MISSING))
    assert not m.fatal and "no /dev/kvm" in m.text and "TCG" in m.text


def test_a_root_run_tool_without_kvm_says_both_in_two_lines():
    said = texts("run-uefi", Facts(uid=0, user="root", kvm=Access.MISSING))
    assert len(said) == 2 and "does not need" in said[0] and "TCG" in said[1]


def test_disk_builders_never_mention_kvm():
    assert texts("build-efistub", Facts(uid=1000, kvm=Access.MISSING)) == []


def test_debian_install_as_a_user_without_subuids_is_fatal_with_the_fix():
    problem = userns_problem(uid=1000, user="alice", userns_clone=None, max_userns="15000", apparmor_restrict=None,
                             subuid="bob:100000:65536\n", subgid="", newuidmap=True)
    (n,) = notices("debian-install", Facts(uid=1000, user="alice", userns_problem=problem))
    assert n.fatal and "no /etc/subuid and /etc/subgid range for alice" in n.text
    assert n.hint.startswith("`sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 alice`")


def test_debian_install_as_root_does_not_check_user_namespaces():
    said = texts("debian-install", Facts(uid=0, user="root", userns_problem=("x", "y")))
    assert said == ["debian-install: running as root, which it does not need (any user can run it)"]


OK_IDS = "alice:100000:65536\n"


@pytest.mark.parametrize(("kw", "why", "fix"), [
    ({"userns_clone": "0\n"}, "refuses unprivileged user namespaces", "kernel.unprivileged_userns_clone=1"),
    ({"max_userns": "0\n"}, "user namespaces are disabled", "user.max_user_namespaces"),
    ({"apparmor_restrict": "1\n"}, "AppArmor", "apparmor_restrict_unprivileged_userns=0"),
    ({"subgid": ""}, "no /etc/subuid and /etc/subgid range", "--add-subgids"),
    ({"newuidmap": False}, "newuidmap", "apt-get install uidmap"),
])
def test_userns_problems_each_have_a_one_line_fix(kw, why, fix):
    args = dict(uid=1000, user="alice", userns_clone="1\n", max_userns="15000\n", apparmor_restrict="0\n",
                subuid=OK_IDS, subgid=OK_IDS, newuidmap=True)
    assert userns_problem(**args) is None
    found = userns_problem(**{**args, **kw})
    assert found is not None and why in found[0] and fix in found[1]


def test_subid_entries_by_name_or_uid():
    assert subid_has("alice:100000:65536\n", "alice", 1000)
    assert subid_has("# comment\n1000:165536:65536\n", "alice", 1000)
    assert not subid_has("alice:100000:0\n", "alice", 1000)
    assert not subid_has(None, "alice", 1000)


def test_help_sentences():
    assert help_sentence("build-efistub") == "Root is not needed: it runs as any user."
    assert help_sentence("run-tgz").startswith("Root is not needed") and "/dev/kvm" in help_sentence("run-tgz")
    assert "docker group" in help_sentence("suco") and "not root itself" in help_sentence("build-tgz")
    assert "unshare mode" in help_sentence("debian-install")
    assert "reads every file of DIR" in help_sentence("run-dir")
    for tool in TOOLS:
        assert help_sentence(tool).endswith(".")


def test_docker_socket_follows_docker_host():
    assert access.docker_socket({}) == "/var/run/docker.sock"
    assert access.docker_socket({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}) == "/run/user/1000/docker.sock"
    assert access.docker_socket({"DOCKER_HOST": "tcp://10.0.0.2:2376"}) is None


def test_announce_prints_notes_and_raises_the_fatal_one(capsys):
    access.announce("run-bios", Facts(uid=0, user="root", kvm=Access.DENIED))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("run-bios: running as root")
    with pytest.raises(UserError) as info:
        access.announce("suco", Facts(uid=1000, user="alice", docker=Access.DENIED))
    assert info.value.message.startswith("alice may not use the Docker daemon's socket")
    assert capsys.readouterr().err == ""


def test_probe_reads_this_host():
    facts = access.probe("run-tgz")
    assert facts.uid >= 0 and facts.kvm in set(Access)
