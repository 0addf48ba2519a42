"""pipeline.remote's pure parts: URL and credential parsing, the manifest as a value, sparse writes."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os

import pytest

from pipeline import entries, files, oci, remote
from pipeline.entries import EntryCorrupt
from pipeline.errors import UserError
from pipeline.oci import Blob, Credentials, Remote

# -- Remote.parse / from_env ---------------------------------------------------------------------


def test_parse_local_registry_speaks_http():
    r = Remote.parse("oci://127.0.0.1:5000/ldt")
    assert r == Remote(host="127.0.0.1:5000", prefix="ldt", scheme="http", push=True)
    assert r.repository("build_tgz") == "ldt/build_tgz"
    assert r.base == "http://127.0.0.1:5000/v2"
    assert Remote.parse("oci://localhost/a/b").scheme == "http"


def test_parse_other_hosts_speak_https_unless_forced():
    assert Remote.parse("oci://ghcr.io/acme/ldt-cache").scheme == "https"
    assert Remote.parse("oci+http://registry.lan:5000/x").scheme == "http"
    assert Remote.parse("oci+https://127.0.0.1:5000").scheme == "https"


def test_parse_without_prefix_uses_the_stage_as_repository():
    r = Remote.parse("oci://registry.lan:5000/")
    assert r.prefix == ""
    assert r.repository("ext4") == "ext4"
    assert str(r) == "oci://registry.lan:5000"


@pytest.mark.parametrize("url", ["http://127.0.0.1:5000/ldt", "oci://", "oci://host/UPPER", "oci://host/a//b",
                                 "oci://host/-x"])
def test_parse_rejects_bad_urls_with_a_hint(url):
    with pytest.raises(UserError) as e:
        Remote.parse(url)
    assert e.value.hint


def test_repository_rejects_stage_names_the_spec_forbids():
    with pytest.raises(ValueError):
        Remote.parse("oci://h/p").repository("Build")


def test_from_env():
    assert Remote.from_env({}) is None
    assert Remote.from_env({"LDT_REMOTE": "oci://h:1/p"}) == Remote("h:1", "p", "https", True)
    assert Remote.from_env({"LDT_REMOTE": "oci://h:1/p", "LDT_REMOTE_PUSH": "0"}).push is False
    assert Remote.from_env({"LDT_REMOTE": "oci://h:1/p", "LDT_REMOTE_PUSH": "1"}).push is True


# -- credentials ---------------------------------------------------------------------------------


def _docker_config(tmp_path, auths):
    (tmp_path / "config.json").write_text(json.dumps({"auths": auths}))
    return {"DOCKER_CONFIG": str(tmp_path)}


def _b64(s):
    return base64.b64encode(s.encode()).decode()


def test_credentials_from_docker_config_auth(tmp_path):
    env = _docker_config(tmp_path, {"other:1": {"auth": _b64("x:y")}, "reg.lan:5000": {"auth": _b64("bot:p:w")}})
    assert oci.credentials("reg.lan:5000", env) == Credentials("bot", "p:w")
    assert oci.credentials("reg.lan", env) is None


@pytest.mark.parametrize("key", ["https://reg.lan:5000", "https://reg.lan:5000/v2/", "http://reg.lan:5000/v1/"])
def test_docker_config_keys_with_scheme_and_path_match(tmp_path, key):
    env = _docker_config(tmp_path, {key: {"auth": _b64("u:p")}})
    assert oci.credentials("reg.lan:5000", env) == Credentials("u", "p")


def test_env_credentials_win_over_docker_config(tmp_path):
    env = _docker_config(tmp_path, {"reg.lan": {"auth": _b64("u:p")}})
    env |= {"LDT_REMOTE_USER": "ci", "LDT_REMOTE_PASSWORD": "secret"}
    assert oci.credentials("reg.lan", env) == Credentials("ci", "secret")


def test_no_config_file_means_no_credentials(tmp_path):
    assert oci.credentials("reg.lan", {"DOCKER_CONFIG": str(tmp_path / "none")}) is None


def test_credentials_repr_hides_the_password():
    c = Credentials("bot", "hunter2")
    assert "hunter2" not in repr(c) and "hunter2" not in str(c)


def test_unreadable_docker_auth_is_a_user_error_without_the_value(tmp_path):
    env = _docker_config(tmp_path, {"reg.lan": {"auth": "%%%notbase64"}})
    with pytest.raises(UserError) as e:
        oci.credentials("reg.lan", env)
    assert "notbase64" not in e.value.render()


def test_parse_challenge():
    scheme, params = oci.parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry",scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry", "scope": "repository:a/b:pull,push"}
    assert oci.parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# -- the manifest as a value ---------------------------------------------------------------------

CONFIG = Blob("sha256:" + "c" * 64, 120)
LAYER = Blob("sha256:" + "a" * 64, 3000)
REC = {"size": 1 << 20, "sha256": "b" * 64}


def test_image_manifest_layout():
    doc = json.loads(remote.image_manifest("ext4", "k1", CONFIG, {"root.img": (LAYER, REC)}))
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["artifactType"] == "application/vnd.ldt.entry.v1"
    assert doc["config"] == {"mediaType": "application/vnd.ldt.entry.manifest.v1+json",
                             "digest": CONFIG.digest, "size": 120}
    assert doc["layers"] == [{"mediaType": "application/vnd.ldt.entry.file.v1+zstd", "digest": LAYER.digest,
                              "size": 3000, "annotations": {"org.opencontainers.image.title": "root.img",
                                                            "vnd.ldt.file.size": str(1 << 20),
                                                            "vnd.ldt.file.sha256": "b" * 64}}]
    assert doc["annotations"] == {"vnd.ldt.stage": "ext4", "vnd.ldt.key": "k1"}


def test_image_manifest_is_deterministic_whatever_the_file_order():
    a = remote.image_manifest("s", "k", CONFIG, {"a": (LAYER, REC), "b": (CONFIG, REC)})
    b = remote.image_manifest("s", "k", CONFIG, {"b": (CONFIG, REC), "a": (LAYER, REC)})
    assert a == b
    assert [d["annotations"]["org.opencontainers.image.title"] for d in json.loads(a)["layers"]] == ["a", "b"]


def test_parse_manifest_round_trip():
    raw = remote.image_manifest("ext4", "k1", CONFIG, {"root.img": (LAYER, REC)})
    assert remote.parse_manifest(raw, "ext4", "k1") == (CONFIG, {"root.img": LAYER})


def test_parse_manifest_refuses_another_entry():
    raw = remote.image_manifest("ext4", "k1", CONFIG, {"root.img": (LAYER, REC)})
    with pytest.raises(EntryCorrupt, match="another entry"):
        remote.parse_manifest(raw, "ext4", "k2")
    with pytest.raises(EntryCorrupt, match="another entry"):
        remote.parse_manifest(raw, "uki", "k1")


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "manifest.json", ".hidden", ""])
def test_parse_manifest_refuses_unsafe_file_names(name):
    raw = remote.image_manifest("s", "k", CONFIG, {name: (LAYER, REC)})
    with pytest.raises(EntryCorrupt):
        remote.parse_manifest(raw, "s", "k")


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"annotations": {"vnd.ldt.stage": "s", "vnd.ldt.key": "k"}}'])
def test_parse_manifest_refuses_garbage(raw):
    with pytest.raises(EntryCorrupt, match="malformed"):
        remote.parse_manifest(raw, "s", "k")


def test_parse_manifest_refuses_a_bad_digest():
    doc = json.loads(remote.image_manifest("s", "k", CONFIG, {"f": (LAYER, REC)}))
    doc["layers"][0]["digest"] = "sha256:../../x"
    with pytest.raises(EntryCorrupt):
        remote.parse_manifest(json.dumps(doc).encode(), "s", "k")


# -- files: records, compression, sparse writes --------------------------------------------------


def test_file_records(tmp_path):
    (tmp_path / "a.img").write_bytes(b"hello")
    (tmp_path / "manifest.json").write_text("{}")
    assert entries.file_records(tmp_path) == {"a.img": {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}}


@pytest.mark.parametrize("layout", [
    [(0, b"x" * 5000)],  # no hole
    [(3 << 20, b"data")],  # a hole first, longer than a read
    [(0, b"a"), (entries.CHUNK + 7, os.urandom(entries.CHUNK + 3)), (5 << 20, b"")],  # holes between and at the end
])
def test_file_record_of_a_sparse_file_is_the_hash_of_its_bytes(tmp_path, layout):
    """Holes are hashed as zeros without being read; data ranges cross the read buffer's size."""
    f = tmp_path / "sparse.img"
    with open(f, "wb") as out:
        for offset, data in layout:
            out.seek(offset)
            out.write(data)
        out.truncate(max(offset + len(data) for offset, data in layout))
    data = f.read_bytes()
    assert entries.file_record(f) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_filesystem_that_cannot_find_holes_is_read_whole(tmp_path, monkeypatch):
    f = tmp_path / "plain.img"
    f.write_bytes(b"\0" * 9000 + b"tail")

    def no_seek_data(fd, pos, how):
        if how == os.SEEK_DATA:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_lseek(fd, pos, how)

    real_lseek = os.lseek
    monkeypatch.setattr(os, "lseek", no_seek_data)
    with open(f, "rb") as fh:
        assert list(files.data_extents(fh.fileno(), 9004)) == [(0, 9004)]
    assert entries.file_record(f)["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_compress_file_checks_the_record(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x" * 100_000)
    blob = oci.compress_file(src, tmp_path / "f.zst", entries.file_record(src))
    packed = (tmp_path / "f.zst").read_bytes()
    assert blob == Blob("sha256:" + hashlib.sha256(packed).hexdigest(), len(packed))
    assert len(packed) < 1000
    with pytest.raises(EntryCorrupt, match="no longer matches"):
        oci.compress_file(src, tmp_path / "g.zst", {"size": 100_000, "sha256": "0" * 64})


def test_write_sparse_keeps_content_and_makes_holes(tmp_path):
    data = bytearray(8 << 20)
    data[5000:5010] = b"0123456789"  # inside block 1
    data[6 << 20: (6 << 20) + 3] = b"end"
    dest = tmp_path / "out"
    with open(dest, "wb") as f:
        for i in range(0, len(data), oci.IO_CHUNK):
            oci.write_sparse(f, bytes(data[i: i + oci.IO_CHUNK]))
        f.truncate(len(data))
    assert dest.read_bytes() == bytes(data)
    assert os.stat(dest).st_blocks * 512 <= 64 * 1024  # two 4 KiB blocks of data (fs may round up)


def test_write_sparse_odd_lengths(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        oci.write_sparse(f, b"\0" * 5000 + b"x" + b"\0" * 10)
        oci.write_sparse(f, b"\0" * 7)
        f.truncate(5018)
    assert (tmp_path / "f").read_bytes() == b"\0" * 5000 + b"x" + b"\0" * 17


class _Answers:
    """A client whose HEADs answer the given statuses in turn (oci.head's view of a registry)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses, self.asked = list(statuses), 0
        self.remote = Remote.parse("oci://reg.example:5000/ldt")

    def request(self, method, url, *, ok, headers=None):
        status = self.statuses[self.asked]
        self.asked += 1
        assert status in ok
        return type("R", (), {"status_code": status, "close": lambda self: None})()

    def _describe(self, method, url, resp):
        return f"remote store {self.remote.host} answered {resp.status_code} to {method} {url}"


def test_head_asks_once_more_when_a_concurrent_pusher_makes_a_blob_fail_for_a_moment(monkeypatch):
    monkeypatch.setattr(oci.time, "sleep", lambda s: None)
    c = _Answers(500, 200)
    assert oci.head(c, "/ldt/blocks/blobs/sha256:ab") is True and c.asked == 2
    c = _Answers(400, 404)
    assert oci.head(c, "/ldt/blocks/blobs/sha256:ab") is False and c.asked == 2
    assert oci.head(_Answers(404), "/x") is False
    with pytest.raises(entries.RemoteUnavailable, match="answered 500 to HEAD /x"):
        oci.head(_Answers(500, 500), "/x")
