"""The error matrix of SERVING.md over raw HTTP: status, OpenAI error JSON, x-request-id, and the
server goes on serving afterwards."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def png_claiming(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    iend = b"IEND"
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
        + struct.pack(">I", 0) + iend + struct.pack(">I", zlib.crc32(iend))
    )


def with_image(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


IMAGE = "messages[0].content[1].image_url"
CASES = [
    # id, body, headers, status, code, param
    ("malformed_json", '{"messages": [', AUTH, 400, "invalid_json", None),
    ("wrong_content_type", "{}", {**AUTH, "Content-Type": "text/plain"}, 415, "unsupported_media_type", None),
    ("bad_base64", with_image("data:image/png;base64,@@@"), AUTH, 400, "invalid_image", IMAGE),
    ("not_an_image", with_image(b64(b"plain text, not pixels")), AUTH, 400, "invalid_image", IMAGE),
    ("huge_png_header", with_image(b64(png_claiming(100000, 100000))), AUTH, 400, "invalid_image", IMAGE),
    ("private_url", with_image("http://127.0.0.1:9/x.png"), AUTH, 400, "invalid_image_url", IMAGE),
    ("oversized_body", {"messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]}, AUTH, 413, "request_too_large", None),
    ("context_overflow", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, AUTH, 400, "context_length_exceeded", "messages"),
    ("unknown_model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, AUTH, 404, "model_not_found", "model"),
    ("missing_key", {"messages": [{"role": "user", "content": "hi"}]}, {"Content-Type": "application/json"}, 401, "invalid_api_key", None),
    ("bad_key", {"messages": [{"role": "user", "content": "hi"}]}, {**AUTH, "Authorization": "Bearer nope"}, 401, "invalid_api_key", None),
]


@pytest.mark.parametrize("name,body,headers,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_error_matrix(guarded_server, name, body, headers, status, code, param):
    if isinstance(body, dict):
        body = json.dumps(body)
    got, response_headers, raw = guarded_server.request(
        "POST", "/v1/chat/completions", body=body, headers={**headers, "x-request-id": f"e2e-{name}"}
    )
    assert got == status, raw
    assert response_headers["x-request-id"] == f"e2e-{name}"
    error = json.loads(raw)["error"]
    assert error["code"] == code and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    # The server goes on serving.
    ok, _, _ = guarded_server.request(
        "POST", "/v1/chat/completions",
        body={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2},
        headers=AUTH,
    )
    assert ok == 200


def test_unknown_route_is_json_404(guarded_server):
    status, headers, raw = guarded_server.request("GET", "/v1/nothing", headers=AUTH)
    assert status == 404 and json.loads(raw)["error"]["code"] == "unknown_url"
    assert headers["x-request-id"]


def test_operational_routes_stay_public(guarded_server):
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert guarded_server.request("GET", path)[0] == 200, path
