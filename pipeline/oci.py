"""An OCI distribution client: the registry's address and credentials, one HTTP session per
operation (Basic or Bearer-token auth, every failure one RemoteUnavailable line), blob uploads
(chunked, skipped when the registry has the blob), blob downloads checked while they stream,
and tag lists. What is stored there (entries: remote.py; published images: publish.py) is above.

Only the OCI distribution API is used (HEAD/GET blobs and manifests, POST/PATCH/PUT chunked
uploads, tags/list, Basic or Bearer-token auth), so distribution, GHCR, Harbor and the cloud
registries all serve.

Why not oras-py (0.2.43, read before deciding): its requests carry no timeout, its retry
decorator sleeps 3+5+11+29+83 s on a registry that is down, its plain upload reads a whole
blob into memory, and a pulled blob's digest is never checked. Wrapping all that would have
replaced most of it; the spec's API is small enough to speak with `requests` directly.
`requests` (and urllib3 under it) is imported when the first client is made, not with this
module: the CLI's start, virt's and a no-op doit never pay for it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import zstandard

from pipeline.entries import MANIFEST, EntryCorrupt, RemoteUnavailable
from pipeline.errors import UserError
from pipeline.run import log, verbose

if TYPE_CHECKING:
    import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
A_SIZE, A_SHA256 = "vnd.ldt.file.size", "vnd.ldt.file.sha256"

CONNECT_TIMEOUT = 3.0  # seconds to open a connection
READ_TIMEOUT = 60.0  # seconds of silence from the registry mid-request
UPLOAD_CHUNK = 16 << 20  # one PATCH; bounds what a push holds in memory
IO_CHUNK = 1 << 20
ZSTD_LEVEL = 3
MAX_MANIFEST = 4 << 20  # a manifest (or config) bigger than this is not one of ours

# OCI distribution spec: repository name components and tags
COMPONENT = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

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
            if not COMPONENT.fullmatch(part):
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
        if not COMPONENT.fullmatch(stage):
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


def check_name(name: str) -> str:
    if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise EntryCorrupt(f"the remote entry names a file {name!r}, which no entry may hold")
    return name


def recorded_files(manifest: Any, where: str) -> dict[str, dict[str, Any]]:
    """The "files" record of an entry's manifest.json ({name: {"size", "sha256"}}), checked."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise EntryCorrupt(f"{where}: manifest.json has no \"files\" record of sizes and sha256 digests")
    for name, rec in files.items():
        check_name(name)
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int)
                and isinstance(rec.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])):
            raise EntryCorrupt(f"{where}: manifest.json's record of {name!r} is not {{size, sha256}}")
    return files


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



def file_descriptor(media_type: str, blob: Blob, title: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """A layer that stands for a file: titled, annotated with the file's size and sha256."""
    return descriptor(media_type, blob, {TITLE: title, A_SIZE: str(record["size"]), A_SHA256: record["sha256"]})


def image_manifest(artifact_type: str, config_type: str, config: Blob, layers: list[dict[str, Any]],
                   annotations: Mapping[str, str]) -> bytes:
    """An OCI image manifest's bytes, canonical (sorted keys, no spaces): the same inputs give
    the same bytes, so two pushers of one entry write one manifest."""
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
           "config": descriptor(config_type, config), "layers": layers, "annotations": dict(annotations)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def get_manifest(c: Client, repo: str, ref: str, what: str) -> bytes | None:
    """A manifest's bytes (at most MAX_MANIFEST) by tag or digest; None when the registry has none."""
    r = c.request("GET", f"/{repo}/manifests/{ref}", ok=(200, 404), headers={"Accept": OCI_MANIFEST}, stream=True)
    with contextlib.closing(r):
        return None if r.status_code == 404 else read_limited(r, what)


def parse_blob(d: Mapping[str, Any]) -> Blob:
    digest, size = d["digest"], d["size"]
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValueError("digest")
    if not isinstance(size, int) or size < 0:
        raise ValueError("size")
    return Blob(digest, size)


# -- HTTP: one session per operation, every failure a one-line RemoteUnavailable ---------------------


class Client:
    """A requests session that answers the registry's Basic or Bearer challenges once per scope."""

    def __init__(self, remote: Remote, creds: Credentials | None) -> None:
        self.remote = remote
        self.creds = creds
        import requests  # on first use: see the module's docstring

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
        import requests

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
def client(remote: Remote, env: Mapping[str, str] | None = None) -> Iterator[Client]:
    c = Client(remote, credentials(remote.host, os.environ if env is None else env))
    try:
        yield c
    finally:
        c.close()


# -- blobs: upload --------------------------------------------------------------------------------


def push_blobs(c: Client, repo: str, config_raw: bytes, files: Mapping[str, tuple[Path, Mapping[str, Any]]],
                tmp_dir: str | os.PathLike[str] | None) -> tuple[Blob, dict[str, tuple[Blob, Mapping[str, Any]]]]:
    """Upload the config and each file (as one zstd frame, compressed one at a time into tmp_dir)
    unless the registry has it; (config blob, {name: (layer blob, record)}) for the manifest."""
    config = Blob("sha256:" + hashlib.sha256(config_raw).hexdigest(), len(config_raw))
    if not head(c, f"/{repo}/blobs/{config.digest}"):
        upload_bytes(c, repo, config, config_raw)
    layers: dict[str, tuple[Blob, Mapping[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="ldt-push-", dir=tmp_dir) as tmp:
        for name in sorted(files):
            path, record = files[name]
            packed = Path(tmp) / "blob.zst"
            blob = compress_file(path, packed, record)
            if not head(c, f"/{repo}/blobs/{blob.digest}"):
                upload_file(c, repo, blob, packed)
            packed.unlink()
            layers[name] = (blob, record)
    return config, layers


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


def tags(c: Client, repo: str) -> list[str]:
    """Every tag of a repository, page by page; [] when the repository does not exist yet."""
    out: list[str] = []
    url = f"/{repo}/tags/list?n=1000"
    while url:
        r = c.request("GET", url, ok=(200, 404))
        with contextlib.closing(r):
            if r.status_code == 404:
                return []
            try:
                out += r.json().get("tags") or []
            except ValueError:
                raise RemoteUnavailable(f"remote store {c.remote.host} sent a tag list that is not JSON") from None
            nxt = r.links.get("next", {}).get("url")
            url = urllib.parse.urljoin(r.url, nxt) if nxt else ""
    return sorted(out)


MOMENTARY = (400, 500)  # what distribution can answer while a concurrent pusher writes the link file read


def head(c: Client, path: str, accept: str | None = None) -> bool:
    """Whether the registry has it. Distribution writes a blob's link file in place, so while
    another pusher links the same blob a HEAD can fail for a moment: asked once more, later."""
    for wait in (0.5, None):
        r = c.request("HEAD", path, ok=(200, 404, *MOMENTARY), headers={"Accept": accept} if accept else None)
        r.close()
        if r.status_code not in MOMENTARY:
            return r.status_code == 200
        if wait is not None:
            time.sleep(wait)
    raise RemoteUnavailable(c._describe("HEAD", path, r))


def _start_upload(c: Client, repo: str) -> tuple[str, int]:
    r = c.request("POST", f"/{repo}/blobs/uploads/", ok=(202,), headers={"Content-Length": "0"})
    r.close()
    min_chunk = int(r.headers.get("OCI-Chunk-Min-Length", "0") or 0)
    return _location(c, r), min_chunk


def _location(c: Client, r: requests.Response) -> str:
    loc = r.headers.get("Location")
    if not loc:
        raise RemoteUnavailable(f"remote store {c.remote.host} gave no upload location")
    return urllib.parse.urljoin(r.url, loc)


def _with_digest(url: str, digest: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), ("digest", digest)])
    return urllib.parse.urlunsplit(parts._replace(query=query))


def upload_bytes(c: Client, repo: str, blob: Blob, data: bytes) -> None:
    url, _ = _start_upload(c, repo)
    r = c.request("PUT", _with_digest(url, blob.digest), ok=(201,), data=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    r.close()


def upload_file(c: Client, repo: str, blob: Blob, path: Path) -> None:
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


def mount(c: Client, repo: str, digest: str, source: str) -> bool:
    """Make a blob of repository `source` a blob of `repo` too, without sending it (the spec's
    cross-repository mount); False when the registry did not mount it (it lacks the blob there)."""
    r = c.request("POST", f"/{repo}/blobs/uploads/?" + urllib.parse.urlencode({"mount": digest, "from": source}),
                  ok=(201, 202), headers={"Content-Length": "0"})
    r.close()
    if r.status_code == 201:
        return True
    with contextlib.suppress(RemoteUnavailable):  # the upload it opened instead: not needed
        c.request("DELETE", _location(c, r), ok=(202, 204, 404)).close()
    return False


# -- blobs: download ------------------------------------------------------------------------------


def get_small(c: Client, repo: str, blob: Blob, what: str, limit: int = MAX_MANIFEST) -> bytes:
    """A blob read whole (a config, an index), checked against its size and digest."""
    if blob.size > limit:
        raise EntryCorrupt(f"the remote {what} is larger than {limit} bytes")
    with contextlib.closing(c.request("GET", f"/{repo}/blobs/{blob.digest}", ok=(200,), stream=True)) as r:
        try:
            data = r.raw.read(limit + 1, decode_content=True)
        except OSError as e:
            raise RemoteUnavailable(f"remote store {c.remote.host} broke off sending {what} "
                                    f"({type(e).__name__})") from None
    if len(data) != blob.size or "sha256:" + hashlib.sha256(data).hexdigest() != blob.digest:
        raise EntryCorrupt(f"the remote {what} does not match its digest")
    return data


def read_limited(r: requests.Response, what: str) -> bytes:
    data = r.raw.read(MAX_MANIFEST + 1, decode_content=True)
    if len(data) > MAX_MANIFEST:
        raise EntryCorrupt(f"the remote {what} is larger than {MAX_MANIFEST} bytes")
    return data


def download_file(c: Client, repo: str, blob: Blob, record: Mapping[str, Any], dest: Path, what: str) -> None:
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
        import urllib3  # loaded with requests by now

        self.broken = (urllib3.exceptions.HTTPError, OSError)  # the stream broke off

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.r.raw.read(IO_CHUNK if n is None or n < 0 else n, decode_content=True)
        except self.broken as e:
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


