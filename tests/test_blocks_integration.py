"""The block layer on hello's real images: the forms share their blocks, and come back byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.entries import file_record
from pipeline.packs import BlockStore

MiB = 1 << 20


def sha256(path: Path) -> str:
    return file_record(path)["sha256"]


@pytest.mark.integration
def test_hello_tgz_and_disks_cost_little_on_top_of_its_ext4(hello_artifacts: dict[str, Path], tmp_path: Path):
    tgz, ext4, bios = hello_artifacts["rootfs.tgz"], hello_artifacts["rootfs.ext4"], hello_artifacts["bios.img"]
    store = BlockStore(tmp_path / "store")
    store.put(ext4)
    after_ext4 = store.stats().stored
    index_tgz = store.put(tgz)
    after_tgz = store.stats().stored
    assert index_tgz.gzip is not None, "the tgz was not reproduced by its compressor; stored as compressed bytes"
    # measured: 0.8 MiB (headers) on top of the ext4, where the compressed tgz alone is 235 MiB
    assert after_tgz - after_ext4 < tgz.stat().st_size // 20
    index_bios = store.put(bios)
    # measured: bios.img holds about 45 MiB the ext4 lacks (its FAT: kernel and initrd) of 1.2 GiB
    assert store.stats().stored - after_tgz < 80 * MiB
    out = store.materialize(index_tgz, tmp_path / "rootfs.tgz")
    assert sha256(out) == sha256(tgz)
    out = store.materialize(index_bios, tmp_path / "bios.img")
    assert sha256(out) == sha256(bios)
    assert out.stat().st_blocks * 512 < bios.stat().st_blocks * 512 + MiB  # as sparse as the original
