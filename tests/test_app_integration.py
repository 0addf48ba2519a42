"""Apps booted for real (issue 10), under the accelerator this host allows (TCG here): webapp (no
kernel, no init: our init, virt's kernel) and sysapp (systemd runs the app as a unit), each
through check_boot in all three modes; a run target ends with the app's exit status.

Lean on purpose (a TCG boot costs ~30 s): one project, the checks' boots are the only boots but
one (the exit-status run), and the bad-input cases never boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project, require_docker

from pipeline import initramfs, vm
from pipeline.cache import hash_file

pytestmark = pytest.mark.integration


def files_of(name: str) -> dict[str, str]:
    return {f.name: f.read_text() for f in (ROOT / "recipes" / name).iterdir() if f.is_file()}


# Prints what the Dockerfile set (user, cwd, env) and exits 3: `doit run_tgz` must exit 3.
EXIT3 = {"Dockerfile": """\
FROM ldt/debian-bookworm
WORKDIR /work/here
ENV GREETING="hello there"
USER nobody
CMD ["sh", "-c", "echo \\"report: uid=$(id -u) cwd=$(pwd) greeting=$GREETING\\"; exit 3"]
"""}
NO_EXE = {"Dockerfile": 'FROM ldt/debian-bookworm\nCMD ["gunicorn", "app:app"]\n'}
NO_USER = {"Dockerfile": 'FROM ldt/debian-bookworm\nUSER www\nCMD ["sleep", "1"]\n'}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    require_docker()
    doit("build_tgz:hello", "build_tgz:virt")  # the repository's store: parents' entries to seed from
    proj = make_project(tmp_path_factory.mktemp("apps"), {
        "debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}, "hello": files_of("hello"), "virt": files_of("virt"),
        "webapp": files_of("webapp"), "sysapp": files_of("sysapp"), "ldtt-exit3": EXIT3,
        "ldtt-noexe": NO_EXE, "ldtt-nouser": NO_USER})
    shutil.rmtree(proj / "cache" / "store" / "check", ignore_errors=True)  # every check here boots
    return proj


def rows(text: str, name: str) -> dict[str, list[str]]:
    return {r[1]: r for r in (line.split() for line in text.splitlines() if line.startswith(name + " "))}


def test_webapp_answers_http_through_the_forward_in_every_mode(project):
    out = doit("check_boot:webapp", cwd=project)
    text = out.stdout + out.stderr
    table = rows(text, "webapp")
    assert {m: r[2] for m, r in table.items()} == {"tgz": "pass", "bios": "pass", "uefi": "pass"}, text
    assert all(r[4:7] == ["HTTP", "200", "/;"] for r in table.values()), text
    # then the power-off path: Ctrl-Alt-Del -> our init -> SIGTERM (the STOPSIGNAL) -> the app ends
    assert all(r[-3:] == ["stopped:", "exit", "143"] for r in table.values()), text
    own, virt = (project / "cache" / "recipes" / name / "vmlinuz" for name in ("webapp", "virt"))
    assert hash_file(own) == hash_file(virt)  # no kernel of its own: virt's boots it
    # ... with our initrd: busybox, the VM's modules, no udev (the kernel recipe's has it)
    members, _ = initramfs.read_cpio((project / "cache" / "recipes" / "webapp" / "initrd.img").read_bytes())
    names = {m.name for m in members}
    assert {"init", "bin/busybox", "lib/ldt/modules/virtio_blk.ko", "lib/ldt/modules/ext4.ko"} <= names, names
    assert not any("udev" in n for n in names), names


def test_virt_runs_a_command_on_an_app_image(project, tmp_path):
    # webapp boots on our initrd; virt's init needs the initrd its kernel came with (virt's own)
    (tmp_path / "note").write_text("from the host\n")
    proc = subprocess.run([sys.executable, "-c", "from pipeline.cli import virt; virt()", "--image", "webapp",
                           "--cold", "--", "sh", "-c", "cat /srv/index.html note"], cwd=tmp_path,
                          env={**os.environ, "LDT_ROOT": str(project), "PYTHONPATH": str(ROOT)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hello from webapp" in proc.stdout and "from the host" in proc.stdout, proc.stdout + proc.stderr


def test_sysapp_runs_as_a_unit_with_the_dockerfiles_user_cwd_and_env(project):
    # The marker is the app's own line: it proves USER, WORKDIR and ENV under systemd.
    out = doit("check_boot:sysapp", cwd=project)
    text = out.stdout + out.stderr
    table = rows(text, "sysapp")
    assert {m: r[2] for m, r in table.items()} == {"tgz": "pass", "bios": "pass", "uefi": "pass"}, text
    assert all(r[4] == "marker" for r in table.values()), text
    # the ACPI power button -> systemd stops the unit with its KillSignal -> the app's exit line
    assert all(r[-3:] == ["stopped:", "exit", "143"] for r in table.values()), text


def test_the_run_target_exits_with_the_apps_status(project):
    proc = subprocess.run([sys.executable, "-m", "doit", "run_tgz:ldtt-exit3", "--no-net"], cwd=project,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = proc.stdout + proc.stderr
    assert "report: uid=65534 cwd=/work/here greeting=hello there" in text, text
    assert proc.returncode == 3, text


def test_a_root_file_system_that_is_not_there_is_one_line_and_a_failed_run(project):
    # our initrd looks for root= (the last one wins), then gives up with one line and powers off
    proc = subprocess.run([sys.executable, "-m", "doit", "run_tgz:ldtt-exit3", "--no-net",
                           f"--cmdline=root=UUID={NO_SUCH_UUID}"], cwd=project, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = proc.stdout + proc.stderr
    assert f"ldt-initrd: the root file system UUID={NO_SUCH_UUID} is not there" in text, text
    assert "report:" not in text, text
    assert proc.returncode == vm.NO_APP_STATUS, text  # not qemu's 0: the app never ran


NO_SUCH_UUID = "00000000-0000-4000-8000-000000000000"


@pytest.mark.parametrize(("name", "words"), [
    ("ldtt-noexe", "the app's executable gunicorn is not in the image (PATH=/usr/local/sbin:"),
    ("ldtt-nouser", "USER www: no user 'www' in /etc/passwd"),
])
def test_bad_input_is_one_line_before_any_boot(project, name, words):
    out = doit(f"build_rootfs:{name}", cwd=project, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and words in text and "Traceback" not in text, text
    assert not (project / "cache" / "recipes" / name / "app.json").exists()  # nothing stored
