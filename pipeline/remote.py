"""The store shared through an OCI registry: push and pull of verified entries.

Layout (quote this one in the README). One store entry `cache/store/<stage>/<key>/` is one OCI
image manifest, in the repository `<prefix>/<stage>` of the registry, tagged with the entry key:

    <host>/<prefix>/<stage>:<key>
      mediaType     application/vnd.oci.image.manifest.v1+json
      artifactType  application/vnd.ldt.entry.v1
      config        application/vnd.ldt.entry.manifest.v1+json  the entry's manifest.json, byte for byte;
                    its "files" maps each output file to {"size", "sha256"} of the file itself
      layers        application/vnd.ldt.entry.file.v1+zstd      one per output file, sorted by name:
                    the file as one zstd frame (zeros cost next to nothing), annotated with
                    org.opencontainers.image.title = the file name, vnd.ldt.file.size, vnd.ldt.file.sha256
      annotations   vnd.ldt.stage, vnd.ldt.key

Only the OCI distribution API is used (HEAD/GET blobs and manifests, POST/PATCH/PUT chunked
uploads, tags/list, Basic or Bearer-token auth), so distribution, GHCR, Harbor and the cloud
registries all serve. Every manifest a client writes is a pure function of the entry, so two
pushers of the same key write the same bytes and both succeed.

Trust chain on pull: tag -> manifest (stage and key annotations must match) -> config blob
(sha256 checked) -> manifest.json "files" -> each layer (sha256 of the compressed bytes checked
while streaming) -> the decompressed file (size and sha256 checked against manifest.json while
writing). Any mismatch raises EntryCorrupt and removes what was written.

Push order: blobs first (skipping those the registry has), the manifest last: the manifest PUT
is the commit point, so an interrupted push never leaves a tag naming missing blobs.

Why not oras-py (0.2.43, read before deciding): its requests carry no timeout, its retry
decorator sleeps 3+5+11+29+83 s on a registry that is down, its plain upload reads a whole
blob into memory, and a pulled blob's digest is never checked. Wrapping all that would have
replaced most of it; the spec's API is small enough to speak with `requests` directly.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests
import urllib3
import zstandard

from pipeline.cache import MANIFEST, file_record, file_records  # noqa: F401 - part of this API
from pipeline.errors import UserError
from pipeline.run import log, verbose

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.ldt.entry.v1"
CONFIG_TYPE = "application/vnd.ldt.entry.manifest.v1+json"
FILE_TYPE = "application/vnd.ldt.entry.file.v1+zstd"
TITLE = "org.opencontainers.image.title"
A_STAGE, A_KEY = "vnd.ldt.stage", "vnd.ldt.key"
A_SIZE, A_SHA256 = "vnd.ldt.file.size", "vnd.ldt.file.sha256"

CONNECT_TIMEOUT = 3.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds of silence from the registry mid-request
UPLOAD_CHUNK = 16 << 20  # one PATCH; bounds what a push holds in memory
IO_CHUNK = 1 << 20
ZSTD_LEVEL = 3
MAX_MANIFEST = 4 << 20  # a manifest (or config) bigger than this is not one of ours

# OCI distribution spec: repository name components and tags
_COMPONENT = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class RemoteError(UserError):
    """Base of what the remote store raises; the caller warns once and builds locally."""


class RemoteUnavailable(RemoteError):
    """Registry down, timed out, 5xx, credentials refused, or an answer the spec does not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="building locally instead; check LDT_REMOTE and the registry")


class EntryCorrupt(RemoteError):
    """A pulled entry (or a local one about to be pushed) does not match its recorded digests."""

    def __init__(self, message: str) -> None:
        super().__init__(message, hint="the entry was not used; it is built locally instead")


# -- configuration: values, parsed at the edge ------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """Where the shared store lives: oci://HOST[:PORT][/PREFIX] (oci+http:// or oci+https:// to force)."""

    host: str  # "registry.example.com" or "127.0.0.1:5000"
    prefix: str = ""  # repository prefix, "" or "team/ldt"
    scheme: str = "https"
    push: bool = True

    @classmethod
    def parse(cls, url: str, push: bool = True) -> Remote:
        m = re.fullmatch(r"oci(?:\+(https?))?://([^/\s]+)(/[^\s]*)?", url.strip())
        if not m:
            raise UserError(f"bad remote store URL {url!r}", hint="write it as oci://HOST[:PORT]/PREFIX")
        forced, host, path = m.groups()
        prefix = (path or "").strip("/")
        for part in prefix.split("/") if prefix else []:
            if not _COMPONENT.fullmatch(part):
                raise UserError(f"bad repository prefix {prefix!r} in {url!r}",
                                hint="lowercase letters, digits and . _ - between them, separated by /")
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        local = hostname in ("localhost", "127.0.0.1", "[::1]")
        return cls(host=host, prefix=prefix, scheme=forced or ("http" if local else "https"), push=push)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Remote | None:
        """LDT_REMOTE=oci://…; pushing is on unless LDT_REMOTE_PUSH=0."""
        url = env.get("LDT_REMOTE", "").strip()
        if not url:
            return None
        return cls.parse(url, push=env.get("LDT_REMOTE_PUSH", "1").strip().lower() not in ("0", "false", "no"))

    def repository(self, stage: str) -> str:
        if not _COMPONENT.fullmatch(stage):
            raise ValueError(f"stage name {stage!r} is not a valid OCI repository component")
        return f"{self.prefix}/{stage}" if self.prefix else stage

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}/v2"

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.prefix}".rstrip("/")


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)  # never shown, not even in a repr of the dataclass


def credentials(host: str, env: Mapping[str, str] = os.environ) -> Credentials | None:
    """LDT_REMOTE_USER/LDT_REMOTE_PASSWORD (CI secrets), else what `docker login` stored for host."""
    user, password = env.get("LDT_REMOTE_USER"), env.get("LDT_REMOTE_PASSWORD")
    if user and password is not None:
        return Credentials(user, password)
    config_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else Path.home() / ".docker"
    try:
        config = json.loads((config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return docker_auth(config, host)


def docker_auth(config: Mapping[str, Any], host: str) -> Credentials | None:
    """The `auths` entry of a Docker config for host ("host", "https://host/v2/", … all match)."""
    for key, entry in (config.get("auths") or {}).items():
        if _auth_host(key) != host or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise UserError(f"the Docker config entry for {host} has an unreadable 'auth'",
                                hint="run `docker login` again") from None
            return Credentials(user, password)
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(entry["username"], entry["password"])
    return None


def _auth_host(key: str) -> str:
    return re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]


def _check_name(name: str) -> str:
    if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise EntryCorrupt(f"the remote entry names a file {name!r}, which no entry may hold")
    return name


# -- the OCI manifest: a pure function of the entry -------------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:…"
    size: int


def descriptor(media_type: str, blob: Blob, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": blob.digest, "size": blob.size}
    if annotations:
        d["annotations"] = dict(annotations)
    return d


def image_manifest(stage: str, key: str, config: Blob, layers: Mapping[str, tuple[Blob, Mapping[str, Any]]]) -> bytes:
    """The manifest bytes for an entry; `layers` maps file name -> (compressed blob, {"size", "sha256"})."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(CONFIG_TYPE, config),
        "layers": [
            descriptor(FILE_TYPE, blob, {TITLE: name, A_SIZE: str(rec["size"]), A_SHA256: rec["sha256"]})
            for name, (blob, rec) in sorted(layers.items())
        ],
        "annotations": {A_STAGE: stage, A_KEY: key},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(raw: bytes, stage: str, key: str) -> tuple[Blob, dict[str, Blob]]:
    """(config blob, {file name: layer blob}) of one of our manifests; EntryCorrupt for anything else."""
    try:
        doc = json.loads(raw)
        if doc.get("annotations", {}).get(A_STAGE) != stage or doc["annotations"].get(A_KEY) != key:
            raise EntryCorrupt(f"the remote manifest {stage}:{key} is annotated for another entry")
        if doc["config"]["mediaType"] != CONFIG_TYPE:
            raise EntryCorrupt(f"the remote manifest {stage}:{key} is not an LDT entry "
                               f"(config {doc['config']['mediaType']!r})")
        config = _blob(doc["config"])
        layers: dict[str, Blob] = {}
        for d in doc["layers"]:
            if d["mediaType"] != FILE_TYPE:
                raise EntryCorrupt(f"the remote entry {stage}:{key} has a layer of type {d['mediaType']!r}")
            name = _check_name(d["annotations"][TITLE])
            if name in layers:
                raise EntryCorrupt(f"the remote entry {stage}:{key} holds {name!r} twice")
            layers[name] = _blob(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EntryCorrupt(f"the remote manifest {stage}:{key} is malformed ({type(e).__name__})") from None
    return config, layers


def _blob(d: Mapping[str, Any]) -> Blob:
    digest, size = d["digest"], d["size"]
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError("digest")
    if not isinstance(size, int) or size < 0:
        raise ValueError("size")
    return Blob(digest, size)


# -- HTTP: one session per operation, every failure a one-line RemoteUnavailable ---------------------


class _Client:
    """A requests session that answers the registry's Basic or Bearer challenges once per scope."""

    def __init__(self, remote: Remote, creds: Credentials | None) -> None:
        self.remote = remote
        self.creds = creds
        self.session = requests.Session()
        self.session.trust_env = False  # no ~/.netrc credentials or proxies behind our back
        self.authorization: str | None = None

    def close(self) -> None:
        self.session.close()

    def request(self, method: str, url: str, *, ok: tuple[int, ...], stream: bool = False,
                **kwargs: Any) -> requests.Response:
        """Send; on 401 authenticate per the challenge and send again. A status outside ok raises."""
        if not url.startswith(("http://", "https://")):
            url = self.remote.base + url
        resp = self._send(method, url, stream=stream, **kwargs)
        if resp.status_code == 401 and self._authenticate(resp):
            resp.close()
            resp = self._send(method, url, stream=stream, **kwargs)
        if resp.status_code not in ok:
            resp.close()
            raise RemoteUnavailable(self._describe(method, url, resp))
        return resp

    def _send(self, method: str, url: str, authorize: bool = True, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        if self.authorization and authorize:
            headers["Authorization"] = self.authorization
        if verbose():  # method and path only: headers and bodies may carry credentials
            log(f"remote: {method} {urllib.parse.urlsplit(url).path}")
        try:
            return self.session.request(method, url, headers=headers, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                                        allow_redirects=True, **kwargs)
        except requests.Timeout:
            raise RemoteUnavailable(f"remote store {self.remote.host} did not answer in time") from None
        except requests.ConnectionError as e:
            raise RemoteUnavailable(f"remote store {self.remote.host} unreachable ({_reason(e)})") from None
        except requests.RequestException as e:
            raise RemoteUnavailable(f"remote store {self.remote.host}: {type(e).__name__}") from None

    def _authenticate(self, resp: requests.Response) -> bool:
        if self.creds is None and not resp.headers.get("WWW-Authenticate", "").lower().startswith("bearer"):
            return False
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.creds is not None:
            token = base64.b64encode(f"{self.creds.user}:{self.creds.password}".encode()).decode()
            new = f"Basic {token}"
        elif scheme == "bearer" and params.get("realm"):
            query = {k: params[k] for k in ("service", "scope") if k in params}
            auth = (self.creds.user, self.creds.password) if self.creds else None
            t = self._send("GET", params["realm"], authorize=False, params=query, auth=auth)
            if t.status_code != 200:
                return False
            try:
                body = t.json()
                new = "Bearer " + (body.get("token") or body["access_token"])
            except (ValueError, KeyError, TypeError):
                return False
        else:
            return False
        if new == self.authorization:
            return False  # the same credentials were just refused
        self.authorization = new
        return True

    def _describe(self, method: str, url: str, resp: requests.Response) -> str:
        path = urllib.parse.urlsplit(url).path
        what = {401: "refused the credentials" if self.creds else "wants credentials (none found)",
                403: "denied access"}.get(resp.status_code, f"answered {resp.status_code}")
        code = ""
        with contextlib.suppress(Exception):
            code = " " + ",".join(e["code"] for e in resp.json()["errors"])
        return f"remote store {self.remote.host} {what} to {method} {path}{code}"


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="…",service="…",scope="a:b:pull,push"' -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


def _reason(e: Exception) -> str:
    text = str(e)
    for known in ("Connection refused", "Name or service not known", "No route to host",
                  "Connection reset", "Temporary failure in name resolution", "certificate verify failed"):
        if known in text:
            return known.lower()
    return type(e).__name__


@contextlib.contextmanager
def _client(remote: Remote, env: Mapping[str, str] | None = None) -> Iterator[_Client]:
    c = _Client(remote, credentials(remote.host, os.environ if env is None else env))
    try:
        yield c
    finally:
        c.close()


# -- push ---------------------------------------------------------------------------------------------


def push_entry(remote: Remote, stage: str, key: str, entry_dir: str | os.PathLike[str], *,
               tmp_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> bool:
    """Publish a finished local entry as <prefix>/<stage>:<key>. False when the tag was already there.

    Files are compressed one at a time into tmp_dir (bounded memory; the disk holds one compressed
    file at a time), their sha256 checked against manifest.json on the way, then uploaded in
    chunks unless the registry already has the blob. The manifest PUT comes last.
    """
    if not _TAG.fullmatch(key):
        raise ValueError(f"entry key {key!r} is not a valid OCI tag")
    entry = Path(entry_dir)
    config_raw = (entry / MANIFEST).read_bytes()
    records = _recorded_files(json.loads(config_raw), f"local entry {entry}")
    present = {p.name for p in entry.iterdir() if p.name != MANIFEST}
    if present != set(records):
        raise EntryCorrupt(f"local entry {entry} holds {sorted(present)}, its manifest.json lists {sorted(records)}")
    repo = remote.repository(stage)
    with _client(remote, env) as c:
        if _head(c, f"/{repo}/manifests/{key}", accept=OCI_MANIFEST):
            return False
        config, layers = _push_blobs(c, repo, config_raw, {n: (entry / n, records[n]) for n in records}, tmp_dir)
        raw = image_manifest(stage, key, config, layers)
        r = c.request("PUT", f"/{repo}/manifests/{key}", ok=(200, 201), data=raw,
                      headers={"Content-Type": OCI_MANIFEST})
        r.close()
        want = "sha256:" + hashlib.sha256(raw).hexdigest()
        got = r.headers.get("Docker-Content-Digest")
        if got and got != want:
            raise RemoteUnavailable(f"remote store {remote.host} stored {stage}:{key} as {got}, not {want}")
    return True


def _push_blobs(c: _Client, repo: str, config_raw: bytes, files: Mapping[str, tuple[Path, Mapping[str, Any]]],
                tmp_dir: str | os.PathLike[str] | None) -> tuple[Blob, dict[str, tuple[Blob, Mapping[str, Any]]]]:
    """Upload the config and each file (as one zstd frame, compressed one at a time into tmp_dir)
    unless the registry has it; (config blob, {name: (layer blob, record)}) for the manifest."""
    config = Blob("sha256:" + hashlib.sha256(config_raw).hexdigest(), len(config_raw))
    if not _head(c, f"/{repo}/blobs/{config.digest}"):
        _upload_bytes(c, repo, config, config_raw)
    layers: dict[str, tuple[Blob, Mapping[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="ldt-push-", dir=tmp_dir) as tmp:
        for name in sorted(files):
            path, record = files[name]
            packed = Path(tmp) / "blob.zst"
            blob = compress_file(path, packed, record)
            if not _head(c, f"/{repo}/blobs/{blob.digest}"):
                _upload_file(c, repo, blob, packed)
            packed.unlink()
            layers[name] = (blob, record)
    return config, layers


def _recorded_files(manifest: Any, where: str) -> dict[str, dict[str, Any]]:
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise EntryCorrupt(f"{where}: manifest.json has no \"files\" record of sizes and sha256 digests")
    for name, rec in files.items():
        _check_name(name)
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int)
                and isinstance(rec.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])):
            raise EntryCorrupt(f"{where}: manifest.json's record of {name!r} is not {{size, sha256}}")
    return files


def compress_file(src: Path, dest: Path, record: Mapping[str, Any]) -> Blob:
    """src as one zstd frame in dest; checks src against its record while reading it once."""
    raw_hash, raw_size = hashlib.sha256(), 0
    packed_hash = _HashingWriter(open(dest, "wb"))  # noqa: SIM115 - closed by the stream writer
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    size = src.stat().st_size
    with open(src, "rb") as f, cctx.stream_writer(packed_hash, size=size, closefd=True) as z:
        while chunk := f.read(IO_CHUNK):
            raw_hash.update(chunk)
            raw_size += len(chunk)
            z.write(chunk)
    if raw_size != record["size"] or raw_hash.hexdigest() != record["sha256"]:
        raise EntryCorrupt(f"local file {src} no longer matches its manifest.json record; not pushed")
    return Blob("sha256:" + packed_hash.hash.hexdigest(), packed_hash.size)


class _HashingWriter:
    """A binary file that hashes what goes through it (zstandard writes here)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _head(c: _Client, path: str, accept: str | None = None) -> bool:
    r = c.request("HEAD", path, ok=(200, 404), headers={"Accept": accept} if accept else None)
    r.close()
    return r.status_code == 200


def _start_upload(c: _Client, repo: str) -> tuple[str, int]:
    r = c.request("POST", f"/{repo}/blobs/uploads/", ok=(202,), headers={"Content-Length": "0"})
    r.close()
    min_chunk = int(r.headers.get("OCI-Chunk-Min-Length", "0") or 0)
    return _location(c, r), min_chunk


def _location(c: _Client, r: requests.Response) -> str:
    loc = r.headers.get("Location")
    if not loc:
        raise RemoteUnavailable(f"remote store {c.remote.host} gave no upload location")
    return urllib.parse.urljoin(r.url, loc)


def _with_digest(url: str, digest: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("digest", digest)])
    return urllib.parse.urlunsplit(parts._replace(query=query))


def _upload_bytes(c: _Client, repo: str, blob: Blob, data: bytes) -> None:
    url, _ = _start_upload(c, repo)
    r = c.request("PUT", _with_digest(url, blob.digest), ok=(201,), data=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    r.close()


def _upload_file(c: _Client, repo: str, blob: Blob, path: Path) -> None:
    """POST, PATCH chunk by chunk (Content-Range), PUT ?digest=: the spec's chunked upload."""
    url, min_chunk = _start_upload(c, repo)
    chunk_size = max(UPLOAD_CHUNK, min_chunk)
    start = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            end = start + len(chunk) - 1
            r = c.request("PATCH", url, ok=(202,), data=chunk, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                "Content-Range": f"{start}-{end}"})
            r.close()
            url = _location(c, r)
            start = end + 1
    r = c.request("PUT", _with_digest(url, blob.digest), ok=(201,), headers={"Content-Length": "0"})
    r.close()


# -- pull ---------------------------------------------------------------------------------------------


def _get_manifest(c: _Client, repo: str, stage: str, key: str) -> tuple[Blob, dict[str, Blob]] | None:
    r = c.request("GET", f"/{repo}/manifests/{key}", ok=(200, 404), headers={"Accept": OCI_MANIFEST}, stream=True)
    with contextlib.closing(r):
        if r.status_code == 404:
            return None
        return parse_manifest(_read_limited(r, f"manifest {stage}:{key}"), stage, key)


def _read_limited(r: requests.Response, what: str) -> bytes:
    data = r.raw.read(MAX_MANIFEST + 1, decode_content=True)
    if len(data) > MAX_MANIFEST:
        raise EntryCorrupt(f"the remote {what} is larger than {MAX_MANIFEST} bytes")
    return data


def _get_config(c: _Client, repo: str, stage: str, key: str, config: Blob) -> tuple[bytes, dict]:
    if config.size > MAX_MANIFEST:
        raise EntryCorrupt(f"the remote manifest.json of {stage}:{key} is larger than {MAX_MANIFEST} bytes")
    with contextlib.closing(c.request("GET", f"/{repo}/blobs/{config.digest}", ok=(200,), stream=True)) as r:
        raw = _read_limited(r, f"manifest.json of {stage}:{key}")
    if len(raw) != config.size or "sha256:" + hashlib.sha256(raw).hexdigest() != config.digest:
        raise EntryCorrupt(f"the remote manifest.json of {stage}:{key} does not match its digest")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise EntryCorrupt(f"the remote manifest.json of {stage}:{key} is not JSON") from None
    return raw, manifest


def entry_manifest(remote: Remote, stage: str, key: str, *, env: Mapping[str, str] | None = None) -> dict | None:
    """The manifest.json of a remote entry (digest checked), or None when the tag is absent.

    For Store.build, which wants the manifest before the body runs: look it up here, then pull_entry.
    """
    repo = remote.repository(stage)
    with _client(remote, env) as c:
        found = _get_manifest(c, repo, stage, key)
        if found is None:
            return None
        return _get_config(c, repo, stage, key, found[0])[1]


def pull_entry(remote: Remote, stage: str, key: str, work_dir: str | os.PathLike[str], *,
               env: Mapping[str, str] | None = None) -> bool:
    """Fetch <prefix>/<stage>:<key> into work_dir (files + manifest.json). False when the tag is absent.

    Every byte is checked while it streams: the compressed blob against its digest, the file
    against manifest.json's size and sha256. On any failure all that was written is removed
    before the exception (EntryCorrupt, RemoteUnavailable) goes up.
    """
    work = Path(work_dir)
    repo = remote.repository(stage)
    written: list[Path] = []
    try:
        with _client(remote, env) as c:
            found = _get_manifest(c, repo, stage, key)
            if found is None:
                return False
            config, layers = found
            config_raw, manifest = _get_config(c, repo, stage, key, config)
            records = _recorded_files(manifest, f"remote entry {stage}:{key}")
            if set(records) != set(layers):
                raise EntryCorrupt(f"the remote entry {stage}:{key} has layers {sorted(layers)}, "
                                   f"its manifest.json lists {sorted(records)}")
            for name in sorted(layers):
                part = work / f".{name}.part"
                written.append(part)
                _fetch_file(c, repo, layers[name], records[name], part, f"{stage}:{key} {name}")
                part.rename(work / name)
                written[-1] = work / name
            written.append(work / MANIFEST)
            (work / MANIFEST).write_bytes(config_raw)
    except BaseException:
        for p in written:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    return True


def _fetch_file(c: _Client, repo: str, blob: Blob, record: Mapping[str, Any], dest: Path, what: str) -> None:
    raw_hash, raw_size = hashlib.sha256(), 0
    r = c.request("GET", f"/{repo}/blobs/{blob.digest}", ok=(200,), stream=True)
    source = _HashingReader(r, blob.size, c.remote.host, what)
    with contextlib.closing(r), open(dest, "wb") as out:
        try:
            # stream_reader bounds what one read() returns: a few compressed bytes may stand for gigabytes
            with zstandard.ZstdDecompressor().stream_reader(source, read_size=IO_CHUNK, closefd=False) as z:
                while data := z.read(IO_CHUNK):
                    raw_size += len(data)
                    if raw_size > record["size"]:
                        raise EntryCorrupt(f"remote file {what} is longer than its recorded {record['size']} bytes")
                    raw_hash.update(data)
                    write_sparse(out, data)
        except zstandard.ZstdError:
            raise EntryCorrupt(f"remote blob of {what} is not a valid zstd stream") from None
        out.truncate(raw_size)  # the trailing holes
        source.drain()
    if source.size != blob.size or "sha256:" + source.hash.hexdigest() != blob.digest:
        raise EntryCorrupt(f"remote blob of {what} does not match its digest {blob.digest[:19]}…")
    if raw_size != record["size"] or raw_hash.hexdigest() != record["sha256"]:
        raise EntryCorrupt(f"remote file {what} does not match manifest.json's size and sha256")


class _HashingReader:
    """The body of a blob response as a file for zstandard: hashed, bounded by the recorded size."""

    def __init__(self, r: requests.Response, limit: int, host: str, what: str) -> None:
        self.r, self.limit, self.host, self.what = r, limit, host, what
        self.hash, self.size = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.r.raw.read(IO_CHUNK if n is None or n < 0 else n, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise RemoteUnavailable(f"remote store {self.host} broke off sending {self.what} "
                                    f"({type(e).__name__})") from None
        self.hash.update(data)
        self.size += len(data)
        if self.size > self.limit:
            raise EntryCorrupt(f"remote blob of {self.what} is longer than its recorded {self.limit} bytes")
        return data

    def drain(self) -> None:
        """Hash what the decompressor left (trailing bytes make the digest check fail, as they should)."""
        while self.read(IO_CHUNK):
            pass


BLOCK = 4096
_ZEROS = bytes(IO_CHUNK)


def write_sparse(f: IO[bytes], data: bytes) -> None:
    """Write data at f's position, seeking over 4 KiB blocks of zeros (holes); the caller truncates at the end."""
    n = len(data)
    if data == _ZEROS[:n]:
        f.seek(n, os.SEEK_CUR)
        return
    view = memoryview(data)
    zero_block = _ZEROS[:BLOCK]
    run_start = 0  # start of the pending run of non-zero blocks
    i = 0
    while i < n:
        j = min(i + BLOCK, n)
        if view[i:j] == zero_block[: j - i]:
            if run_start < i:
                f.write(view[run_start:i])
            f.seek(j - i, os.SEEK_CUR)
            run_start = j
        i = j
    if run_start < n:
        f.write(view[run_start:n])


# -- listing ------------------------------------------------------------------------------------------


def remote_keys(remote: Remote, stage: str, *, env: Mapping[str, str] | None = None) -> list[str]:
    """The keys (tags) the remote holds for a stage; [] when the repository does not exist yet."""
    repo = remote.repository(stage)
    keys: list[str] = []
    url = f"/{repo}/tags/list?n=1000"
    with _client(remote, env) as c:
        while url:
            r = c.request("GET", url, ok=(200, 404))
            with contextlib.closing(r):
                if r.status_code == 404:
                    return []
                try:
                    keys += r.json().get("tags") or []
                except ValueError:
                    raise RemoteUnavailable(f"remote store {remote.host} sent a tag list that is not JSON") from None
                nxt = r.links.get("next", {}).get("url")
                url = urllib.parse.urljoin(r.url, nxt) if nxt else ""
    return sorted(keys)


# -- published images: one OCI artifact per recipe revision ------------------------------------------
#
#   <host>/<prefix>/<recipe>:<content tag> and :<moving tag> (latest, or a name the user gives)
#     artifactType  application/vnd.ldt.image.v1
#     config        application/vnd.ldt.image.config.v1+json   {recipe, keys, os_release, kernel, created}
#     layers        application/vnd.ldt.image.file.v1+zstd     one per artifact (bios.img, uefi.img, vmlinuz,
#                   initrd.img, rootfs.tgz, the qcow2 images), titled "<name>.zst" (what `oras pull`
#                   saves), with vnd.ldt.file.size / vnd.ldt.file.sha256 of the file itself
#     annotations   org.opencontainers.image.created (the images' own epoch), .title, vnd.ldt.*

IMAGE_TYPE = "application/vnd.ldt.image.v1"
IMAGE_CONFIG_TYPE = "application/vnd.ldt.image.config.v1+json"
IMAGE_FILE_TYPE = "application/vnd.ldt.image.file.v1+zstd"
ZST = ".zst"


@dataclass(frozen=True)
class ImageRef:
    remote: Remote
    repository: str  # the full repository path on the registry
    tag: str

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        """oci://HOST[:PORT]/REPO[/…]:TAG (the tag defaults to latest)."""
        scheme, sep, rest = ref.partition("://")
        host, _, path = rest.partition("/")
        repo, _, tag = path.rpartition(":") if ":" in path else (path, "", "latest")
        if not sep or not scheme.startswith("oci") or not host or not repo or not _TAG.fullmatch(tag) \
                or not all(_COMPONENT.fullmatch(c) for c in repo.split("/")):
            raise UserError(f"{ref!r} is not an image reference", hint="write oci://HOST[:PORT]/REPOSITORY:TAG, "
                            "e.g. oci://127.0.0.1:5000/ldt/hello:latest")
        return cls(Remote.parse(f"{scheme}://{host}"), repo, tag)

    def __str__(self) -> str:
        return f"oci://{self.remote.host}/{self.repository}:{self.tag}"


def image_artifact_manifest(config: Blob, layers: Mapping[str, tuple[Blob, Mapping[str, Any]]],
                            annotations: Mapping[str, str]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": IMAGE_TYPE,
        "config": descriptor(IMAGE_CONFIG_TYPE, config),
        "layers": [
            descriptor(IMAGE_FILE_TYPE, blob, {TITLE: name + ZST, A_SIZE: str(rec["size"]), A_SHA256: rec["sha256"]})
            for name, (blob, rec) in sorted(layers.items())
        ],
        "annotations": dict(annotations),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push_image(ref: ImageRef, files: Mapping[str, tuple[Path, Mapping[str, Any]]], config: Mapping[str, Any],
               annotations: Mapping[str, str], tags: Sequence[str], *, tmp_dir: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None) -> str:
    """Push files ({name: (path, its {size, sha256} record)}) as one artifact under every tag; its digest."""
    for t in tags:
        if not _TAG.fullmatch(t):
            raise UserError(f"{t!r} is not a valid tag", hint="letters, digits, '_', '.', '-'; at most 128")
    config_raw = json.dumps(dict(config), sort_keys=True, separators=(",", ":")).encode()
    with _client(ref.remote, env) as c:
        repo = ref.repository
        cblob, layers = _push_blobs(c, repo, config_raw, files, tmp_dir)
        raw = image_artifact_manifest(cblob, layers, annotations)
        for t in tags:
            c.request("PUT", f"/{repo}/manifests/{t}", ok=(200, 201), data=raw,
                      headers={"Content-Type": OCI_MANIFEST}).close()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def image_digest(ref: ImageRef, *, env: Mapping[str, str] | None = None) -> str | None:
    """The digest the tag names now (None: no such tag)."""
    with _client(ref.remote, env) as c:
        r = c.request("GET", f"/{ref.repository}/manifests/{ref.tag}", ok=(200, 404),
                      headers={"Accept": OCI_MANIFEST}, stream=True)
        with contextlib.closing(r):
            if r.status_code == 404:
                return None
            return "sha256:" + hashlib.sha256(_read_limited(r, f"manifest {ref}")).hexdigest()


def pull_image(ref: ImageRef, digest: str, work_dir: str | os.PathLike[str], *,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The artifact `digest` of ref's repository into work_dir, every byte checked; its config."""
    work = Path(work_dir)
    with _client(ref.remote, env) as c:
        repo = ref.repository
        r = c.request("GET", f"/{repo}/manifests/{digest}", ok=(200,), headers={"Accept": OCI_MANIFEST}, stream=True)
        with contextlib.closing(r):
            raw = _read_limited(r, f"manifest {ref}")
        if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
            raise EntryCorrupt(f"the manifest of {ref} does not match its digest")
        try:
            doc = json.loads(raw)
            if doc.get("artifactType") != IMAGE_TYPE:
                raise EntryCorrupt(f"{ref} is not an image published by LDT (artifactType "
                                   f"{doc.get('artifactType')!r})")
            config = _blob(doc["config"])
            layers = [(d["annotations"][TITLE], _blob(d), {"size": int(d["annotations"][A_SIZE]),
                                                           "sha256": d["annotations"][A_SHA256]})
                      for d in doc["layers"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EntryCorrupt(f"the manifest of {ref} is malformed ({type(e).__name__})") from None
        with contextlib.closing(c.request("GET", f"/{repo}/blobs/{config.digest}", ok=(200,), stream=True)) as r:
            config_raw = _read_limited(r, f"config of {ref}")
        if "sha256:" + hashlib.sha256(config_raw).hexdigest() != config.digest:
            raise EntryCorrupt(f"the config of {ref} does not match its digest")
        for title, blob, record in layers:
            name = _check_name(title.removesuffix(ZST))
            _fetch_file(c, repo, blob, record, work / name, f"{ref} {name}")
    return json.loads(config_raw)
