"""dm-verity for real: hello's ext4 root with a hash tree beside it, opened at boot by hello's own
initramfs-tools initrd with pipeline/guest/verity-local-top.sh added (what a hook would put in
it: the script, dm-verity and its modules); a byte changed in the root makes the read fail.

The initrd here is hello's with one uncompressed cpio appended (the kernel unpacks every archive
of an initrd in turn), so the test needs no image rebuild; booted straight into the kernel (tgz
mode, the same as `doit run_tgz`), the root and its hash tree as two virtio disks.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from console import watch

from pipeline import initramfs, qemu, verity
from pipeline.run import run

pytestmark = pytest.mark.integration

LOCAL_TOP = Path(__file__).resolve().parent.parent / "pipeline" / "guest" / "verity-local-top.sh"
VERITY_MODULES = ("kernel/drivers/md/dm-verity.ko", "kernel/drivers/md/dm-bufio.ko",
                  "kernel/lib/reed_solomon/reed_solomon.ko")
MODULE_INDEXES = ("modules.dep", "modules.dep.bin", "modules.alias", "modules.alias.bin", "modules.softdep",
                  "modules.symbols", "modules.symbols.bin", "modules.builtin", "modules.builtin.bin",
                  "modules.builtin.alias.bin", "modules.order")
ORDER = '/scripts/local-top/ldt-verity "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'


def verity_overlay(tgz: Path, version: str) -> bytes:
    """The cpio a hook would add: the local-top script and its ORDER, dm-verity with its
    dependencies, and the module indexes of the whole tree (so modprobe finds them)."""
    base = f"usr/lib/modules/{version}"
    wanted = {f"{base}/{m}" for m in (*VERITY_MODULES, *MODULE_INDEXES)}
    files: dict[str, bytes] = {}
    with tarfile.open(tgz) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in wanted and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                files[name] = f.read()
    missing = wanted - set(files)
    assert not missing, missing
    files["scripts/local-top/ldt-verity"] = LOCAL_TOP.read_bytes()
    files["scripts/local-top/ORDER"] = ORDER.encode()
    return initramfs.make_cpio(files)


@pytest.fixture(scope="module")
def verity_env(hello_artifacts: dict[str, Path], hello_tgz: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("verity")
    a = hello_artifacts
    version = initramfs.kernel_version(a["vmlinuz"].read_bytes())
    assert version
    initrd = tmp / "initrd-verity.img"
    base = a["initrd.img"].read_bytes()
    initrd.write_bytes(base + b"\0" * (-len(base) % 512) + verity_overlay(hello_tgz, version))
    hash_dev = tmp / "rootfs.verity"
    v = verity.format_verity(a["rootfs.ext4"], hash_dev, verity.VerityParams.from_key("verity-test"))
    return tmp, a, initrd, hash_dev, v


def verity_boot(tmp: Path, a: dict[str, Path], initrd: Path, data: Path, hash_dev: Path, v: verity.Verity,
                until, timeout: float = 600):
    cmdline = qemu.kernel_cmdline(consoles=(qemu.SERIAL_CONSOLE,), extra=v.ldt_cmdline("/dev/vda", "/dev/vdb"))
    settings = qemu.VmSettings(memory_mib=1024, cpus=1, accel=qemu.Accel.TCG, network=False)
    cmd = qemu.qemu_cmd(qemu.Mode.TGZ, settings=settings, disk=data, kernel=a["vmlinux"], initrd=initrd,
                        cmdline=cmdline)
    cmd += ["-drive", f"if=none,id=hash,file={qemu.qemu_opt(hash_dev)},format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=hash"]
    return watch(cmd, until, timeout)


def test_root_opens_through_verity(verity_env) -> None:
    tmp, a, initrd, hash_dev, v = verity_env
    result = verity_boot(tmp, a, initrd, a["rootfs.ext4"], hash_dev, v,
                         until=lambda c: "Welcome to" in c or "ldt-verity: " in c and "verified" not in c)
    print(f"verity root: systemd's welcome after {result.seconds:.1f}s")
    tail = result.console[-3000:]
    assert "ldt-verity: root /dev/vda verified by /dev/vdb" in result.console, tail
    assert "Welcome to" in result.console, tail  # init ran from the verified root
    assert "is corrupted" not in result.console


def test_a_changed_byte_in_the_root_fails_the_read(verity_env) -> None:
    tmp, a, initrd, hash_dev, v = verity_env
    overlay = tmp / "tampered.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.fspath(a["rootfs.ext4"]), overlay])
    # ext4's volume name (superblock at 1024, s_volume_name at 0x78): the file system stays valid
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x58 {1024 + 0x78} 1", overlay], capture=True)
    result = verity_boot(tmp, a, initrd, overlay, hash_dev, v, until=lambda c: "is corrupted" in c
                         or "Welcome to" in c, timeout=400)
    print(f"tampered verity root: {'refused' if 'is corrupted' in result.console else '?'} "
          f"after {result.seconds:.1f}s")
    assert "is corrupted" in result.console, result.console[-3000:]  # device-mapper: verity: ... data block 0
    assert "Welcome to" not in result.console
