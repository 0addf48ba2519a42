"""The files the stages make: one name each, the same in the store, the pointers and doit's targets."""

from __future__ import annotations

import enum


class Artifact(enum.StrEnum):
    """A file a stage makes; its value is the file name in the entry and under cache/recipes/<name>/."""

    TGZ = "rootfs.tgz"
    APP = "app.json"  # what the VM runs: the image's app (or none), its init, ports, the image's kernels
    APP_FILES = "app.tar"  # the files that make the root filesystem run it (our init, or a systemd unit)
    KERNEL = "vmlinuz"
    VMLINUX = "vmlinux"  # the kernel tgz mode boots: uncompressed, through its PVH entry (or vmlinuz as is)
    INITRD = "initrd.img"
    OS_RELEASE = "os-release"
    MODULES = "modules.tar"  # a borrowed kernel's /lib/modules/<version> (empty: the image's own kernel)
    EXT4 = "rootfs.ext4"
    BIOS_IMG = "bios.img"
    UEFI_IMG = "uefi.img"
    SB_VARS = "sb-vars.fd"  # OVMF's variable store with your PK, KEK and db enrolled, Secure Boot on
    BIOS_QCOW2 = "bios.qcow2"
    UEFI_QCOW2 = "uefi.qcow2"
    FAST_KERNEL = "fast.kernel"  # virt's kernel: the uncompressed vmlinux when QEMU can boot it (PVH)
    FAST_INITRD = "fast.initrd"  # virt's initrd: one uncompressed archive, only the modules it loads


EPOCH = "epoch"  # in a tgz entry: the time every later image stage stamps into its files
