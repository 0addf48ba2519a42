"""The app wired into the graph (issue 10): recipe.toml's [app] and [boot] keys, app.json, the
ext4's extra entries, borrowed kernels' modules, port forwards, the check executor. No VM here."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from pipeline import app, builders, ext4, kernel, qemu, rootfs, vm
from pipeline.app import AppSettings, InitKind, Plan, RootfsFacts
from pipeline.errors import UserError
from pipeline.qemu import Accel, Mode, VmSettings
from pipeline.recipes import Recipe, discover, load

# -- recipe.toml ----------------------------------------------------------------------------------


def recipe_dir(tmp_path: Path, toml: str, name: str = "web") -> Path:
    d = tmp_path / "recipes" / name
    d.mkdir(parents=True)
    (d / "Dockerfile").write_text("FROM scratch\n")
    (d / "recipe.toml").write_text(toml)
    return d


def test_app_table_reaches_the_recipe_and_its_settings(tmp_path):
    d = recipe_dir(tmp_path, '[app]\nargv = ["/bin/app", "-v"]\nenv = { LOG = "debug" }\n'
                             '[boot]\nhttp = "/health"\nkernel_from = "web"\n')
    r = load(d)
    assert r.app == AppSettings(argv=("/bin/app", "-v"), env=(("LOG", "debug"),))
    assert r.http == "/health" and r.kernel_from == "web"
    assert r.settings()["app"] == {"enabled": True, "argv": ["/bin/app", "-v"], "env": {"LOG": "debug"}}


@pytest.mark.parametrize(("toml", "line", "words"), [
    ('[boot]\ncheck = true\n\n[app]\nenabled = "no"\n', 5, "[app] enabled"),
    ('[app]\nargv = []\n', 2, "non-empty"),
    ('[app]\nenv = { A = 1 }\n', 2, "'A' must be a string"),
    ('[app]\ncolour = 1\n', 2, "unknown key 'colour'"),
    ('[boot]\nhttp = "health"\n', 2, "is not a path"),
])
def test_bad_app_settings_name_file_and_line(tmp_path, toml, line, words):
    d = recipe_dir(tmp_path, toml)
    with pytest.raises(UserError) as info:
        load(d)
    assert info.value.message.startswith(f"{d / 'recipe.toml'}:{line}: ") and words in info.value.message


def test_kernel_from_must_name_a_bootable_recipe(tmp_path):
    recipe_dir(tmp_path, '[boot]\nkernel_from = "nokernel"\n')
    with pytest.raises(UserError) as info:
        discover(tmp_path / "recipes")
    assert "kernel_from 'nokernel' names no bootable recipe" in info.value.message
    assert info.value.message.startswith(f"{tmp_path / 'recipes' / 'web' / 'recipe.toml'}:2:")


# -- app.json -------------------------------------------------------------------------------------

FACTS = RootfsFacts(frozenset({"usr/bin/python3.11", "bin/sh"}), {"usr/bin/python3": "python3.11"},
                    "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n",
                    "root:x:0:\nnogroup:x:65534:\n")
CONFIG = {"Cmd": ["python3", "-m", "http.server", "8000"], "Env": ["GREETING=hello"], "WorkingDir": "/srv",
          "User": "nobody", "ExposedPorts": {"8000/tcp": {}, "53/udp": {}}}


def test_plan_of_an_app_image_round_trips_through_json():
    plan = app.plan(CONFIG, AppSettings(), FACTS, hostname="web")
    assert plan.init is InitKind.LDT and plan.tcp_ports == (8000,) and plan.kernels == ()
    assert plan.app is not None and plan.app.exe == "/usr/bin/python3" and plan.app.identity.uid == 65534
    assert plan.kernel_args == "init=/.ldt/init"
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan.describe() == "app python3 -m http.server 8000 as nobody in /srv, run by our init, TCP ports 8000"


def test_no_command_or_app_off_boots_the_image_as_an_os():
    assert app.plan({}, AppSettings(), FACTS, hostname="h").app is None
    assert app.plan(CONFIG, AppSettings(enabled=False), FACTS, hostname="h") == Plan()
    assert Plan().kernel_args == ""


def test_missing_executable_names_it_and_the_path_searched():
    with pytest.raises(UserError) as info:
        app.plan({**CONFIG, "Cmd": ["gunicorn", "app"]}, AppSettings(), FACTS, hostname="h")
    assert "gunicorn" in info.value.message and "PATH=/usr/local/sbin:" in info.value.message


def test_missing_user_or_group_is_one_line():
    with pytest.raises(UserError, match="no user 'www'"):
        app.plan({**CONFIG, "User": "www"}, AppSettings(), FACTS, hostname="h")
    with pytest.raises(UserError, match="no group 'www'"):
        app.plan({**CONFIG, "User": "nobody:www"}, AppSettings(), FACTS, hostname="h")


def test_guest_files_become_a_tar_owned_by_root(tmp_path):
    plan = app.plan(CONFIG, AppSettings(), FACTS, hostname="web")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    out = tmp_path / "app.tar"
    builders.write_guest_tar(app.guest_files(plan.app, InitKind.SYSTEMD, busybox), out, mtime=1700000000)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar}
    assert members[".ldt"].isdir() and members[".ldt/app-exit"].mode == 0o755
    link = members["etc/systemd/system/multi-user.target.wants/ldt-app.service"]
    assert link.issym() and link.linkname == "../ldt-app.service"
    assert {m.uid for m in members.values()} == {0} and {m.mtime for m in members.values()} == {1700000000}


# -- kernels from another recipe --------------------------------------------------------------------


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, link: str | None = None) -> None:
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
    elif data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def test_modules_of_a_kernel_recipe_land_through_the_images_symlinks(tmp_path):
    kernel_tgz = tmp_path / "kernel.tgz"
    with tarfile.open(kernel_tgz, "w:gz") as tar:
        add(tar, "lib", link="usr/lib")
        add(tar, "usr/lib/modules/6.1.0-9-amd64/kernel")
        add(tar, "usr/lib/modules/6.1.0-9-amd64/kernel/virtio_net.ko", b"ko")
        add(tar, "usr/lib/modules/6.1.0-8-amd64/old.ko", b"old")
    modules = tmp_path / "modules.tar"
    assert rootfs.extract_modules(kernel_tgz, "6.1.0-9-amd64", modules, recipe="virt") == 2
    with tarfile.open(modules) as tar:
        assert tar.getnames() == ["lib/modules/6.1.0-9-amd64/kernel", "lib/modules/6.1.0-9-amd64/kernel/virtio_net.ko"]
    with pytest.raises(UserError, match="no /lib/modules/7.0"):
        rootfs.extract_modules(kernel_tgz, "7.0", tmp_path / "none.tar", recipe="virt")

    image = tmp_path / "image.tgz"
    with tarfile.open(image, "w:gz") as tar:
        add(tar, "usr")
        add(tar, "usr/lib")
        add(tar, "lib", link="usr/lib")
    root = tmp_path / "root.ext4"
    params = ext4.Ext4Params.for_key("k", epoch=1700000000, headroom_bytes=1 << 20)
    ext4.build_ext4(image, root, params, extra=(modules,))
    out = subprocess.run(["debugfs", "-R", "cat /usr/lib/modules/6.1.0-9-amd64/kernel/virtio_net.ko", root],
                         capture_output=True, text=True)
    assert out.stdout == "ko"


def test_bzimage_release_reads_the_setup_header(tmp_path):
    image = bytearray(0x4000)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x1000).to_bytes(2, "little")
    image[0x1200:0x1240] = b"6.1.0-27-amd64 (debian-kernel@lists.debian.org) #1 SMP\0"
    (tmp_path / "vmlinuz").write_bytes(bytes(image))
    assert kernel.release_of(tmp_path / "vmlinuz") == "6.1.0-27-amd64"
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(0x300))
    assert kernel.release_of(tmp_path / "elf") is None


# -- running: ports, console log, checks ------------------------------------------------------------


def test_exposed_ports_forward_to_the_same_or_the_next_free_host_port():
    busy = {8000, 8001}
    assert vm.plan_forwards((8000, 9000), (), lambda p: p not in busy) == ((8002, 8000), (9000, 9000))
    # --forward adds one and overrides the one it names
    assert vm.plan_forwards((8000, 9000), ((18000, 8000), (2222, 22)), lambda p: True) == (
        (18000, 8000), (2222, 22), (9000, 9000))


def test_an_interactive_app_run_keeps_a_copy_of_the_console(tmp_path):
    settings = VmSettings(accel=Accel.TCG, interactive=True, console_log=tmp_path / "con,sole.log")
    cmd = qemu.qemu_cmd(Mode.TGZ, settings=settings, disk=tmp_path / "d.ext4", kernel=tmp_path / "k")
    i = cmd.index("-chardev")
    assert cmd[i + 1] == f"stdio,id=con0,mux=on,signal=on,logfile={tmp_path}/con,,sole.log"
    assert cmd[i + 2:i + 6] == ["-serial", "chardev:con0", "-mon", "chardev=con0"]
    assert "mon:stdio" not in cmd


def test_what_a_check_waits_for():
    r = Recipe(name="web", dir=Path("/x"), http="/")
    served = Plan(app=app.plan(CONFIG, AppSettings(), FACTS, hostname="web").app, init=InitKind.LDT)
    assert vm.check_spec(r, served) == {"marker": None, "http": "/"}
    assert vm.check_spec(Recipe(name="web", dir=Path("/x"), boot_marker="ready"), served) == {
        "marker": "ready", "http": None}
    assert vm.check_spec(Recipe(name="os", dir=Path("/x")), Plan())["marker"] == qemu.LOGIN_PROMPT.pattern


def fake_vm(script: str) -> list[str]:
    """A 'qemu' that prints a console; boot_check appends -qmp …, which sh takes as $1, $2."""
    return ["sh", "-c", script]


def test_an_app_exiting_non_zero_fails_the_check_with_its_output_and_status():
    res = qemu.boot_check(fake_vm("echo booting; echo 'oops: no config'; echo 'ldt-app-exit: 3'; sleep 30"),
                          timeout=20, marker=None, probe=lambda: None, exit_line=app.EXIT_MARKER_RE)
    assert not res.ok and res.exit_status == 3 and res.reason == "the app exited with status 3"
    assert "oops: no config" in res.tail


def test_an_app_without_marker_or_http_passes_by_exiting_0():
    res = qemu.boot_check(fake_vm("echo hi; echo 'ldt-app-exit: 0'; sleep 30"), timeout=20, marker=None,
                          exit_line=app.EXIT_MARKER_RE)
    assert res.ok and res.passed_by == "the app exited 0"


def test_a_probe_passes_the_check_and_the_table_says_which():
    calls = []

    def probe() -> str | None:
        calls.append(1)
        return "HTTP 200 /" if len(calls) > 1 else None

    res = qemu.boot_check(fake_vm("echo up; sleep 30"), timeout=20, marker=None, probe=probe,
                          exit_line=app.EXIT_MARKER_RE, grace=0.5)
    assert res.ok and res.passed_by == "HTTP 200 /"
    table = vm.check_table("web", [vm.CheckResult(Mode.TGZ, True, res.seconds, False, passed_by=res.passed_by,
                                                  stopped="exit 143")])
    assert table.splitlines()[1].split()[4:] == ["HTTP", "200", "/;", "stopped:", "exit", "143"]


def test_the_http_probe_is_not_held_up_by_a_connection_that_never_answers():
    """slirp holds a connection taken before the guest listened: the first attempt here hangs,
    later ones are answered, and the probe reports the answer without waiting for the first."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if not held:
                held.append(conn)  # the first: never answered
                continue
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    probe = vm.HttpProbe(listener.getsockname()[1], "/", every=0.05, timeout=30)
    start = time.monotonic()
    try:
        answer = None
        while answer is None and time.monotonic() - start < 20:
            t = time.monotonic()
            answer = probe()
            assert time.monotonic() - t < 0.5  # a call never blocks
            time.sleep(0.02)
    finally:
        listener.close()
    assert answer == "HTTP 200 /"
    assert held and time.monotonic() - start < 5  # not after the held attempt's 30 s timeout
