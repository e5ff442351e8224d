"""End-to-end tests: the real `tga-serve` binary on free loopback ports, driven by the official
`openai` client, by raw HTTP and scraped by a real Prometheus.

`cargo test --workspace` runs this suite through `server/tests/e2e.rs` (which builds the binary and
a venv at `target/e2e-venv`). Standalone:

    cargo build -p tga-serve
    python3 -m venv target/e2e-venv && target/e2e-venv/bin/pip install -r tests/e2e/requirements.txt
    target/e2e-venv/bin/python -m pytest tests/e2e

`TGA_SERVE_BIN` overrides the binary (default `target/debug/tga-serve`). The servers run the
built-in tiny LLaVA-NeXT-Mistral (`--model builtin:tiny`) unless a test names another model; the
other fixture checkpoints are served with `--model fixtures/...`, and the binary's default
(`builtin:tga`, the toy TGA model) with `Server(tiny=False)`. Nothing is downloaded. Every server is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import functools
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
IMAGES = FIXTURES / "images"
API_KEY = "sk-e2e-test-key"
BUILTIN_MODEL = "tga-tiny-llava-next"
CHAT = "/v1/chat/completions"

MIME = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary() -> Path:
    path = Path(os.environ.get("TGA_SERVE_BIN") or REPO / "target" / "debug" / "tga-serve")
    if not path.is_file():
        pytest.fail(f"{path} does not exist: run `cargo build -p tga-serve` (or set TGA_SERVE_BIN)")
    return path


def data_uri(name: str | Path, mime: str | None = None) -> str:
    path = IMAGES / name
    mime = mime or MIME[path.suffix.lstrip(".")]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: str | dict) -> dict:
    """A user message: strings are text parts, dicts are given parts."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


@functools.cache
def image_token_counts() -> dict[tuple[int, int], int]:
    """(height, width) -> image positions, from transformers' LlavaNextProcessor (fixtures)."""
    rows = json.loads((FIXTURES / "reference" / "token_counts.json").read_text())
    return {(r["height"], r["width"]): r["count"] for r in rows}


def upright_size(name: str) -> tuple[int, int]:
    """(height, width) from a fixture image name such as `photo_120x160_exif6.jpg` (upright)."""
    match = re.search(r"_(\d+)x(\d+)", name)
    assert match, name
    return int(match[1]), int(match[2])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL when pytest dies, so no server outlives the run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """One tga-serve process on 127.0.0.1:<free port>, its log in a temporary file."""

    live: list["Server"] = []
    # Set for the session to pytest's temporary directory (which pytest prunes after 3 runs).
    log_dir: Path | None = None

    def __init__(self, *args: str, env: dict[str, str] | None = None, tiny: bool = True):
        """`tiny`: without a `--model`, serve `builtin:tiny` (the random-weight fixture whose
        outputs the suite pins), not the binary's default `builtin:tga`."""
        self.port = free_port()
        args = tuple(map(str, args))
        if tiny and "--model" not in args:
            args = ("--model", "builtin:tiny", *args)
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = env or {}
        self.log = tempfile.NamedTemporaryFile(
            prefix="tga-serve-", suffix=".log", delete=False, dir=Server.log_dir
        )
        self.process: subprocess.Popen | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> "Server":
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info"), "NO_COLOR": "1"}
        # Flags under test come from the command line only.
        for key in [k for k in env if k.startswith("TGA_") and k != "TGA_SERVE_BIN"]:
            del env[key]
        env.update(self.env)
        self.process = subprocess.Popen(
            [str(binary()), *self.args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
        Server.live.append(self)
        return self

    def start(self, ready_timeout: float = 60.0) -> "Server":
        self.spawn()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tga-serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.session.get(self.url + "/ready", headers=self.auth, timeout=5).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.process.kill()
        pytest.fail(f"tga-serve not ready after {ready_timeout} s:\n{self.log_tail()}")

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code, failing the test if the process does not exit in time."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"tga-serve still running after {timeout} s:\n{self.log_tail()}")
        if self in Server.live:
            Server.live.remove(self)
        self.session.close()
        return code

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.terminate()
        return self.wait(timeout)

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"} if API_KEY in self.args else {}

    def post(self, body, headers: dict[str, str] | None = None, **kwargs) -> requests.Response:
        """Raw POST to the chat route: a dict is sent as JSON, str/bytes as they are."""
        headers = {**self.auth, **(headers or {})}
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        kwargs.setdefault("timeout", 60)
        return self.session.post(self.url + CHAT, data=body, headers=headers, **kwargs)

    def chat(self, messages: list[dict], **fields) -> dict:
        """A non-streaming completion that must succeed; its JSON."""
        response = self.post({"messages": messages, **fields})
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> dict[str, float]:
        """`name{labels}` -> value, from /metrics (labels as the server writes them)."""
        response = self.session.get(self.url + "/metrics", headers=self.auth, timeout=10)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def chat_requests_total(metrics: dict[str, float], status: str | None = None) -> float:
    prefix = f'tga_requests_total{{route="{CHAT}",status="'
    return sum(
        v for k, v in metrics.items() if k.startswith(prefix) and (status is None or k == f'{prefix}{status}"}}')
    )


@atexit.register
def _kill_leftovers() -> None:
    """Servers a failed or interrupted test did not stop."""
    for server in list(Server.live):
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the logs of the servers that are still running."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in Server.live:
            report.sections.append((f"tga-serve {' '.join(server.args)}", server.log_tail()))


@pytest.fixture(scope="session", autouse=True)
def _server_logs(tmp_path_factory):
    Server.log_dir = tmp_path_factory.mktemp("tga-serve-logs")


@pytest.fixture
def spawn_server():
    """Starts servers for one test; each must exit 0 on SIGTERM at the end."""
    started: list[Server] = []

    def start(*args: str, ready: bool = True, **kwargs) -> Server:
        server = Server(*args, **kwargs)
        started.append(server)
        return server.start() if ready else server.spawn()

    yield start
    for server in started:
        if server.process is not None and server.process.poll() is None:
            code = server.stop()
            assert code == 0, f"exit code {code} after SIGTERM:\n{server.log_tail()}"


@pytest.fixture(scope="session")
def server():
    """The built-in model, no keys, private image URLs allowed (the image server is on loopback)."""
    srv = Server("--allow-private-image-urls").start()
    yield srv
    code = srv.stop()
    assert code == 0, f"exit code {code} after SIGTERM:\n{srv.log_tail()}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="session")
def image_server():
    """fixtures/images over HTTP on a free loopback port."""
    handler = functools.partial(_QuietHandler, directory=str(IMAGES))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
