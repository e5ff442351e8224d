"""HTTP/1.1 by hand, for what `requests` will not send: partial heads, dripped, lying and endless
bodies, bytes that are not UTF-8, and connections reset (RST) in the middle of a response."""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass

from conftest import CHAT


def head(path: str, length: int | None = None, extra: str = "", method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if method == "POST":
        lines.append("Content-Type: application/json")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        return json.loads(self.body)["error"]


def read_response(sock: socket.socket, timeout: float) -> Response | None:
    """The response on `sock` (read to EOF, `Connection: close`), or None if the server closed
    the connection without one. Raises TimeoutError past `timeout`."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {timeout} s; got {data[:200]!r}")
        sock.settimeout(left)
        try:
            got = sock.recv(65536)
        except ConnectionResetError:
            got = b""
        if not got:
            break
        data += got
        if b"\r\n\r\n" in data:
            top, _, body = data.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":", 1)[1])
                for line in top.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if length and len(body) >= length[0]:
                break
    if not data:
        return None
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(lines[0].split()[1]), headers, body)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def exchange(port: int, data: bytes, timeout: float = 30) -> Response | None:
    with connect(port) as sock:
        sock.sendall(data)
        return read_response(sock, timeout)


def post(port: int, body: dict | bytes, path: str = CHAT, timeout: float = 30) -> Response | None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return exchange(port, head(path, len(payload)) + payload, timeout)


def reset(sock: socket.socket) -> None:
    """Closes with an RST (SO_LINGER 0): an abrupt disconnect, not a polite FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
