"""Legacy completions with the official openai client, vLLM's /tokenize and /detokenize over raw
HTTP, and the documented fields the server refuses by name, against the real binary."""

from __future__ import annotations

import openai
import pytest
import requests

from conftest import BUILTIN_MODEL, data_uri, image_part, image_token_counts, upright_size, user

PROMPT = "The quick brown fox"
BOS = 1  # the tiny fixture's <s>


def tokenize(server, **body) -> dict:
    response = requests.post(server.url + "/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def detokenize(server, tokens: list[int]) -> str:
    response = requests.post(server.url + "/detokenize", json={"tokens": tokens}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


def test_completion_of_a_raw_prompt(client, server):
    result = client.completions.create(model=BUILTIN_MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert result.object == "text_completion" and result.model == BUILTIN_MODEL
    assert result.id.startswith("cmpl-")
    choice = result.choices[0]
    assert choice.index == 0 and isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length")
    # No chat template: the prompt is the tokenizer's ids of the text, BOS first.
    ids = tokenize(server, prompt=PROMPT)
    assert ids["tokens"][0] == BOS and ids["count"] == len(ids["tokens"])
    assert result.usage.prompt_tokens == ids["count"]
    assert 0 < result.usage.completion_tokens <= 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    # The same ids as a token prompt give the same greedy text.
    again = client.completions.create(model=BUILTIN_MODEL, prompt=ids["tokens"], max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text
    # OpenAI's default max_tokens is 16.
    default = client.completions.create(model=BUILTIN_MODEL, prompt=PROMPT, temperature=0)
    assert default.usage.completion_tokens == 16 or default.choices[0].finish_reason == "stop"
    echoed = client.completions.create(
        model=BUILTIN_MODEL, prompt=PROMPT, max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + choice.text


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=BUILTIN_MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model=BUILTIN_MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completion_logprobs_legacy_shape(client):
    result = client.completions.create(
        model=BUILTIN_MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = result.choices[0].logprobs
    n = result.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == n
    assert len(logprobs.top_logprobs) == n
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0.0
        # Greedy: the sampled token is the most likely one, among the three alternatives.
        assert 1 <= len(top) <= 4 and top[token] == logprob
        assert logprob == pytest.approx(max(top.values()))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_tokenize_detokenize_round_trip(server):
    text = "Hello world, how are you?"
    plain = tokenize(server, prompt=text, add_special_tokens=False, return_token_strs=True)
    assert plain["tokens"] and plain["tokens"][0] != BOS
    assert len(plain["token_strs"]) == plain["count"]
    assert detokenize(server, plain["tokens"]) == text
    with_bos = tokenize(server, prompt=text)
    assert with_bos["tokens"] == [BOS, *plain["tokens"]]
    assert with_bos["max_model_len"] == 32768
    assert detokenize(server, with_bos["tokens"]).startswith("<s>")


def test_tokenize_messages_counts_image_positions_as_the_chat_route(client, server):
    name = "portrait_300x200.png"
    messages = [user(image_part(data_uri(name)), "What is this?")]
    tokenized = tokenize(server, messages=messages)
    image_id = tokenize(server, prompt="<image>", add_special_tokens=False)["tokens"]
    assert len(image_id) == 1
    assert tokenized["tokens"].count(image_id[0]) == image_token_counts()[upright_size(name)]
    chat = client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == tokenized["count"]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"suffix": "end"}, "suffix"),
        ({"echo": True, "logprobs": 2}, "echo"),
        ({"n": 0}, "n"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": "look at <image>"}, "prompt"),
    ],
)
def test_completions_refusals(client, fields, param):
    body = {"model": BUILTIN_MODEL, "prompt": PROMPT, "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**body)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param


def test_chat_refuses_tools_and_audio_and_accepts_unknown_fields(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    hello = [{"role": "user", "content": "Hello"}]
    for fields, param in [
        ({"tools": tools}, "tools"),
        ({"tools": tools, "tool_choice": "required"}, "tool_choice"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=BUILTIN_MODEL, messages=hello, max_tokens=2, **fields)
        assert refused.value.body["param"] == param, fields
    ok = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=hello, max_tokens=2, tools=tools, tool_choice="none",
        extra_body={"some_unknown_option": True},
    )
    assert ok.choices[0].message.content is not None


def test_chat_content_on_the_completions_route_is_refused_clearly(server):
    for body in (
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": [{"type": "image_url", "image_url": {"url": data_uri("photo_120x160.png")}}]},
    ):
        response = requests.post(server.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert "/v1/chat/completions" in response.json()["error"]["message"]
