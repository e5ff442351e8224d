"""The official openai client against the real binary serving its built-in tiny model."""

from __future__ import annotations

import json

import requests

from conftest import BUILTIN_MODEL, data_uri, image_part, image_token_counts, user

HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


def complete(client, messages, **kwargs):
    return client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, **kwargs)


def stream(client, messages, **kwargs) -> tuple[str, str | None, list]:
    """Streamed text, finish reason and the chunks themselves."""
    chunks = list(
        client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, stream=True, **kwargs)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) <= 1, "one finish_reason per choice"
    return text, (finish[0] if finish else None), chunks


def test_models_health_ready_and_openapi(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [BUILTIN_MODEL]
    extra = models[0].model_extra
    assert extra["builtin"] is True and extra["supports_images"] is True
    assert extra["max_model_len"] == 32768
    assert models[0].owned_by and models[0].created > 0
    for path in ("/health", "/ready"):
        response = requests.get(server.url + path, timeout=10)
        assert response.status_code == 200 and response.json()["status"], path
    # (server/tests/http_api.rs keeps it identical to the committed openapi/openapi.json)
    served = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert served["openapi"].startswith("3.") and "/v1/chat/completions" in served["paths"]


def test_text_completion_and_usage(client):
    result = complete(client, HELLO, max_tokens=12, temperature=0)
    assert result.object == "chat.completion" and result.model == BUILTIN_MODEL
    assert result.id.startswith("chatcmpl-")
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = result.usage
    assert 0 < usage.completion_tokens <= 12
    assert usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12


def test_stream_matches_non_stream_and_reports_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, *HELLO]
    plain = complete(client, messages, max_tokens=40, temperature=0)
    text, finish, chunks = stream(
        client, messages, max_tokens=40, temperature=0, stream_options={"include_usage": True}
    )
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [], "the usage chunk comes last"
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_on_the_wire(server):
    body = {"messages": HELLO, "max_tokens": 10, "temperature": 0, "stream": True}
    response = server.post(body, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = b"".join(response.iter_content(chunk_size=None)).decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    data = [e.removeprefix("data: ") for e in events if not e.startswith(":")]
    assert all(e.startswith("data: ") or e.startswith(":") for e in events), raw
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_same_seed_same_output_other_seed_other_output(client):
    def sample(seed):
        return complete(
            client, HELLO, max_tokens=32, temperature=1.0, top_p=0.95, seed=seed
        ).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert sample(99) != first, "the seed has no effect"
    text, _, _ = stream(client, HELLO, max_tokens=32, temperature=1.0, top_p=0.95, seed=1234)
    assert text == first, "streaming changes the sampled output"


def test_logprobs_of_greedy_tokens_are_the_top_ones(client):
    result = complete(client, HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    entries = result.choices[0].logprobs.content
    assert len(entries) == result.usage.completion_tokens - (result.choices[0].finish_reason == "stop")
    for entry in entries:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        best = max(t.logprob for t in entry.top_logprobs)
        assert abs(entry.logprob - best) < 1e-5, "greedy picked a token that is not the most likely"


def test_stop_string_cuts_the_output(client):
    full = complete(client, HELLO, max_tokens=40, temperature=0).choices[0].message.content
    words = [w for w in full.split() if w.isalpha() and len(w) >= 3]
    assert words, f"no word to stop at in {full!r}"
    stop = words[len(words) // 2]
    cut = complete(client, HELLO, max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    text, finish, _ = stream(client, HELLO, max_tokens=40, temperature=0, stop=stop)
    assert (text, finish) == (full[: full.index(stop)], "stop")


def test_image_as_data_uri_and_as_url_give_the_same_answer(client, server, image_server):
    name = "landscape_480x640.png"
    before = server.metrics()
    answers = []
    for url in (data_uri(name), f"{image_server}/{name}"):
        result = complete(
            client, [user(image_part(url), "What is in this image?")], max_tokens=12, temperature=0
        )
        answers.append((result.choices[0].message.content, result.usage.prompt_tokens))
    after = server.metrics()
    assert answers[0] == answers[1]
    assert after["tga_images_total"] - before["tga_images_total"] == 2
    # The image takes as many positions as transformers' processor gives it.
    expected = image_token_counts()[(480, 640)]
    assert after["tga_image_tokens_total"] - before["tga_image_tokens_total"] == 2 * expected
    text_only = complete(client, [user("What is in this image?")], max_tokens=1, temperature=0)
    assert answers[0][1] > text_only.usage.prompt_tokens + expected - 5


def test_several_images_in_one_request_and_conversation(client, server, image_server):
    counts = image_token_counts()
    before = server.metrics()
    messages = [
        user(
            "Compare these.",
            image_part(data_uri("square_640x640.png")),
            image_part(f"{image_server}/portrait_300x200.png"),
            image_part(data_uri("tiny_20x20.png")),
        ),
        {"role": "assistant", "content": "They differ."},
        user(image_part(f"{image_server}/grey_1000x100.png"), "And this one?"),
    ]
    result = complete(client, messages, max_tokens=6, temperature=0)
    after = server.metrics()
    assert result.choices[0].finish_reason in ("stop", "length")
    assert after["tga_images_total"] - before["tga_images_total"] == 4
    expected = counts[(640, 640)] + counts[(300, 200)] + counts[(20, 20)] + counts[(1000, 100)]
    assert after["tga_image_tokens_total"] - before["tga_image_tokens_total"] == expected
    assert result.usage.prompt_tokens > expected


def test_unknown_fields_are_ignored(server):
    body = {
        "messages": HELLO,
        "max_tokens": 3,
        "frequency_penalty": 0,
        "parallel_tool_calls": False,
        "some_future_field": {"x": 1},
        "user": "e2e",
    }
    response = server.post(body)
    assert response.status_code == 200, response.text
