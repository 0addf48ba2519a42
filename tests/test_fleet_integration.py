"""A CI fleet sharing the store through a real registry (CNCF distribution on 127.0.0.1):
runner A builds and pushes, runner B starts from an empty cache and pulls everything without
a docker build, byte for byte; and the faults: registry down, a damaged blob in the registry,
a byte flipped in a local entry, a push cut off when the registry stops."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import BOOTSTRAP_TOML, DOIT, ROOT, doit, make_project, on_console, require_docker
from registry import serve

pytestmark = pytest.mark.integration

HELLO = {name: (ROOT / "recipes" / "hello" / name).read_text() for name in ("Dockerfile", "recipe.toml")}
RECIPES = {"debian-bookworm": {"recipe.toml": BOOTSTRAP_TOML}, "hello": HELLO}
DISKS = ("rootfs.tgz", "vmlinuz", "initrd.img", "rootfs.ext4", "bios.img", "uefi.img")
BUILD_DISKS = ("build_syslinux_bios:hello", "build_efistub:hello")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def digests(project: Path) -> dict[str, str]:
    return {n: sha256(project / "cache" / "recipes" / "hello" / n) for n in DISKS}


def runner(project: Path, url: str, *args: str, push: bool = True) -> subprocess.CompletedProcess:
    env = {"LDT_REMOTE": url, "LDT_REMOTE_PUSH": "1" if push else "0"}
    return doit(*args, cwd=project, env=env)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A registry, and runner A's project (its store seeded from the repository's) pushed to it."""
    require_docker()
    doit(*BUILD_DISKS)  # the repository's own hello, so A's stages are store hits
    base = tmp_path_factory.mktemp("fleet")
    with serve(base / "registry") as reg:
        a = make_project(base / "a", RECIPES)
        out = runner(a, reg.url, *BUILD_DISKS, "check_boot:hello")
        yield reg, a, out


def test_runner_a_pushes_every_entry(fleet):
    reg, a, out = fleet
    text = out.stdout + out.stderr
    for stage in ("tgz", "boot", "ext4", "bios", "uefi", "check"):
        pushed = re.findall(rf"^ldt: {stage}:([0-9a-f]{{12}}) pushed to {reg.url}$", text, re.M)
        assert pushed, (stage, text[-3000:])
        tags = requests.get(f"http://{reg.host}/v2/ldt/{stage}/tags/list", timeout=5).json()["tags"]
        assert {t[:12] for t in tags} >= set(pushed), stage
    listing = doit("store", cwd=a, env={"LDT_REMOTE": reg.url}).stdout
    hello = [ln for ln in listing.splitlines() if "hello/" in ln]
    assert len(hello) >= 5 and all(" local+remote " in ln for ln in hello), listing


def test_runner_b_pulls_everything_without_building(fleet, tmp_path):
    reg, a, _ = fleet
    b = make_project(tmp_path / "b", RECIPES, seed_store=False)
    out = runner(b, reg.url, *BUILD_DISKS, push=False)
    text = out.stdout + out.stderr
    assert ": docker build " not in text and "ldt: bootstrap " not in text, text[-3000:]  # no build, no mmdebstrap
    assert text.count("pulled from") >= 6, text[-3000:]  # both tgz, boot, ext4, bios, uefi
    pulled = re.findall(r"^ldt: (\w+:[0-9a-f]{12}) pulled from ", text, re.M)
    assert len(pulled) == len(set(pulled)), pulled  # a run fetches each entry at most once
    assert digests(b) == digests(a)  # byte-identical artifacts
    check = doit("check_boot:hello", cwd=b, env={"LDT_REMOTE": reg.url, "LDT_REMOTE_PUSH": "0"})
    rows = [line.split() for line in check.stdout.splitlines() if line.startswith("hello ")]
    assert [(r[1], r[2]) for r in rows] == [("tgz", "pass"), ("bios", "pass"), ("uefi", "pass")], check.stdout
    assert check.stdout.count("(cached)") == 3, check.stdout  # (the in-image check's rows come with their mode)
    assert "booting" not in check.stderr  # the fleet's passes: B boots nothing

    # a byte flipped in one of B's entries: found, named, re-pulled; the damaged file is never booted
    ext4 = (b / "cache" / "recipes" / "hello" / "rootfs.ext4").resolve()
    os.chmod(ext4, 0o644)
    with open(ext4, "r+b") as f:
        f.seek(1024 + 100)  # inside the ext4 superblock
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = doit("check_boot:hello", cwd=b, env={"LDT_REMOTE": reg.url, "LDT_REMOTE_PUSH": "0"})
    text = again.stdout + again.stderr
    assert f"store entry ext4/{ext4.parent.name} has a changed rootfs.ext4" in text, text[-3000:]
    assert "pulled from" in text and "booting" not in text
    assert digests(b) == digests(a)


def test_registry_down_is_one_warning_and_a_local_build(tmp_path):
    require_docker()
    c = make_project(tmp_path / "c", RECIPES)
    out = runner(c, "oci://127.0.0.1:9/ldt", "extract_boot:hello")  # port 9: nothing listens
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "warning" in ln]
    assert len(lines) == 1 and "127.0.0.1:9" in lines[0], lines
    assert (c / "cache" / "recipes" / "hello" / "vmlinuz").is_file()


def test_a_damaged_blob_in_the_registry_is_found_and_built_locally(fleet, tmp_path):
    reg, a, _ = fleet
    with serve(tmp_path / "registry") as own:  # its own registry: the damage stays in this test
        runner(a, own.url, "--always-execute", "extract_boot:hello")  # store hits, shared with `own`
        key = (a / "cache" / "recipes" / "hello" / "vmlinuz").resolve().parent.name
        manifest = requests.get(f"http://{own.host}/v2/ldt/boot/manifests/{key}", timeout=5,
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        tgz_key = (a / "cache" / "recipes" / "hello" / "rootfs.tgz").resolve().parent.name
        tgz = requests.get(f"http://{own.host}/v2/ldt/tgz/manifests/{tgz_key}", timeout=5,
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        # the packs only the boot entry uses (its index's blocks; its files' data is the tgz's): every
        # byte after the magic flipped, so whichever frame a pull fetches is damaged
        theirs = {d["digest"] for d in tgz["layers"]}
        own_packs = [d["digest"] for d in manifest["layers"]
                     if d["mediaType"] == "application/vnd.ldt.pack.v1" and d["digest"] not in theirs]
        assert own_packs, manifest
        for digest in own_packs:
            data = own.blob_data(digest)
            blob = data.read_bytes()
            data.write_bytes(blob[:8] + bytes(b ^ 0xFF for b in blob[8:]))
        d = make_project(tmp_path / "d", RECIPES, seed_store=False)
        out = runner(d, own.url, "extract_boot:hello", push=False)
        text = out.stdout + out.stderr
        assert f"remote entry boot:{key[:12]} is unusable" in text, text[-3000:]
        assert sha256(d / "cache" / "recipes" / "hello" / "vmlinuz") == digests(a)["vmlinuz"]


def test_a_push_cut_off_leaves_no_tag_and_store_push_completes_it(fleet, tmp_path):
    _, a, _ = fleet
    e = make_project(tmp_path / "e", RECIPES)
    storage = tmp_path / "registry"
    with serve(storage) as first:
        proc = subprocess.Popen([*DOIT, *BUILD_DISKS], cwd=e, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env={**os.environ, "LDT_REMOTE": first.url})
        uploads = storage / "storage" / "docker" / "registry" / "v2" / "repositories"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(uploads.glob("ldt/*/_uploads/*")):
            time.sleep(0.05)
        first.proc.terminate()  # the registry goes away mid-push
        out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("warning") == 1, out[-3000:]
    v2 = storage / "storage" / "docker" / "registry" / "v2"

    def blob(digest: str) -> Path:
        hexa = digest.split(":", 1)[1]
        return v2 / "blobs" / "sha256" / hexa[:2] / hexa / "data"

    for stage in ("tgz", "boot", "ext4", "bios", "uefi"):  # no tag may name blobs the registry lacks
        for tag in (v2 / "repositories" / "ldt" / stage / "_manifests" / "tags").glob("*"):
            manifest = json.loads(blob((tag / "current" / "link").read_text()).read_bytes())
            assert all(blob(layer["digest"]).is_file() for layer in [manifest["config"], *manifest["layers"]])
    with serve(storage) as second:  # the same storage, back again: a later run completes the push
        again = runner(e, second.url, "--always-execute", *BUILD_DISKS)
        assert "warning" not in again.stdout + again.stderr
        f = make_project(tmp_path / "f", RECIPES, seed_store=False)
        runner(f, second.url, *BUILD_DISKS, push=False)
        assert digests(f) == digests(a)


def test_store_push_shares_what_a_run_could_not(tmp_path):
    from pipeline.cache import Store

    project = make_project(tmp_path / "p", {}, seed_store=False)
    store = Store(project / "cache")
    for key in ("aaaa1111", "bbbb2222"):
        with store.build("tgz", key, {"k": key}) as work:
            (work / "rootfs.tgz").write_bytes(key.encode() * 1000)
    with serve(tmp_path / "registry") as reg:
        out = doit("store_push", cwd=project, env={"LDT_REMOTE": reg.url})
        assert "2 entries pushed" in out.stdout
        assert "0 entries pushed" in doit("store_push", cwd=project, env={"LDT_REMOTE": reg.url}).stdout
        tags = requests.get(f"http://{reg.host}/v2/ldt/tgz/tags/list", timeout=5).json()["tags"]
        assert sorted(tags) == ["aaaa1111", "bbbb2222"]


def test_publish_and_boot_a_published_image(fleet, tmp_path):
    reg, a, _ = fleet
    out = doit("publish:hello", "--tag", "v1", cwd=a, env={"LDT_REMOTE": reg.url}).stdout
    refs = [ln for ln in out.splitlines() if ln.startswith("oci://")]
    assert len(refs) == 2 and refs[1].endswith("/ldt/hello:v1") and ":k-" in refs[0], out
    manifest = requests.get(f"http://{reg.host}/v2/ldt/hello/manifests/v1", timeout=5,
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    notes = manifest["annotations"]
    assert notes["vnd.ldt.recipe"] == "hello" and notes["vnd.ldt.os-release.name"].startswith("Debian")
    assert notes["vnd.ldt.kernel.version"].endswith("-amd64")
    titles = sorted(d["annotations"]["org.opencontainers.image.title"] for d in manifest["layers"])
    assert titles == sorted(f"{n}.zst" for n in ("bios.img", "uefi.img", "vmlinuz", "initrd.img", "rootfs.tgz"))
    # a consumer: `run-uefi oci://…` pulls the published disk (verified) into its store and boots it
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    argv = [sys.executable, "-c", "from pipeline.cli import run_uefi; run_uefi()", refs[1], "--no-net"]
    os.environ["LDT_ROOT"] = str(consumer)
    try:
        seen, status = on_console(argv, cwd=consumer)
    finally:
        del os.environ["LDT_ROOT"]
    assert status == 0 and b"login: " in seen
    (entry,) = (consumer / "cache" / "store" / "published").iterdir()
    assert sha256(entry / "uefi.img") == digests(a)["uefi.img"]
