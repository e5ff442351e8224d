"""End-to-end tests: the real `tga-serve` binary on a free loopback port, driven by the official
`openai` client and by raw HTTP.

    cargo build --release -p tga-serve
    pip install -r server/tests/e2e/requirements.txt
    pytest server/tests/e2e

`TGA_SERVE_BIN` overrides the binary's path. Without `--model` the binary serves its built-in tiny
LLaVA-NeXT-Mistral, so nothing is downloaded. Every server is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
IMAGES = REPO / "fixtures" / "images"
API_KEY = "sk-e2e-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary() -> Path:
    path = Path(os.environ.get("TGA_SERVE_BIN", REPO / "target" / "release" / "tga-serve"))
    if not path.exists():
        pytest.fail(f"{path} missing: run `cargo build --release -p tga-serve` first")
    return path


class Server:
    """One tga-serve process on 127.0.0.1:<free port>."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log = tempfile.NamedTemporaryFile(prefix="tga-serve-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 300.0) -> "Server":
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")}
        self.process = subprocess.Popen(
            [str(binary()), *self.args], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tga-serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                status, _, _ = self.request("GET", "/ready")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"tga-serve not ready after {ready_timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"tga-serve ignored SIGTERM for {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """Raw HTTP (no client-side validation), so malformed requests reach the server as sent."""
        headers = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """`series{labels}` -> value, from /metrics."""
        _, _, body = self.request("GET", "/metrics", headers=self.auth_headers())
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                samples[series] = float(value)
        return samples

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"} if API_KEY in self.args else {}


@pytest.fixture(scope="session")
def server():
    """Open server: no keys, private image URLs allowed (the image server is on loopback)."""
    srv = Server("--allow-private-image-urls", "--max-num-seqs", "16").start()
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="session")
def guarded_server():
    """Default guards plus an API key and a small body limit, for the error matrix."""
    srv = Server("--api-key", API_KEY, "--max-body-bytes", str(2 * 1024 * 1024)).start()
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="session")
def image_server():
    """fixtures/images over HTTP on loopback."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(IMAGES))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
