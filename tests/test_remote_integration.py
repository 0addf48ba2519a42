"""pipeline.remote against a real registry (CNCF distribution on 127.0.0.1, started per module)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from registry import auth_registry, env_without_credentials, registry  # noqa: F401 - fixtures

from pipeline import entries, oci, remote
from pipeline.entries import EntryCorrupt, RemoteUnavailable
from pipeline.oci import Remote

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
NO_CREDS = {"DOCKER_CONFIG": "/nonexistent"}  # env for the client: no credentials from this machine


def make_entry(path: Path, files: dict[str, bytes | tuple[int, dict[int, bytes]]], **inputs) -> Path:
    """An entry dir: files given as bytes, or as (size, {offset: data}) sparse files; manifest.json last."""
    path.mkdir(parents=True)
    for name, content in files.items():
        with open(path / name, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                size, chunks = content
                f.truncate(size)
                for off, data in chunks.items():
                    f.seek(off)
                    f.write(data)
    manifest = {"inputs": inputs, "files": entries.file_records(path)}
    (path / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
    return path


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def sparse_disk(tmp_path: Path, name: str = "disk", size: int = 24 << 20) -> Path:
    return make_entry(tmp_path / name, {
        "disk.img": (size, {0: b"\xeb\x3c\x90" + os.urandom(509), 1 << 20: os.urandom(3 << 20),
                            size - 4096: b"tail" * 1024}),
        "vmlinuz": os.urandom(300_000),
        "empty": b"",
    }, recipe="hello")


def oci_get(reg, path: str, **kw) -> requests.Response:
    return requests.get(f"http://{reg.host}/v2/{path}", timeout=5, **kw)


def pack_digests(reg, repo: str, key: str) -> list[str]:
    """The packs of an entry, largest first."""
    doc = oci_get(reg, f"{repo}/manifests/{key}",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    packs = [d for d in doc["layers"] if d["mediaType"] == "application/vnd.ldt.pack.v1"]
    return [d["digest"] for d in sorted(packs, key=lambda d: -d["size"])]


# -- round trip ----------------------------------------------------------------------------------


def round_trip(r: Remote, stage: str, key: str, entry: Path, work: Path, env: dict[str, str]) -> None:
    """Push a new entry, pull it into an empty `work`: the same files back."""
    assert remote.push_entry(r, stage, key, entry, env=env) is True
    work.mkdir()
    assert remote.pull_entry(r, stage, key, work, env=env) is True
    assert same_tree(entry, work)


def test_round_trip_of_a_sparse_entry(registry, tmp_path):  # noqa: F811 - pytest fixture
    r = Remote.parse(registry.url)
    entry = sparse_disk(tmp_path)
    work = tmp_path / "work"
    round_trip(r, "ext4", "k" * 32, entry, work, NO_CREDS)
    assert json.loads((work / "manifest.json").read_text())["files"] == entries.file_records(work)
    # holes stay holes: 24 MiB apparent, about 4 MiB of data
    assert os.stat(work / "disk.img").st_blocks * 512 < 6 << 20
    assert remote.remote_keys(r, "ext4", env=NO_CREDS) == ["k" * 32]
    assert remote.entry_manifest(r, "ext4", "k" * 32, env=NO_CREDS) == json.loads(
        (entry / "manifest.json").read_text())


def test_layout_in_the_registry(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    entry = sparse_disk(tmp_path)
    remote.push_entry(r, "layout", "key1", entry, env=NO_CREDS)
    doc = oci_get(registry, "ldt/layout/manifests/key1",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    assert doc["artifactType"] == "application/vnd.ldt.entry.v2"
    assert doc["annotations"] == {"vnd.ldt.stage": "layout", "vnd.ldt.key": "key1"}
    assert doc["config"]["mediaType"] == "application/vnd.ldt.entry.manifest.v1+json"
    config = oci_get(registry, f"ldt/layout/blobs/{doc['config']['digest']}").content
    assert config == (entry / "manifest.json").read_bytes()
    indexes = {d["annotations"]["org.opencontainers.image.title"]: d["size"] for d in doc["layers"]
               if d["mediaType"] == "application/vnd.ldt.entry.index.v2+zstd"}
    assert set(indexes) == {"disk.img", "vmlinuz", "empty"}
    packs = [d["size"] for d in doc["layers"] if d["mediaType"] == "application/vnd.ldt.pack.v1"]
    # the zeros are not shipped: 24 MiB with ~3.8 MiB of random data is about that in packs
    assert sum(packs) < 4 << 20 and sum(indexes.values()) < 16 << 10


def test_second_push_of_a_key_is_a_no_op(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    entry = make_entry(tmp_path / "e", {"a": b"aaa"})
    assert remote.push_entry(r, "again", "k1", entry, env=NO_CREDS) is True
    assert remote.push_entry(r, "again", "k1", entry, env=NO_CREDS) is False


def test_shared_blobs_are_not_uploaded_twice(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    big = os.urandom(2 << 20)
    remote.push_entry(r, "dedup", "k1", make_entry(tmp_path / "e1", {"big": big}, n=1), env=NO_CREDS)
    sent = []
    real = oci.upload_file
    oci.upload_file = lambda c, repo, blob, path: (sent.append(blob), real(c, repo, blob, path))
    try:
        remote.push_entry(r, "dedup", "k2", make_entry(tmp_path / "e2", {"big": big, "new": b"x" * 10}, n=2),
                          env=NO_CREDS)
    finally:
        oci.upload_file = real
    assert sum(b.size for b in sent) < 64 << 10  # only "new"'s small packs; "big"'s packs were there already
    assert remote.remote_keys(r, "dedup", env=NO_CREDS) == ["k1", "k2"]


def test_absent_tag_and_absent_repository(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    remote.push_entry(r, "present", "k1", make_entry(tmp_path / "e", {"a": b"a"}), env=NO_CREDS)
    work = tmp_path / "work"
    work.mkdir()
    assert remote.pull_entry(r, "present", "nope", work, env=NO_CREDS) is False
    assert remote.pull_entry(r, "neverpushed", "k1", work, env=NO_CREDS) is False
    assert list(work.iterdir()) == []
    assert remote.remote_keys(r, "neverpushed", env=NO_CREDS) == []
    assert remote.entry_manifest(r, "present", "nope", env=NO_CREDS) is None


def test_push_refuses_an_entry_without_file_records(registry, tmp_path):  # noqa: F811
    entry = tmp_path / "old"
    entry.mkdir()
    (entry / "a").write_bytes(b"a")
    (entry / "manifest.json").write_text("{}")
    with pytest.raises(EntryCorrupt, match="files"):
        remote.push_entry(Remote.parse(registry.url), "old", "k", entry, env=NO_CREDS)


def test_push_refuses_a_local_file_changed_since_recorded(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    entry = make_entry(tmp_path / "e", {"a": b"original"})
    (entry / "a").write_bytes(b"tampered")
    with pytest.raises(EntryCorrupt, match="no longer matches"):
        remote.push_entry(r, "tampered", "k", entry, env=NO_CREDS)
    assert remote.remote_keys(r, "tampered", env=NO_CREDS) == []


# -- corruption ----------------------------------------------------------------------------------


def test_corrupted_blob_in_registry_storage_is_detected(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    # random data: zstd stores it raw, so a flipped byte still decompresses and only the digests can tell
    entry = make_entry(tmp_path / "e", {"kernel": os.urandom(3 << 20), "other": b"fine"})
    remote.push_entry(r, "corrupt", "k1", entry, env=NO_CREDS)
    data = registry.blob_data(pack_digests(registry, "ldt/corrupt", "k1")[0])
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(raw)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(EntryCorrupt, match="damaged") as e:
        remote.pull_entry(r, "corrupt", "k1", work, env=NO_CREDS)
    assert list(work.iterdir()) == []
    assert "\n" not in e.value.message


def test_lying_manifest_json_is_detected(registry, tmp_path):  # noqa: F811
    """A self-consistent entry whose manifest.json records another sha256: caught on the decompressed bytes."""
    r = Remote.parse(registry.url)
    repo = r.repository("lying")
    src = tmp_path / "f"
    src.write_bytes(b"real content" * 1000)
    rec = entries.file_record(src)
    blob = oci.compress_file(src, tmp_path / "f.zst", rec)
    lie = {"size": rec["size"], "sha256": hashlib.sha256(b"something else").hexdigest()}
    config_raw = json.dumps({"files": {"f": lie}}).encode()
    config = oci.Blob("sha256:" + hashlib.sha256(config_raw).hexdigest(), len(config_raw))
    with oci.client(r, NO_CREDS) as c:
        oci.upload_bytes(c, repo, config, config_raw)
        oci.upload_file(c, repo, blob, tmp_path / "f.zst")
        c.request("PUT", f"/{repo}/manifests/k1", ok=(201,), data=remote.image_manifest(
            "lying", "k1", config, {"f": (blob, lie)}), headers={"Content-Type": oci.OCI_MANIFEST}).close()
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(EntryCorrupt, match="does not match manifest.json"):
        remote.pull_entry(r, "lying", "k1", work, env=NO_CREDS)
    assert list(work.iterdir()) == []


# -- the registry away -----------------------------------------------------------------------------


def test_registry_down_is_remote_unavailable_quickly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    r = Remote.parse(f"oci://127.0.0.1:{port}/ldt")
    start = time.monotonic()
    for call in (lambda: remote.pull_entry(r, "s", "k", tmp_path, env=NO_CREDS),
                 lambda: remote.remote_keys(r, "s", env=NO_CREDS),
                 lambda: remote.push_entry(r, "s", "k", make_entry(tmp_path / "e", {"a": b"a"}), env=NO_CREDS)):
        with pytest.raises(RemoteUnavailable, match="unreachable") as e:
            call()
        assert "\n" not in e.value.message
    assert time.monotonic() - start < 5


def test_registry_that_never_answers_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(oci, "READ_TIMEOUT", 0.5)
    with socket.socket() as s:  # accepts connections (kernel backlog), never says a word
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        r = Remote.parse(f"oci://127.0.0.1:{s.getsockname()[1]}/ldt")
        start = time.monotonic()
        with pytest.raises(RemoteUnavailable, match="did not answer in time"):
            remote.remote_keys(r, "s", env=NO_CREDS)
        assert time.monotonic() - start < 3


def test_server_error_is_remote_unavailable(tmp_path):
    """A 5xx (here from a tiny HTTP server standing in for a broken registry)."""
    import http.server

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = Remote.parse(f"oci://127.0.0.1:{srv.server_address[1]}/ldt")
        with pytest.raises(RemoteUnavailable, match="answered 503"):
            remote.pull_entry(r, "s", "k", tmp_path, env=NO_CREDS)
    finally:
        srv.shutdown()
        srv.server_close()


# -- credentials ---------------------------------------------------------------------------------


def _docker_config(tmp_path: Path, host: str, user: str, password: str) -> dict[str, str]:
    d = tmp_path / "docker"
    d.mkdir()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"DOCKER_CONFIG": str(d)}


def test_auth_with_docker_config(auth_registry, tmp_path):  # noqa: F811
    r = Remote.parse(auth_registry.url)
    env = _docker_config(tmp_path, auth_registry.host, auth_registry.user, auth_registry.password)
    entry = make_entry(tmp_path / "e", {"a": os.urandom(100_000)})
    round_trip(r, "authed", "k1", entry, tmp_path / "w", env)


def test_auth_with_env_credentials(auth_registry, tmp_path):  # noqa: F811
    r = Remote.parse(auth_registry.url)
    env = {**NO_CREDS, "LDT_REMOTE_USER": auth_registry.user, "LDT_REMOTE_PASSWORD": auth_registry.password}
    entry = make_entry(tmp_path / "e", {"b": b"b" * 5000})
    assert remote.push_entry(r, "authenv", "k1", entry, env=env)
    assert remote.remote_keys(r, "authenv", env=env) == ["k1"]


def test_no_credentials_is_remote_unavailable(auth_registry, tmp_path):  # noqa: F811
    with pytest.raises(RemoteUnavailable, match="wants credentials"):
        remote.remote_keys(Remote.parse(auth_registry.url), "authed", env=NO_CREDS)


def test_wrong_password_is_refused_without_showing_it(auth_registry, tmp_path, capfd, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LDT_VERBOSE", "1")
    r = Remote.parse(auth_registry.url)
    wrong = "Wr0ng-pa55word-XYZ"
    envs = [{**NO_CREDS, "LDT_REMOTE_USER": auth_registry.user, "LDT_REMOTE_PASSWORD": wrong},
            _docker_config(tmp_path, auth_registry.host, auth_registry.user, wrong)]
    for env in envs:
        for call in (lambda env=env: remote.remote_keys(r, "authed", env=env),
                     lambda env=env: remote.push_entry(r, "authed", "k9", make_entry(
                         tmp_path / f"e{len(env)}", {"a": b"a"}), env=env)):
            with pytest.raises(RemoteUnavailable, match="refused the credentials") as e:
                call()
            shown = e.value.render() + repr(e.value) + str(e.value.__cause__) + str(e.value.__context__)
            assert wrong not in shown
            assert base64.b64encode(f"{auth_registry.user}:{wrong}".encode()).decode() not in shown
    out, err = capfd.readouterr()
    assert "remote: GET /v2/ldt/authed/tags/list" in err  # verbose did log the requests
    assert wrong not in out + err


# -- interrupted and concurrent pushes (separate processes) ----------------------------------------

PUSH = """
import sys
from pathlib import Path
from pipeline import oci, remote
oci.UPLOAD_CHUNK = int(sys.argv[5])
print(remote.push_entry(oci.Remote.parse(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])), flush=True)
"""


def push_proc(url: str, stage: str, key: str, entry: Path, chunk: int = 16 << 20) -> subprocess.Popen:
    # TMPDIR beside the entry: a SIGKILLed push can't remove its scratch dir, and pytest's tmp_path does
    env = {**env_without_credentials(), "DOCKER_CONFIG": "/nonexistent", "PYTHONPATH": str(ROOT),
           "TMPDIR": str(entry.parent)}
    return subprocess.Popen([sys.executable, "-c", PUSH, url, stage, key, str(entry), str(chunk)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_push_leaves_no_tag_and_a_later_push_completes(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    entry = make_entry(tmp_path / "e", {"a.img": os.urandom(48 << 20), "b": os.urandom(1000)})
    proc = push_proc(registry.url, "killed", "k1", entry, chunk=256 << 10)  # many small PATCHes
    uploads = registry.root / "docker/registry/v2/repositories/ldt/blocks/_uploads"  # packs go there first
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill once a chunk of the big file has reached the registry
        if any(p.stat().st_size > 1 << 20 for p in uploads.glob("*/data")):
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail(f"the push never got going: {proc.communicate()}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-upload, not finished before
    work = tmp_path / "w"
    work.mkdir()
    assert remote.pull_entry(r, "killed", "k1", work, env=NO_CREDS) is False
    assert remote.remote_keys(r, "killed", env=NO_CREDS) == []
    assert remote.push_entry(r, "killed", "k1", entry, env=NO_CREDS) is True
    assert remote.pull_entry(r, "killed", "k1", work, env=NO_CREDS) is True
    assert same_tree(entry, work)


def test_two_concurrent_pushes_of_one_key_both_succeed(registry, tmp_path):  # noqa: F811
    r = Remote.parse(registry.url)
    entry = make_entry(tmp_path / "e", {"a.img": os.urandom(32 << 20), "small": b"s"})
    procs = [push_proc(registry.url, "race", "k1", entry, chunk=1 << 20) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert sorted(out.strip() for out, _ in results) in (["False", "True"], ["True", "True"])
    work = tmp_path / "w"
    work.mkdir()
    assert remote.pull_entry(r, "race", "k1", work, env=NO_CREDS)
    assert same_tree(entry, work)


# -- memory ----------------------------------------------------------------------------------------

MEASURE = """
import json, resource, sys
from pathlib import Path
from pipeline import oci, remote
r = oci.Remote.parse(sys.argv[1])
op = sys.argv[2]
if op == "push":
    remote.push_entry(r, "big", "k1", Path(sys.argv[3]))
else:
    assert remote.pull_entry(r, "big", "k1", Path(sys.argv[3]))
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(url: str, op: str, path: Path) -> int:
    env = {**env_without_credentials(), "DOCKER_CONFIG": "/nonexistent", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", MEASURE, url, op, str(path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["maxrss_kib"] * 1024


def test_push_and_pull_of_a_2g_sparse_disk_stay_small(registry, tmp_path):  # noqa: F811
    size = 2 << 30
    entry = make_entry(tmp_path / "e", {"disk.img": (size, {
        off: os.urandom(1 << 20) for off in range(0, size, 256 << 20)})})  # 8 MiB of data in 2 GiB
    push_rss = measure(registry.url, "push", entry)
    work = tmp_path / "w"
    work.mkdir()
    pull_rss = measure(registry.url, "pull", work)
    # Bounded, whatever the file's size: a client that held the blob would need over 2 GiB. The
    # 200 MB goal is bench_remote.py's to report (48-61 MiB alone; in two full-suite runs the
    # push peaked at 221 and 226 MB, not understood yet).
    assert push_rss < size // 4, push_rss
    assert pull_rss < size // 4, pull_rss
    assert os.stat(work / "disk.img").st_size == size
    assert os.stat(work / "disk.img").st_blocks * 512 < 64 << 20  # written sparse
    assert entries.file_records(work) == json.loads((entry / "manifest.json").read_text())["files"]


def test_bearer_token_auth(registry, tmp_path):  # noqa: F811
    """The token dance of GHCR/Harbor/cloud registries, through a gate in front of the real registry."""
    from registry import token_gate

    with token_gate(registry, "robot", "t0ken-pass") as (host, seen):
        r = Remote.parse(f"oci://{host}/ldt")
        env = {**NO_CREDS, "LDT_REMOTE_USER": "robot", "LDT_REMOTE_PASSWORD": "t0ken-pass"}
        entry = make_entry(tmp_path / "e", {"f": os.urandom(50_000)})
        round_trip(r, "gated", "k1", entry, tmp_path / "w", env)
        assert {"GET /token", "PATCH", "PUT /v2/ldt/gated/manifests/k1"} <= {s if "/uploads/" not in s else
                                                                            s.split()[0] for s in seen}
        with pytest.raises(RemoteUnavailable, match="refused the credentials"):
            remote.remote_keys(r, "gated", env={**env, "LDT_REMOTE_PASSWORD": "nope"})
        with pytest.raises(RemoteUnavailable, match="wants credentials"):
            remote.remote_keys(r, "gated", env=NO_CREDS)
