"""resume.py without a VM: the settings a restored guest reads, the command-line pieces, the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline import qemu, resume, virt
from pipeline.cache import Store, hash_file, key_of
from pipeline.qemu import Accel


def test_run_conf_counts_its_lines_and_carries_clock_and_seed():
    settings = virt.argv_script(["sh", "-c", "echo 'a\nb'"], ro=True, net=False, term=None)
    conf = resume.run_conf(settings, seed=b"\x01\xff", now_ns=1_700_000_000_123_456_789).decode()
    head, _, body = conf.partition("\n")
    assert head == f"conf {body.count(chr(10))}"
    assert body.startswith(settings)  # a newline inside an argument is one more line, counted
    assert body.endswith("LDT_SEED=01ff\nLDT_SEC=1700000000\nLDT_NSEC=123456789\n")


def test_guest_speaks_the_hosts_protocol():
    script = virt.init_script()
    for literal in ("echo ready >&3", "echo started >&3", "${head#conf }", "LDT_SEED", "LDT_SEC", "LDT_NSEC"):
        assert literal in script
    assert resume.READY == b"ready\n" and resume.STARTED == b"started\n"


def test_ram_is_shared_while_making_and_private_when_resuming(tmp_path: Path):
    made = qemu.memory_args(tmp_path / "a,b" / resume.RAM, 1024, share=True)
    assert f"mem-path={tmp_path}/a,,b/{resume.RAM},share=on" in made[1] and "size=1024M" in made[1]
    snap = resume.Snapshot(tmp_path)
    args = qemu.resume_args(snap.ram, 512, qmp_fd=9)
    assert "share=off" in args[1] and args[-2:] == ["-incoming", "defer"]
    assert ["-chardev", "socket,id=qmp,fd=9"] == args[4:6]


def _manifest(tmp_path: Path, **over):
    files = {n: tmp_path / n for n in ("kernel", "initrd", "rootfs", "qemu")}
    for f in files.values():
        if not f.exists():
            f.write_bytes(b"x")
    args = {**files, "bios": None, "init": "#!/bin/sh\n", "memory": 1024, "cpus": 1, "accel": "tcg",
            "cmd_shape": ["qemu", "-m", "1024"], **over}  # fmt: skip
    return resume.manifest(**args)


def test_the_key_changes_with_every_input(tmp_path: Path):
    base = key_of(_manifest(tmp_path))
    assert key_of(_manifest(tmp_path)) == base
    for change in ({"memory": 2048}, {"cpus": 2}, {"accel": "kvm"}, {"init": "#!/bin/sh\n:\n"},
                   {"cmd_shape": ["qemu", "-m", "2048"]}):  # fmt: skip
        assert key_of(_manifest(tmp_path, **change)) != base, change
    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"another qemu build")  # an upgraded binary: a new key, the old state is never tried
    os.utime(qemu, ns=(1, 1))
    assert key_of(_manifest(tmp_path)) != base


def test_find_explains_a_missing_or_damaged_entry(tmp_path: Path):
    store = Store(tmp_path / "cache")
    m = _manifest(tmp_path)
    with pytest.raises(resume.NoSnapshot, match="no snapshot"):
        resume.find(store, m)
    with store.build(resume.STAGE, key_of(m), m) as work:
        for name in (resume.RAM, resume.STATE, resume.INITRD):
            (work / name).write_bytes(b"data")
        (work / resume.INFO).write_text(json.dumps({
            "sizes": {n: 4 for n in (resume.RAM, resume.STATE, resume.INITRD)},
            "state_xxh3": hash_file(work / resume.STATE)}))  # fmt: skip
    assert resume.find(store, m).entry == store.entry(resume.STAGE, key_of(m))
    (store.entry(resume.STAGE, key_of(m)) / resume.STATE).write_bytes(b"dat")
    with pytest.raises(resume.NoSnapshot, match="no snapshot"):  # the store's own check evicted it
        resume.find(store, m)
    assert not store.entry(resume.STAGE, key_of(m)).exists()


def test_the_snapshot_shape_is_a_runs_command_with_placeholders(tmp_path: Path):
    m = virt.machine(virt.VirtOptions(ro=True), kernel=tmp_path / "k", rootfs=tmp_path / "r", accel=Accel.TCG)
    shape = resume.shape(m.canonical())
    assert "socket,id=control,fd=103" in shape and "-append" in shape
    assert not any("readonly=on" in a for a in shape)  # --ro is a per-run choice, made after the restore
