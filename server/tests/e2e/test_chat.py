"""The official openai client against the real binary (built-in tiny model)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import IMAGES


def model_id(client) -> str:
    return client.models.list().data[0].id


def data_uri(name: str) -> str:
    mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[name.rsplit(".", 1)[1]]
    return f"data:{mime};base64,{base64.b64encode((IMAGES / name).read_bytes()).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def complete(client, messages, **kwargs):
    return client.chat.completions.create(model=model_id(client), messages=messages, **kwargs)


def stream_text(client, messages, **kwargs) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in client.chat.completions.create(
        model=model_id(client), messages=messages, stream=True, **kwargs
    ):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


def test_models_lists_the_builtin_model(client):
    models = client.models.list().data
    assert len(models) == 1
    extra = models[0].model_extra
    assert extra["builtin"] is True and extra["supports_images"] is True
    assert extra["max_model_len"] > 0


def test_text_completion_and_usage(client):
    result = complete(client, [{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_stream_matches_non_stream_and_reports_usage(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    plain = complete(client, messages, max_tokens=24, temperature=0)
    text, finish = stream_text(client, messages, max_tokens=24, temperature=0)
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    chunks = list(
        client.chat.completions.create(
            model=model_id(client), messages=messages, max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4


def test_same_seed_same_output(client):
    messages = [{"role": "user", "content": "Pick a word."}]
    runs = [
        complete(client, messages, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
        .choices[0].message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_images_as_data_uri_and_url(client, image_server):
    for url in (data_uri("photo_120x160.png"), f"{image_server}/landscape_480x640.png"):
        result = complete(
            client,
            [{"role": "user", "content": [{"type": "text", "text": "Describe."}, image_part(url)]}],
            max_tokens=4, temperature=0,
        )
        text_only = complete(client, [{"role": "user", "content": "Describe."}], max_tokens=4)
        assert result.usage.prompt_tokens > text_only.usage.prompt_tokens + 100, "image tokens"


def test_several_images_in_one_conversation(client, image_server):
    content = [
        {"type": "text", "text": "Compare these."},
        image_part(data_uri("photo_120x160.jpg")),
        image_part(f"{image_server}/portrait_300x200.png"),
        image_part(data_uri("photo_120x160.webp")),
    ]
    result = complete(client, [{"role": "user", "content": content}], max_tokens=4, temperature=0)
    assert result.choices[0].finish_reason in ("stop", "length")


def test_concurrent_streams_match_solo_and_batch(client, server):
    before = server.metrics()
    prompts = [(f"Count to {i}.", 4 + (i * 7) % 40) for i in range(32)]

    def run(prompt_and_len):
        prompt, n = prompt_and_len
        return stream_text(client, [{"role": "user", "content": prompt}], max_tokens=n, temperature=0)[0]

    with ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(run, prompts))
    after = server.metrics()
    alone = [run(p) for p in prompts]
    assert together == alone

    def delta(series):
        return after.get(series, 0.0) - before.get(series, 0.0)

    assert delta('tga_requests_total{route="/v1/chat/completions",status="200"}') == 32
    assert delta("tga_batch_size_count") > delta('tga_batch_size_bucket{le="1"}'), "batches above 1"


def test_disconnected_streams_free_slots_and_are_counted(server):
    before = server.metrics().get("tga_client_disconnects_total", 0.0)
    body = json.dumps({
        "messages": [{"role": "user", "content": "Go on forever."}],
        "max_tokens": 2000, "stream": True, "temperature": 0,
    })
    conns = []
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert b"assistant" in response.read1(4096)
        conns.append((conn, response))
    for conn, _ in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics.get("tga_requests_running") == 0 and metrics.get("tga_requests_waiting") == 0:
            break
        time.sleep(0.2)
    metrics = server.metrics()
    assert metrics["tga_requests_running"] == 0
    assert metrics["tga_client_disconnects_total"] - before >= 10
