"""dm-verity for real: hello's ext4 root with a hash tree beside it, opened at boot by hello's own
initramfs-tools initrd with what the boot stage appends for [disk] verity (initramfs.verity_overlay:
the scripts, dm-verity and its modules); a byte changed in the root makes the read fail.

The initrd here is hello's with that one uncompressed cpio appended (the kernel unpacks every archive
of an initrd in turn), so the test needs no image rebuild; booted straight into the kernel (tgz
mode, the same as `doit run_tgz`), the root and its hash tree as two virtio disks. And an app on
our initrd (webapp) with [disk] verity, built through doit and booted from its UEFI disk.
(hello's signed verity disk, through doit, is booted in test_secureboot_integration.py.)
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import BOOTSTRAP_TOML, ROOT, doit, make_project, require_docker
from console import watch

from pipeline import app, builders, disk, firmware, ids, initramfs, kernel, qemu, verity
from pipeline.run import run

pytestmark = pytest.mark.integration


def kernel_files(tgz: Path, version: str) -> dict[str, bytes]:
    """hello's /lib/modules/<version>/ modules and indexes, named as in it (what builders.add_verity reads)."""
    base = f"usr/lib/modules/{version}/"
    files: dict[str, bytes] = {}
    with tarfile.open(tgz) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name.startswith(base) and member.isfile() and (name.endswith(".ko") or "/modules." in name):
                f = tar.extractfile(member)
                assert f is not None
                files[name.removeprefix(base)] = f.read()
    return files


@pytest.fixture(scope="module")
def verity_env(hello_artifacts: dict[str, Path], hello_tgz: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("verity")
    a = hello_artifacts
    version = kernel.release(a["vmlinuz"].read_bytes())
    assert version
    initrd = tmp / "initrd-verity.img"
    base = a["initrd.img"].read_bytes()
    scripts = {phase: app.guest_script(name) for phase, name in builders.VERITY_SCRIPTS.items()}
    initrd.write_bytes(base + initramfs.verity_overlay(base, version, kernel_files(hello_tgz, version).get, scripts))
    hash_dev = tmp / "rootfs.verity"
    v = verity.format_verity(a["rootfs.ext4"], hash_dev, verity.VerityParams.from_key("verity-test"))
    return tmp, a, initrd, hash_dev, v


def verity_disk(root_img: Path, hash_dev: Path, v: verity.Verity, out: Path) -> Path:
    """GPT: p1 the root (x86-64 root type), p2 its hash tree (root-verity type), partition UUIDs
    from the root hash: the root and tree of a `[disk] verity` disk, without its ESP (no firmware here)."""
    root_uuid, hash_uuid = v.partition_uuids
    (p1, p2), size = disk.layout([root_img.stat().st_size, hash_dev.stat().st_size], tail=disk.ALIGN)
    parts = [disk.Partition(*p1, type=disk.ROOT_X86_64_TYPE, name="root", uuid=root_uuid),
             disk.Partition(*p2, type=verity.ROOT_X86_64_VERITY_TYPE, name="root-verity", uuid=hash_uuid)]
    with open(out, "wb") as f:
        f.truncate(size)
    run(disk.sfdisk_cmd(out), input=disk.sfdisk_script("gpt", str(ids.derive_uuid("verity-test", "gpt-disk")),
                                                       parts).encode(), capture=True)
    disk.sparse_copy_into(root_img, out, parts[0].start)
    disk.sparse_copy_into(hash_dev, out, parts[1].start)
    return out


def verity_boot(a: dict[str, Path], initrd: Path, disks: list[Path], words: list[str], until,
                timeout: float = 600):
    cmdline = qemu.kernel_cmdline(consoles=(qemu.SERIAL_CONSOLE,), extra=words)
    settings = qemu.VmSettings(memory_mib=1024, cpus=1, accel=qemu.Accel.TCG, network=False)
    cmd = qemu.qemu_cmd(qemu.Mode.TGZ, settings=settings, disk=disks[0], kernel=a["vmlinux"], initrd=initrd,
                        cmdline=cmdline)
    for i, extra in enumerate(disks[1:]):
        cmd += ["-drive", f"if=none,id=extra{i},file={qemu.qemu_opt(extra)},format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive=extra{i}"]
    return watch(cmd, until, timeout)


def welcome_or_verity_failure(console: str) -> bool:
    """systemd's welcome from the verified root, or a whole ldt-verity line that is no success."""
    whole_lines = console.splitlines()[:-1]  # the last may still be arriving
    return "Welcome to" in console or any(
        "ldt-verity: " in line and "verified by" not in line for line in whole_lines)


def test_root_opens_through_verity(verity_env) -> None:
    tmp, a, initrd, hash_dev, v = verity_env
    img = verity_disk(a["rootfs.ext4"], hash_dev, v, tmp / "verity.img")
    root_uuid, hash_uuid = v.partition_uuids
    words = v.ldt_cmdline(f"PARTUUID={root_uuid}", f"PARTUUID={hash_uuid}")
    result = verity_boot(a, initrd, [img], words,
                         until=welcome_or_verity_failure)
    img.unlink()
    print(f"verity root: systemd's welcome after {result.seconds:.1f}s")
    tail = result.console[-3000:]
    assert "ldt-verity: root opened: /dev/vda1 verified by /dev/vda2" in result.console, tail
    assert "Welcome to" in result.console, tail  # init ran from the verified root
    assert "is corrupted" not in result.console


def test_a_changed_byte_in_the_root_fails_the_read(verity_env) -> None:
    tmp, a, initrd, hash_dev, v = verity_env
    overlay = tmp / "tampered.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.fspath(a["rootfs.ext4"]), overlay])
    # ext4's volume name (superblock at 1024, s_volume_name at 0x78): the file system stays valid
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x58 {1024 + 0x78} 1", overlay], capture=True)
    result = verity_boot(a, initrd, [overlay, hash_dev], v.ldt_cmdline("/dev/vda", "/dev/vdb"),
                         until=lambda c: "is corrupted" in c or "Welcome to" in c, timeout=400)
    print(f"tampered verity root: {'refused' if 'is corrupted' in result.console else '?'} "
          f"after {result.seconds:.1f}s")
    assert "is corrupted" in result.console, result.console[-3000:]  # device-mapper: verity: ... data block 0
    assert "Welcome to" not in result.console


def test_an_app_on_our_initrd_opens_its_verity_root(tmp_path: Path) -> None:
    """webapp (no kernel of its own: virt's, with our initrd) with [disk] verity, through doit: our
    initrd finds the root and its tree by PARTUUID (reading the GPT itself), opens the root with the
    build host's dmsetup, and the app serves from the read-only root."""
    require_docker()
    files = lambda name: {f.name: f.read_text() for f in (ROOT / "recipes" / name).iterdir() if f.is_file()}  # noqa: E731
    web = files("webapp")
    web["recipe.toml"] = web.get("recipe.toml", "") + "\n[disk]\nverity = true\n"
    proj = make_project(tmp_path / "p", {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}, "virt": files("virt"),
                                         "webapp": web})
    doit("build_efistub:webapp", cwd=proj)
    img = (proj / "cache" / "recipes" / "webapp" / "uefi.img").resolve()
    ovmf = firmware.find_ovmf()
    vars_copy = tmp_path / "vars.fd"
    shutil.copyfile(ovmf.vars_template, vars_copy)
    settings = qemu.VmSettings(memory_mib=1024, cpus=1, accel=qemu.Accel.TCG, network=False)
    cmd = qemu.qemu_cmd(qemu.Mode.UEFI, settings=settings, disk=img, ovmf=ovmf, ovmf_vars=vars_copy)
    result = watch(cmd, lambda c: "Serving HTTP" in c or "ldt-initrd: " in c, 400)
    print(f"webapp on a verity root: serving after {result.seconds:.1f}s")
    tail = result.console[-3000:]
    assert verity.OPENED_LINE in result.console, tail
    assert "Serving HTTP" in result.console, tail
