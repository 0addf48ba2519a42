"""A throwaway OCI registry for tests: CNCF distribution (Debian's docker-registry package).

Each `serve()` starts its own registry on 127.0.0.1 and a free port, storing blobs under a
directory the test owns (so a test can corrupt one on disk), optionally behind htpasswd basic
auth, and always stops it on the way out. No test talks to a registry it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import IN_CI

BINARY = "docker-registry"


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:PORT"
    root: Path  # the filesystem storage root
    proc: subprocess.Popen
    user: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"oci://{self.host}/ldt"

    def blob_data(self, digest: str) -> Path:
        """Where distribution keeps a blob's bytes on disk."""
        algo, hexa = digest.split(":", 1)
        return self.root / "docker/registry/v2/blobs" / algo / hexa[:2] / hexa / "data"


def require_registry() -> None:
    if shutil.which(BINARY) is None:
        if IN_CI:
            pytest.fail(f"CI needs {BINARY} (apt-get install docker-registry; ./setup.sh does)")
        pytest.skip(f"no {BINARY} here; run ./setup.sh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_yml(root: Path, port: int, htpasswd: Path | None) -> str:
    auth = f"auth:\n  htpasswd:\n    realm: ldt-test\n    path: {htpasswd}\n" if htpasswd else ""
    return (
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n"
        "  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: ldt-test-secret\n"
        + auth
    )


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt entry (distribution accepts only bcrypt) made by apache2-utils' htpasswd."""
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
    return out.stdout.strip() + "\n"


@contextlib.contextmanager
def serve(workdir: Path, user: str | None = None, password: str | None = None) -> Iterator[Registry]:
    """Run a registry until the block ends; its storage and config live in workdir."""
    require_registry()
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "storage"
    root.mkdir(exist_ok=True)
    htpasswd = None
    if user is not None:
        assert password is not None
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(htpasswd_line(user, password))
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(config_yml(root, port, htpasswd))
    log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(f"127.0.0.1:{port}", root, proc, user, password)
    try:
        wait_ready(reg, workdir / "registry.log")
        yield reg
    finally:
        stop(proc)
        log.close()


def wait_ready(reg: Registry, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reg.proc.poll() is not None:
            raise RuntimeError(f"registry exited with {reg.proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://{reg.host}/v2/", timeout=1).status_code in (200, 401):
                return
        time.sleep(0.05)
    raise RuntimeError(f"registry on {reg.host} did not answer within {timeout}s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Registry]:
    with serve(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory) -> Iterator[Registry]:
    with serve(tmp_path_factory.mktemp("registry-auth"), user="ci-bot", password="s3cret-Pa55") as reg:
        yield reg


def env_without_credentials() -> dict[str, str]:
    """os.environ minus anything that could hand the client credentials from the developer's machine."""
    drop = {"LDT_REMOTE", "LDT_REMOTE_USER", "LDT_REMOTE_PASSWORD", "LDT_REMOTE_PUSH", "DOCKER_CONFIG"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextlib.contextmanager
def token_gate(upstream: Registry, user: str, password: str) -> Iterator[tuple[str, list[str]]]:
    """A Bearer-token front for a registry, the way GHCR, Harbor and the clouds ask: yields its host.

    Requests without `Authorization: Bearer <token>` get a 401 naming a token realm; the realm
    hands out the token for the right Basic credentials; everything else is passed upstream
    (with Host kept, so the registry's upload Locations point back at the gate).
    Yields (host, the "METHOD path" of every request it saw).
    """
    import base64
    import http.server
    import threading

    token = "tok-" + os.urandom(8).hex()
    good = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    seen: list[str] = []

    class Gate(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.append(f"{self.command} {self.path.split('?')[0]}")
            if self.path.startswith("/token"):
                ok = self.headers.get("Authorization") == good
                self._reply(200 if ok else 401, {"Content-Type": "application/json"},
                            b'{"token": "%s"}' % token.encode() if ok else b"{}")
                return
            if self.headers.get("Authorization") != f"Bearer {token}":
                challenge = f'Bearer realm="http://{self.headers["Host"]}/token",service="gate",scope="repository:x:pull"'
                self._reply(401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"},
                            b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return
            fwd = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "content-length")}
            resp = requests.request(self.command, f"http://{upstream.host}{self.path}", data=body, headers=fwd,
                                    allow_redirects=False, timeout=30)
            drop = ("content-length", "transfer-encoding", "connection", "content-encoding")
            self._reply(resp.status_code, {k: v for k, v in resp.headers.items() if k.lower() not in drop},
                        resp.content)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gate)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()
