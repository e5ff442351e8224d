"""The paged KV cache from outside (issue 11): a 2 MiB pool holds about four image sequences of
the tiny LLaVA-NeXT fixture, yet 24 concurrent greedy image requests all succeed and each answers
what it answers alone (admission waits for blocks, preemption recomputes, chunked prefill
interleaves); a prompt larger than the pool is a 400 naming it; the KV metrics are exported."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import requests

from conftest import FIXTURES, data_uri, image_part, user

N = 24
IMAGES = ["photo_120x160.png", "tiny_20x20.png", "portrait_300x200.png", "rgba_333x777.png",
          "photo_120x160.jpg", "wide_150x1200.png"]


def image_requests() -> list[dict]:
    out = []
    for i in range(N):
        messages = [user(image_part(data_uri(IMAGES[i % len(IMAGES)])), f"What is shown? ({i})")]
        out.append({"messages": messages, "max_tokens": 12 + i % 5, "temperature": 0})
    return out


def stream_text(client: openai.OpenAI, model: str, request: dict, barrier=None):
    if barrier is not None:
        barrier.wait(timeout=60)
    text, finish = [], None
    for chunk in client.chat.completions.create(model=model, stream=True, **request):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_a_pool_of_four_image_sequences_serves_24_concurrent_ones(spawn_server):
    server = spawn_server(
        "--model", str(FIXTURES / "tiny-llava-next"), "--kv-cache-memory", "2MiB",
        "--max-num-seqs", "24", "--max-waiting", "32",
    )
    card = requests.get(server.url + "/v1/models", timeout=10).json()["data"][0]
    model = card["id"]
    # 3 layers · 2 (K, V) · 2 KV heads · 8 dims · 4 bytes = 384 bytes per token.
    assert card["kv_cache_tokens"] == (2 << 20) // (384 * 16) * 16
    assert "KV cache" in server.log_text() and "blocks=341" in server.log_text()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    requests_ = image_requests()
    barrier = threading.Barrier(N)
    with ThreadPoolExecutor(max_workers=N) as pool:
        together = list(pool.map(lambda r: stream_text(client, model, r, barrier), requests_))
    alone = [stream_text(client, model, r) for r in requests_]
    for i, (got, solo) in enumerate(zip(together, alone)):
        assert got == solo, f"request {i}: under a full pool it answers otherwise"
        assert got[1] in ("stop", "length") and got[0], f"request {i}: {got}"

    # The KV gauges follow at the end of the engine's step, just after the last answer.
    for _ in range(100):
        metrics = server.metrics()
        if metrics["tga_kv_cache_blocks_used"] == 0:
            break
        time.sleep(0.05)
    assert metrics["tga_requests_running"] == 0 and metrics["tga_requests_waiting"] == 0
    assert metrics["tga_kv_cache_blocks_used"] == 0
    assert metrics["tga_kv_cache_usage_ratio"] == 0
    assert metrics["tga_kv_cache_blocks_free"] == 341
    # The same images came back: their prompt blocks were found in the prefix cache.
    assert metrics["tga_prefix_cache_hits_total"] > 0

    # Eight large images cannot fit 5456 positions: refused at validation, naming the pool.
    big = [image_part(data_uri("square_640x640.png"))] * 3 + ["describe"]
    response = server.post({"model": model, "messages": [user(*big)], "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "KV cache holds at most 5456 tokens" in error["message"], error
