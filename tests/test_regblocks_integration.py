"""Entries as blocks in a real registry (CNCF distribution, tests/registry.py): byte counts of
what a push stores and what a pull fetches, with small synthetic entries whose files share and
change 4 KiB blocks."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import requests
from registry import auth_registry, registry  # noqa: F401 - fixtures

from pipeline import entries, oci, regblocks, remote
from pipeline.entries import EntryCorrupt
from pipeline.errors import UserError
from pipeline.oci import Remote
from pipeline.packs import BlockStore

pytestmark = pytest.mark.integration

NO_CREDS = {"DOCKER_CONFIG": "/nonexistent"}
KIB4 = 4096


def blocks(seed: int, n: int) -> list[bytes]:
    """n incompressible 4 KiB blocks (the worst case for the bytes a change costs)."""
    rnd = random.Random(seed)
    return [rnd.randbytes(KIB4) for _ in range(n)]


def make_entry(path: Path, files: dict[str, bytes], **inputs: object) -> Path:
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {"inputs": inputs, "files": entries.file_records(path)}
    (path / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
    return path


def stored(reg) -> int:
    """Bytes of every blob the registry holds (distribution keeps one copy of each)."""
    root = reg.root / "docker/registry/v2/blobs"
    return sum(p.stat().st_size for p in root.rglob("data")) if root.is_dir() else 0


def pull(r: Remote, stage: str, key: str, work: Path, bs: BlockStore) -> regblocks.Fetched:
    fetched = regblocks.Fetched()
    work.mkdir()
    assert remote.pull_entry(r, stage, key, work, env=NO_CREDS, blocks=bs, fetched=fetched) is True
    return fetched


def same_files(entry: Path, work: Path) -> None:
    names = sorted(p.name for p in entry.iterdir())
    assert sorted(p.name for p in work.iterdir()) == names
    for n in names:
        assert (work / n).read_bytes() == (entry / n).read_bytes(), n


def test_a_one_block_change_stores_and_fetches_about_one_block(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    base = blocks(1, 512)  # 2 MiB
    disk1 = b"".join(base) + bytes(1 << 20)  # and a 1 MiB hole
    edited = list(base)
    edited[200] = blocks(2, 1)[0]
    disk2 = b"".join(edited) + bytes(1 << 20)
    a = BlockStore(tmp_path / "a-blocks")
    e1 = make_entry(tmp_path / "e1", {"disk.img": disk1, "small": b"hello\n"}, rev=1)
    e2 = make_entry(tmp_path / "e2", {"disk.img": disk2, "small": b"hello\n"}, rev=2)

    before = stored(registry)
    assert remote.push_entry(r, "rev", "k1", e1, env=NO_CREDS, blocks=a) is True
    first = stored(registry) - before
    assert len(disk1) - (1 << 20) < first < len(disk1) - (1 << 20) + 64 * KIB4  # the data once, the hole free
    assert remote.push_entry(r, "rev", "k2", e2, env=NO_CREDS, blocks=a) is True
    second = stored(registry) - first - before
    assert second < 8 * KIB4, second  # one new block in one new pack, an index blob, manifest.json

    b = BlockStore(tmp_path / "b-blocks")  # runner B: an empty store
    got1 = pull(r, "rev", "k1", tmp_path / "w1", b)
    same_files(e1, tmp_path / "w1")
    assert got1.bytes < first + 16 * KIB4
    got2 = pull(r, "rev", "k2", tmp_path / "w2", b)
    same_files(e2, tmp_path / "w2")
    assert got2.bytes < 8 * KIB4, got2  # the new block's tiny pack and the changed index chunk's, whole

    e3 = make_entry(tmp_path / "e3", {"part": b"".join(base[:16])}, rev=3)  # one frame of rev 1's big pack
    remote.push_entry(r, "rev", "k3", e3, env=NO_CREDS, blocks=a)
    got3 = pull(r, "rev", "k3", tmp_path / "w3", BlockStore(tmp_path / "c-blocks"))
    same_files(e3, tmp_path / "w3")
    # that frame by one Range request, and the file's small pack of index chunks whole
    assert got3.whole_packs == 1 and got3.requests == 2, got3
    assert got3.bytes < 20 * KIB4, got3


def test_two_entries_sharing_blocks_store_them_once(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    shared, own = blocks(3, 256), blocks(4, 16)
    bs = BlockStore(tmp_path / "blocks")
    before = stored(registry)
    remote.push_entry(r, "rowa", "k1", make_entry(tmp_path / "a", {"rootfs.ext4": b"".join(shared)}), env=NO_CREDS,
                      blocks=bs)
    one = stored(registry) - before
    remote.push_entry(r, "rowb", "k1", make_entry(tmp_path / "b", {"bios.img": b"".join(own + shared)}),
                      env=NO_CREDS, blocks=bs)
    two = stored(registry) - before - one
    assert two < len(own) * KIB4 + 8 * KIB4, (one, two)


def test_a_second_runner_finds_identical_packs_by_head(registry, tmp_path):  # noqa: F811
    """Packs are deterministic: a runner with an empty block store pushing the same blocks sends no pack."""
    r = Remote.parse(registry.url)
    data = b"".join(blocks(5, 64))
    remote.push_entry(r, "twice", "k1", make_entry(tmp_path / "a", {"f": data}, n=1), env=NO_CREDS)
    before = stored(registry)
    remote.push_entry(r, "twice", "k2", make_entry(tmp_path / "b", {"f": data}, n=2), env=NO_CREDS)
    assert stored(registry) - before < 2 * KIB4


def test_the_registry_serves_ranges_and_the_manifest_names_every_pack(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    remote.push_entry(r, "shape", "k1", make_entry(tmp_path / "e", {"f": b"".join(blocks(6, 40))}), env=NO_CREDS)
    doc = requests.get(f"http://{registry.host}/v2/ldt/shape/manifests/k1", timeout=5,
                       headers={"Accept": oci.OCI_MANIFEST}).json()
    assert doc["artifactType"] == regblocks.ARTIFACT_TYPE
    packs = [d["digest"] for d in doc["layers"] if d["mediaType"] == regblocks.PACK_TYPE]
    assert len(packs) == 2  # the file's blocks, its index's blocks
    for repo in ("ldt/shape", "ldt/blocks"):  # uploaded to blocks, mounted into the entry's repository
        got = requests.get(f"http://{registry.host}/v2/{repo}/blobs/{packs[0]}", headers={"Range": "bytes=0-7"},
                           timeout=5)
        assert got.status_code == 206 and got.content == b"LDTPACK1"


def test_a_damaged_pack_in_the_registry_is_entry_corrupt(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    e = make_entry(tmp_path / "e", {"f": b"".join(blocks(7, 64))})
    remote.push_entry(r, "damaged", "k1", e, env=NO_CREDS)
    doc = requests.get(f"http://{registry.host}/v2/ldt/damaged/manifests/k1", timeout=5,
                       headers={"Accept": oci.OCI_MANIFEST}).json()
    pack = next(d["digest"] for d in doc["layers"] if d["mediaType"] == regblocks.PACK_TYPE)
    data = registry.blob_data(pack)
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF  # inside the first frame
    os.chmod(data, 0o644)
    data.write_bytes(bytes(raw))
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(EntryCorrupt, match="damaged"):
        remote.pull_entry(r, "damaged", "k1", work, env=NO_CREDS, blocks=BlockStore(tmp_path / "fresh"))
    assert list(work.iterdir()) == []


def test_a_push_cut_off_leaves_no_tag_and_the_next_completes_it(registry, tmp_path, monkeypatch):  # noqa: F811
    r = Remote.parse(registry.url)
    e = make_entry(tmp_path / "e", {"f": b"".join(blocks(8, 64)), "g": b"".join(blocks(9, 8))})
    bs = BlockStore(tmp_path / "blocks")
    real = oci.upload_bytes

    def cut(*args, **kwargs):  # the packs are up; the push dies before the index blobs and the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(oci, "upload_bytes", cut)
    with pytest.raises(KeyboardInterrupt):
        remote.push_entry(r, "cut", "k1", e, env=NO_CREDS, blocks=bs)
    assert remote.pull_entry(r, "cut", "k1", tmp_path, env=NO_CREDS) is False  # no tag
    monkeypatch.setattr(oci, "upload_bytes", real)
    before = stored(registry)
    assert remote.push_entry(r, "cut", "k1", e, env=NO_CREDS, blocks=bs) is True
    assert stored(registry) - before < 4 * KIB4  # the packs were there already
    pull(r, "cut", "k1", tmp_path / "w", BlockStore(tmp_path / "fresh"))
    same_files(e, tmp_path / "w")


def test_a_manifest_put_refused_for_a_blob_a_concurrent_pusher_is_linking_is_tried_again(
        registry, tmp_path, monkeypatch):  # noqa: F811
    """Distribution writes a blob's link file in place: a second pusher of the same blob can make a
    manifest PUT read it empty (DIGEST_INVALID,MANIFEST_BLOB_UNKNOWN). The push checks its blobs
    again and puts the manifest once more."""
    from pipeline.entries import RemoteUnavailable

    r = Remote.parse(registry.url)
    e = make_entry(tmp_path / "e", {"f": b"".join(blocks(12, 16))})
    real, refused = oci.Client.request, []

    def request(self, method, url, **kwargs):
        if method == "PUT" and "/manifests/" in url and not refused:
            refused.append(url)
            raise RemoteUnavailable(f"remote store {registry.host} answered 400 to PUT {url} "
                                    "DIGEST_INVALID,MANIFEST_BLOB_UNKNOWN")
        return real(self, method, url, **kwargs)

    monkeypatch.setattr(oci.Client, "request", request)
    assert remote.push_entry(r, "again", "k1", e, env=NO_CREDS, blocks=BlockStore(tmp_path / "blocks")) is True
    assert refused
    monkeypatch.setattr(oci.Client, "request", real)
    pull(r, "again", "k1", tmp_path / "w", BlockStore(tmp_path / "fresh"))
    same_files(e, tmp_path / "w")


def test_a_pack_the_map_names_but_the_registry_lost_is_sent_again(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    data = blocks(10, 32)
    bs = BlockStore(tmp_path / "blocks")
    remote.push_entry(r, "lost", "k1", make_entry(tmp_path / "a", {"f": b"".join(data)}, n=1), env=NO_CREDS, blocks=bs)
    doc = requests.get(f"http://{registry.host}/v2/ldt/lost/manifests/k1", timeout=5,
                       headers={"Accept": oci.OCI_MANIFEST}).json()
    pack = next(d["digest"] for d in doc["layers"] if d["mediaType"] == regblocks.PACK_TYPE)
    for repo in ("ldt/lost", "ldt/blocks"):
        assert requests.delete(f"http://{registry.host}/v2/{repo}/blobs/{pack}", timeout=5).status_code == 202
    for p in bs.packs.glob("*.pack"):  # and this runner's copy is gone too (store_gc swept it)
        p.unlink()
    e2 = make_entry(tmp_path / "b", {"f": b"".join(data[:31] + blocks(11, 1))}, n=2)
    assert remote.push_entry(r, "lost", "k2", e2, env=NO_CREDS, blocks=bs) is True
    pull(r, "lost", "k2", tmp_path / "w", BlockStore(tmp_path / "fresh"))
    same_files(e2, tmp_path / "w")


def test_an_entry_of_the_old_layout_is_still_pulled(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    e = make_entry(tmp_path / "e", {"f": b"".join(blocks(12, 8)), "empty": b""})
    config_raw = (e / "manifest.json").read_bytes()
    records = json.loads(config_raw)["files"]
    with oci.client(r, NO_CREDS) as c:
        config, layers = oci.push_blobs(c, "ldt/old", config_raw, {n: (e / n, records[n]) for n in records}, tmp_path)
        raw = remote.image_manifest("old", "k1", config, layers)
        c.request("PUT", "/ldt/old/manifests/k1", ok=(201,), data=raw,
                  headers={"Content-Type": oci.OCI_MANIFEST}).close()
    work = tmp_path / "w"
    work.mkdir()
    assert remote.pull_entry(r, "old", "k1", work, env=NO_CREDS) is True
    same_files(e, work)


def test_store_push_with_a_wrong_password_says_the_credentials_were_refused(auth_registry, tmp_path, capfd):  # noqa: F811
    from pipeline.cache import Store
    from pipeline.remote import RegistryStore

    e = make_entry(tmp_path / "cache" / "store" / "thing" / "k1", {"f": b"x" * 5000})
    env = {**NO_CREDS, "LDT_REMOTE_USER": auth_registry.user, "LDT_REMOTE_PASSWORD": "wrong-one"}
    store = Store(tmp_path / "cache", RegistryStore(Remote.parse(auth_registry.url), env=env))
    with pytest.raises(UserError, match="refused the credentials") as err:
        store.push_all()
    assert "\n" not in err.value.message and "went away" not in err.value.message
    assert capfd.readouterr().err == ""  # that one line, no warning before it
    assert e.is_dir()


def head(reg, path: str) -> int:
    return requests.head(f"http://{reg.host}/v2/{path}", timeout=5,
                         headers={"Accept": oci.OCI_MANIFEST}).status_code


def packs_of(reg, repo: str, key: str) -> list[str]:
    doc = requests.get(f"http://{reg.host}/v2/{repo}/manifests/{key}", timeout=5,
                       headers={"Accept": oci.OCI_MANIFEST}).json()
    return [d["digest"] for d in doc["layers"] if d["mediaType"] == regblocks.PACK_TYPE]


def test_store_gc_remote_keeps_published_and_newly_named_packs(registry, tmp_path):  # noqa: F811
    from pipeline import reggc

    r = Remote.parse(registry.url.replace("/ldt", "/gcx"))  # a prefix of its own: the gc sees only this test
    a, b, c = blocks(20, 40), blocks(21, 40), blocks(22, 40)
    bs = BlockStore(tmp_path / "blocks")
    for key, data in (("old", a), ("gone", b), ("pub", c)):
        remote.push_entry(r, "gcrow", key, make_entry(tmp_path / key, {"f": b"".join(data)}, k=key), env=NO_CREDS,
                          blocks=bs)
    old_packs, gone_packs = packs_of(registry, "gcx/gcrow", "old"), packs_of(registry, "gcx/gcrow", "gone")
    with oci.client(r, NO_CREDS) as cl:  # a published image (publish.py) made from entry "pub"
        cfg = b"{}"
        blob = oci.Blob("sha256:" + hashlib.sha256(cfg).hexdigest(), len(cfg))
        oci.upload_bytes(cl, "gcx/hello", blob, cfg)
        doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": oci.descriptor("application/json", blob),
               "layers": [], "annotations": {"vnd.ldt.keys": json.dumps({"rootfs.tgz": "pub"})}}
        cl.request("PUT", "/gcx/hello/manifests/latest", ok=(201,), data=json.dumps(doc).encode(),
                   headers={"Content-Type": oci.OCI_MANIFEST}).close()
    t0 = 1_000_000_000.0
    first = reggc.collect(r, ["gcrow"], ["hello"], 7, now=t0, env=NO_CREDS)
    assert first.deleted == () and first.doomed == 0  # first seen now
    second = reggc.collect(r, ["gcrow"], ["hello"], 7, now=t0 + 8 * reggc.DAY, env=NO_CREDS)
    assert sorted(e.key for e in second.deleted) == ["gone", "old"] and second.kept_published == 1
    assert second.doomed == len(old_packs) + len(gone_packs) and second.packs_deleted == 0
    assert head(registry, "gcx/gcrow/manifests/old") == 404 and head(registry, "gcx/gcrow/manifests/pub") == 200
    # a runner pushes the blocks of "old" again after the gc doomed its packs: the same packs, named again
    again = make_entry(tmp_path / "again", {"f": b"".join(a)}, k="again")
    remote.push_entry(r, "gcrow", "again", again, env=NO_CREDS, blocks=bs)
    assert sorted(packs_of(registry, "gcx/gcrow", "again")) == sorted(old_packs)
    early = reggc.collect(r, ["gcrow"], ["hello"], 7, now=t0 + 8 * reggc.DAY + 60, env=NO_CREDS)
    assert early.packs_deleted == 0  # within the grace period nothing goes
    third = reggc.collect(r, ["gcrow"], ["hello"], 7, now=t0 + 9 * reggc.DAY, env=NO_CREDS)
    assert third.packs_deleted == len(gone_packs)
    for p in gone_packs:
        assert head(registry, f"gcx/blocks/blobs/{p}") == 404
    for p in old_packs:
        assert head(registry, f"gcx/blocks/blobs/{p}") == 200
    for key, entry in (("again", again), ("pub", tmp_path / "pub")):
        pull(r, "gcrow", key, tmp_path / f"w-{key}", BlockStore(tmp_path / f"fresh-{key}"))
        same_files(entry, tmp_path / f"w-{key}")
    fp = reggc.footprint(r, ["gcrow"], env=NO_CREDS)
    assert fp.entries == 2 and fp.logical == 2 * 40 * KIB4 and fp.stored < 1.2 * fp.logical


def test_one_store_gc_remote_at_a_time_and_a_dead_runs_mark_is_ignored(registry, tmp_path):  # noqa: F811
    import time

    from pipeline import reggc

    r = Remote.parse(registry.url.replace("/ldt", "/gcy"))
    with oci.client(r, NO_CREDS) as c, reggc.running(c, r):
        with pytest.raises(UserError) as e:
            reggc.collect(r, ["gcrow"], [], 7, env=NO_CREDS)
        assert "another `doit store_gc --remote` is running" in e.value.message and "\n" not in e.value.message
    reggc.collect(r, ["gcrow"], [], 7, env=NO_CREDS)  # the first run ended: its mark went with it
    with oci.client(r, NO_CREDS) as c:
        assert reggc._get_doc(c, "gcy/gc", reggc.RUNNING_TAG) is None
        reggc._put_doc(c, "gcy/gc", reggc.RUNNING_TAG, reggc.RUNNING_CONFIG,
                       {"since": time.time() - reggc.STALE - 60, "host": "gone", "pid": 1, "token": "dead"})
    reggc.collect(r, ["gcrow"], [], 7, env=NO_CREDS)
    with oci.client(r, NO_CREDS) as c:
        assert reggc._get_doc(c, "gcy/gc", reggc.RUNNING_TAG) is None


def test_store_gc_remote_compacts_a_mostly_dead_pack_safely(registry, tmp_path):  # noqa: F811
    """Entry "old" (16 shared + 112 own blocks: one pack P) is deleted; "kept" names P for the 16
    shared blocks only. The gc copies those into a new pack Q, rewrites "kept", dooms P; a runner
    that read the state before the doom pushes "late" naming P: P lives until no manifest names it."""
    from pipeline import reggc

    r = Remote.parse(registry.url.replace("/ldt", "/gcc"))
    shared, dead, own = blocks(30, 16), blocks(31, 112), blocks(32, 8)
    bs = BlockStore(tmp_path / "blocks")
    remote.push_entry(r, "crow", "old", make_entry(tmp_path / "old", {"f": b"".join(shared + dead)}), env=NO_CREDS,
                      blocks=bs)
    t0 = 1_000_000_000.0
    assert reggc.collect(r, ["crow"], [], 7, now=t0, env=NO_CREDS).compacted.packs == {}
    kept = make_entry(tmp_path / "kept", {"f": b"".join(shared + own)})
    remote.push_entry(r, "crow", "kept", kept, env=NO_CREDS, blocks=bs)
    big = {d.removeprefix("sha256:") for d in packs_of(registry, "gcc/crow", "old")} & {
        d.removeprefix("sha256:") for d in packs_of(registry, "gcc/crow", "kept")}
    assert len(big) == 1  # the pack of "old"'s data, whose first frame "kept" uses
    (p,) = big
    with oci.client(r, NO_CREDS) as c:
        listed = {e.key: e for e in reggc.entries(c, r, ["crow"])}
        before, (chunks,) = listed["kept"], listed["old"].packs - {p}  # and the pack of "old"'s index chunks
        stale_doomed = reggc.doomed_packs(c, r)  # a runner starts a push now: P is not doomed yet

    second = reggc.collect(r, ["crow"], [], 7, now=t0 + 8 * reggc.DAY, env=NO_CREDS)
    assert [e.key for e in second.deleted] == ["old"]
    done = second.compacted
    assert list(done.packs) == [p] and done.entries == 1 and done.new_packs == 1
    p_size = before.blobs["sha256:" + p]
    assert done.before == p_size and done.new_bytes < 20 * KIB4 < 112 * KIB4 < p_size - done.new_bytes
    after_packs = packs_of(registry, "gcc/crow", "kept")
    assert "sha256:" + p not in after_packs and len(after_packs) == len(before.packs)
    fp = reggc.footprint(r, ["crow"], env=NO_CREDS)
    kept_before = sum(before.blobs.values()) + before.manifest_size
    # stored shrinks by P minus Q; the rewritten index blob and manifest differ by a few bytes
    assert abs((kept_before - fp.stored) - (p_size - done.new_bytes)) < 512, (kept_before, fp.stored)
    assert fp.entries == 1 and fp.stored < 1.2 * fp.logical
    assert any("compacted 1 mostly unused packs" in line for line in reggc.collected_lines(r, second, 7))
    pull(r, "crow", "kept", tmp_path / "w-kept", BlockStore(tmp_path / "fresh-kept"))
    same_files(kept, tmp_path / "w-kept")

    # the runner that read the state before the doom: its map says P holds the shared blocks
    late = make_entry(tmp_path / "late", {"f": b"".join(shared + blocks(33, 4))})
    with oci.client(r, NO_CREDS) as c:
        regblocks.push(c, r, "crow", "late", late, bs, stale_doomed)
    assert "sha256:" + p in packs_of(registry, "gcc/crow", "late")
    fresh = make_entry(tmp_path / "fresh", {"f": b"".join(shared + blocks(34, 4))})
    remote.push_entry(r, "crow", "fresh", fresh, env=NO_CREDS, blocks=bs)  # reads the state: P is doomed
    fresh_packs = packs_of(registry, "gcc/crow", "fresh")
    assert "sha256:" + p not in fresh_packs
    (q,) = done.into[p]  # the shared blocks went to Q: this runner's map learned it from the state, none sent again
    assert "sha256:" + q in fresh_packs
    early = reggc.collect(r, ["crow"], [], 7, now=t0 + 8 * reggc.DAY + 60, env=NO_CREDS)
    assert early.packs_deleted == 0 and head(registry, f"gcc/blocks/blobs/sha256:{p}") == 200
    # "late" names P again: un-doomed, then compacted again into the same bytes as Q, and doomed
    assert list(early.compacted.packs) == [p] and early.compacted.new_bytes == done.new_bytes
    last = reggc.collect(r, ["crow"], [], 7, now=t0 + 9 * reggc.DAY, env=NO_CREDS)
    assert last.packs_deleted == 2 and last.bytes_freed == p_size + listed["old"].blobs["sha256:" + chunks]
    assert head(registry, f"gcc/blocks/blobs/sha256:{p}") == 404
    for key, entry in (("kept", kept), ("late", late), ("fresh", fresh)):
        pull(r, "crow", key, tmp_path / f"w2-{key}", BlockStore(tmp_path / f"fresh2-{key}"))
        same_files(entry, tmp_path / f"w2-{key}")
