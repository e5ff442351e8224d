"""Continuous batching, backpressure and cancellation, observed from outside: outputs under load
equal solo outputs, the metrics count what was sent, and clients that go away free their slots."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from conftest import BUILTIN_MODEL, CHAT, chat_requests_total, data_uri, image_part, user

N_STREAMS = 32
WORDS = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()


def mixed_requests() -> list[dict]:
    """32 greedy requests of different prompt and output lengths; a few with an image."""
    requests_ = []
    for i in range(N_STREAMS):
        text = " ".join(WORDS[: 2 + i % len(WORDS)]) + f" ({i})"
        if i % 8 == 3:
            messages = [user(image_part(data_uri("tiny_20x20.png")), text)]
        else:
            messages = [{"role": "user", "content": text * (1 + i % 3)}]
        requests_.append({"messages": messages, "max_tokens": 4 + (i * 13) % 57, "temperature": 0})
    return requests_


def stream_text(client: openai.OpenAI, request: dict, barrier: threading.Barrier | None = None):
    if barrier is not None:
        barrier.wait(timeout=30)
    chunks = client.chat.completions.create(model=BUILTIN_MODEL, stream=True, **request)
    text, finish = [], None
    for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_concurrent_streams_are_batched_and_match_solo_outputs(spawn_server):
    server = spawn_server("--max-num-seqs", "16", "--max-waiting", "32")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    requests_ = mixed_requests()
    barrier = threading.Barrier(N_STREAMS)
    with ThreadPoolExecutor(max_workers=N_STREAMS) as pool:
        together = list(pool.map(lambda r: stream_text(client, r, barrier), requests_))
    metrics = server.metrics()
    assert chat_requests_total(metrics) == N_STREAMS
    assert chat_requests_total(metrics, "200") == N_STREAMS
    assert metrics["tga_requests_running"] == 0 and metrics["tga_requests_waiting"] == 0
    steps = metrics["tga_batch_size_count"]
    single = metrics['tga_batch_size_bucket{le="1"}']
    assert steps > single, "no decode step ran more than one sequence"
    assert metrics["tga_batch_size_sum"] / steps > 2, "batches stayed small under 32 concurrent streams"
    assert metrics['tga_batch_size_bucket{le="8"}'] < steps, "no decode step batched more than 8"
    generated = metrics["tga_generation_tokens_total"]

    alone = [stream_text(client, r) for r in requests_]
    for i, (got, solo) in enumerate(zip(together, alone)):
        assert got == solo, f"request {i}: batched output differs from solo output"
    assert all(finish in ("stop", "length") for _, finish in together)
    assert len({text for text, _ in together}) > N_STREAMS // 2, "outputs do not depend on the prompt"
    after = server.metrics()
    assert after["tga_generation_tokens_total"] == 2 * generated
    assert chat_requests_total(after, "200") == 2 * N_STREAMS


def open_stream(port: int, body: dict) -> socket.socket:
    """A raw streaming request; returns the socket once the first content frame has arrived."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while received.count(b"data: ") < 3:  # role frame, then content frames
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def test_disconnected_streams_free_their_slots_and_are_counted(spawn_server):
    # Exactly 10 admission slots: if a cancelled request kept its slot, the burst after the
    # disconnects would get 429s.
    server = spawn_server("--max-num-seqs", "10", "--max-waiting", "0")
    sockets = [
        open_stream(
            server.port,
            {
                "messages": [{"role": "user", "content": f"Tell me everything about {word}."}],
                "max_tokens": 30000,
                "temperature": 0,
                "stream": True,
            },
        )
        for word in WORDS[:10]
    ]
    metrics = server.metrics()
    assert (metrics["tga_requests_running"], metrics["tga_requests_waiting"]) == (10, 0)
    full = server.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert full.status_code == 429, full.text
    assert int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["code"] == "queue_full"

    for sock in sockets:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics["tga_client_disconnects_total"] >= 10 and metrics["tga_requests_running"] == 0:
            break
        time.sleep(0.05)
    assert metrics["tga_client_disconnects_total"] == 10
    assert metrics["tga_requests_running"] == 0 and metrics["tga_requests_waiting"] == 0
    assert metrics.get("tga_request_duration_seconds_count", 0) == 0, "cancelled requests finished"

    # Every slot is free again: a burst of 10 is accepted, none refused.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    short = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "temperature": 0}
    barrier = threading.Barrier(10)
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda _: stream_text(client, short, barrier), range(10)))
    assert len(set(results)) == 1
    metrics = server.metrics()
    assert metrics.get('tga_requests_rejected_total{reason="queue_full"}') == 1
    assert metrics["tga_client_disconnects_total"] == 10
    assert chat_requests_total(metrics, "200") == 20
