"""The error matrix of SERVING.md over raw HTTP: status, OpenAI's error JSON, the request id, the
rejection counter, and the server goes on serving afterwards."""

from __future__ import annotations

import base64
import http.server
import json
import struct
import threading
import time
import zlib

import pytest
import requests

from conftest import API_KEY, CHAT, IMAGES, Server, data_uri, free_port, image_part, parse_metrics, user

MAX_BODY = 2 * 1024 * 1024
MAX_MODEL_LEN = 4096
KEY = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"Content-Type": "application/json"}
IMAGE_PARAM = "messages[0].content[1].image_url"


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` RGB pixels, with no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def with_image(url: str) -> dict:
    return {"messages": [user("look", image_part(url))], "max_tokens": 4}


def hi(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


@pytest.fixture(scope="module")
def guarded():
    """Default image guards (no private URLs), an API key, a small body limit and context."""
    srv = Server(
        "--api-key", API_KEY, "--max-body-bytes", MAX_BODY, "--max-model-len", MAX_MODEL_LEN
    ).start()
    yield srv
    code = srv.stop()
    assert code == 0, f"exit code {code} after SIGTERM:\n{srv.log_tail()}"


# id, body, extra headers, status, code, param, rejection reason counted
CASES = [
    ("malformed_json", '{"messages": [', {**KEY, **JSON}, 400, "invalid_json", None),
    ("not_an_object", "[1, 2]", {**KEY, **JSON}, 400, "invalid_value", None),
    ("positional_array", '[null, [{"role": "user", "content": "hi"}]]', {**KEY, **JSON}, 400,
     "invalid_value", None),
    ("missing_messages", {"max_tokens": 3}, KEY, 400, "invalid_value", None),
    ("wrong_content_type", json.dumps(hi()), {**KEY, "Content-Type": "text/plain"}, 415,
     "unsupported_media_type", None),
    ("no_content_type", json.dumps(hi()), KEY, 415, "unsupported_media_type", None),
    ("bad_base64", with_image("data:image/png;base64,@@@not-base64@@@"), KEY, 400, "invalid_image",
     IMAGE_PARAM),
    ("not_an_image", with_image(b64(b"plain text, not pixels " * 20)), KEY, 400, "invalid_image",
     IMAGE_PARAM),
    ("truncated_png", with_image(b64((b"\x89PNG\r\n\x1a\n" + b"\x00" * 40))), KEY, 400,
     "invalid_image", IMAGE_PARAM),
    ("png_claiming_100000x100000", with_image(b64(png_claiming(100_000, 100_000))), KEY, 400,
     "invalid_image", IMAGE_PARAM),
    ("non_image_data_uri", with_image("data:text/plain;base64,aGVsbG8="), KEY, 400, "invalid_image",
     IMAGE_PARAM),
    ("file_url", with_image("file:///etc/passwd"), KEY, 400, "invalid_image_url", IMAGE_PARAM),
    ("private_url_literal", with_image("http://127.0.0.1:9/x.png"), KEY, 400, "invalid_image_url",
     IMAGE_PARAM),
    ("metadata_url", with_image("http://169.254.169.254/latest/meta-data/"), KEY, 400,
     "invalid_image_url", IMAGE_PARAM),
    ("oversized_body", hi(padding="x" * (MAX_BODY + 1024)), KEY, 413, "request_too_large", None),
    ("context_overflow_max_tokens", hi(max_tokens=MAX_MODEL_LEN), KEY, 400,
     "context_length_exceeded", "messages"),
    ("context_overflow_prompt",
     {"messages": [{"role": "user", "content": "the cat sat on the mat " * 1500}]}, KEY, 400,
     "context_length_exceeded", "messages"),
    ("too_many_images", {"messages": [user("many", *[image_part(data_uri("tiny_20x20.png"))] * 9)]},
     KEY, 400, "too_many_images", "messages"),
    ("unknown_model", hi(model="gpt-4o"), KEY, 404, "model_not_found", "model"),
    ("n_above_limit", hi(n=17), KEY, 400, "invalid_value", "n"),
    ("temperature_out_of_range", hi(temperature=5), KEY, 400, "invalid_value", "temperature"),
    ("bad_role", {"messages": [{"role": "wizard", "content": "hi"}]}, KEY, 400, "invalid_value",
     "messages[0].role"),
    ("missing_key", hi(), {}, 401, "invalid_api_key", None),
    ("bad_key", hi(), {"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key", None),
    ("basic_auth", hi(), {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}, 401,
     "invalid_api_key", None),
]


@pytest.mark.parametrize("name,body,headers,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_error_matrix(guarded, name, body, headers, status, code, param):
    if isinstance(body, dict):
        body = json.dumps(body)
        headers = {**JSON, **headers}
    request_id = f"e2e-{name}"
    before = guarded.metrics()
    response = requests.post(
        guarded.url + CHAT, data=body, headers={**headers, "x-request-id": request_id}, timeout=60
    )
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] == request_id
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"], error
    expected_type = "authentication_error" if status == 401 else "invalid_request_error"
    assert error["type"] == expected_type, error
    if param is not None:
        assert error["param"] == param, error
    after = guarded.metrics()
    assert after.get(f'tga_requests_total{{route="{CHAT}",status="{status}"}}', 0) == before.get(
        f'tga_requests_total{{route="{CHAT}",status="{status}"}}', 0
    ) + 1
    reason = f'tga_requests_rejected_total{{reason="{code}"}}'
    assert after.get(reason, 0) == before.get(reason, 0) + 1, reason
    # Nothing was queued or left running, and the server goes on serving.
    assert after["tga_requests_running"] == 0 and after["tga_requests_waiting"] == 0
    ok = guarded.post(hi(), headers=KEY)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_context_error_names_the_counts(guarded):
    response = guarded.post(hi(max_tokens=MAX_MODEL_LEN))
    message = response.json()["error"]["message"]
    assert str(MAX_MODEL_LEN) in message and "maximum context length" in message
    # One token over the limit is refused, exactly at it is accepted (streamed, and dropped after
    # the first frame so the test does not wait for thousands of tokens).
    prompt_tokens = guarded.post(hi(max_tokens=1)).json()["usage"]["prompt_tokens"]
    over = guarded.post(hi(max_tokens=MAX_MODEL_LEN - prompt_tokens + 1))
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"
    with guarded.post(hi(max_tokens=MAX_MODEL_LEN - prompt_tokens, stream=True), stream=True) as ok:
        assert ok.status_code == 200, ok.text
        assert b"assistant" in next(ok.iter_content(chunk_size=None))


def test_routes_and_methods(guarded):
    response = requests.get(guarded.url + "/v1/nothing", headers=KEY, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    assert response.headers["x-request-id"]
    response = requests.get(guarded.url + CHAT, headers=KEY, timeout=10)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert requests.get(guarded.url + "/v1/models", timeout=10).status_code == 401
    assert requests.get(guarded.url + "/v1/models", headers=KEY, timeout=10).status_code == 200


def test_operational_routes_stay_public(guarded):
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert requests.get(guarded.url + path, timeout=10).status_code == 200, path
    text = requests.get(guarded.url + "/metrics", timeout=10).text
    assert parse_metrics(text)['tga_requests_total{route="/v1/chat/completions",status="401"}'] >= 1


def test_private_image_url_is_refused_without_the_flag(guarded, server, image_server):
    """A loopback image server that the permissive server can use is refused by the default guard,
    whether named by IP or by a host name that resolves to loopback."""
    name = "photo_120x160.png"
    port = image_server.rsplit(":", 1)[1]
    assert server.chat([user("look", image_part(f"{image_server}/{name}"))], max_tokens=2)
    for url in (f"{image_server}/{name}", f"http://localhost:{port}/{name}", f"http://[::1]:{port}/{name}"):
        response = guarded.post(with_image(url))
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_image_url" and error["param"] == IMAGE_PARAM, error
        assert "not a public address" in error["message"], error


def test_image_url_failures_are_client_errors(server, image_server):
    """With private URLs allowed: a 404, a dead port and a page that is not an image are 400s."""
    dead_port = free_port()
    for url, code in (
        (f"{image_server}/missing.png", "invalid_image_url"),
        (f"http://127.0.0.1:{dead_port}/x.png", "invalid_image_url"),
        (f"{image_server}/", "invalid_image"),
    ):
        response = server.post(with_image(url))
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["param"] == IMAGE_PARAM, (url, error)


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """`/slow`: a PNG that takes 5 s to start; `/big`: 64 KiB of PNG-looking bytes."""

    def do_GET(self):  # noqa: N802 (the base class's name)
        if self.path == "/slow":
            time.sleep(5)
        body = (IMAGES / "tiny_20x20.png").read_bytes() if self.path == "/slow" else b"\x89PNG" + b"\0" * 65536
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format, *args):  # noqa: A002
        pass


def test_image_size_and_fetch_time_caps(spawn_server):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        srv = spawn_server(
            "--allow-private-image-urls", "--image-fetch-timeout", "1", "--max-image-bytes", 32 * 1024
        )
        started = time.monotonic()
        response = srv.post(with_image(f"{base}/slow"))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_image_url"
        assert "timed out" in response.json()["error"]["message"]
        assert time.monotonic() - started < 4, "the fetch timeout was not applied"
        response = srv.post(with_image(f"{base}/big"))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_image"
        assert "larger than the limit" in response.json()["error"]["message"]
        response = srv.post(with_image(b64((IMAGES / "square_640x640.png").read_bytes())))
        assert (IMAGES / "square_640x640.png").stat().st_size > 32 * 1024
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image"
        assert srv.chat([user("ok?", image_part(data_uri("tiny_20x20.png")))], max_tokens=2)
    finally:
        httpd.shutdown()
        httpd.server_close()
