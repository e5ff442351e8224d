"""`n` choices per request with the official openai client against the real binary: the choices
share one prefill (and its KV blocks, copy-on-write), choice `i` of a seeded request is the
one-choice request with `seed + i`, streams carry each choice's index, and the logprob bytes of
every choice spell its content."""

from __future__ import annotations

import openai
import pytest

from conftest import BUILTIN_MODEL, data_uri, image_part, user

PROMPT = [{"role": "user", "content": "Tell me about the cat in the picture."}]


def check_bytes(choice) -> None:
    if choice.logprobs is None or "\ufffd" in choice.message.content:
        return
    joined = b"".join(bytes(entry.bytes) for entry in choice.logprobs.content)
    assert joined == choice.message.content.encode(), (joined, choice.message.content)


def chat(client, messages=PROMPT, **kwargs):
    kwargs.setdefault("temperature", 1.0)
    kwargs.setdefault("max_tokens", 12)
    result = client.chat.completions.create(model=BUILTIN_MODEL, messages=messages, **kwargs)
    for i, choice in enumerate(result.choices):
        assert choice.index == i
        check_bytes(choice)
    return result


def texts(result) -> list[str]:
    return [choice.message.content for choice in result.choices]


def test_seeded_choices_are_reproducible_and_each_is_its_own_seed(client):
    three = chat(client, n=3, seed=42, logprobs=True)
    assert len(three.choices) == 3
    assert texts(chat(client, n=3, seed=42, logprobs=True)) == texts(three)
    alone = [texts(chat(client, seed=42 + i, logprobs=True))[0] for i in range(3)]
    assert texts(three) == alone
    assert len(set(alone)) > 1, alone
    one = chat(client, seed=42)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == sum(
        chat(client, seed=42 + i).usage.completion_tokens for i in range(3)
    )


def test_streamed_choices_carry_their_index(client):
    want = texts(chat(client, n=3, seed=7))
    stream = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=PROMPT, n=3, seed=7, temperature=1.0, max_tokens=12,
        stream=True, stream_options={"include_usage": True},
    )
    got = ["", "", ""]
    finished = [None, None, None]
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            got[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert got == want
    assert all(reason in ("stop", "length") for reason in finished), finished
    assert usage is not None and usage.completion_tokens > 0


def test_choices_of_an_image_request(client):
    messages = [user("What is in this picture?", image_part(data_uri("photo_120x160.png")))]
    three = chat(client, messages=messages, n=3, seed=5)
    alone = [texts(chat(client, messages=messages, seed=5 + i))[0] for i in range(3)]
    assert texts(three) == alone
    greedy = chat(client, messages=messages, n=2, temperature=0)
    assert texts(greedy)[0] == texts(greedy)[1]


def test_completions_with_n(client):
    result = client.completions.create(
        model=BUILTIN_MODEL, prompt="The quick brown fox", n=2, seed=3, temperature=1.0, max_tokens=8
    )
    assert [c.index for c in result.choices] == [0, 1]
    alone = [
        client.completions.create(
            model=BUILTIN_MODEL, prompt="The quick brown fox", seed=3 + i, temperature=1.0, max_tokens=8
        ).choices[0].text
        for i in range(2)
    ]
    assert [c.text for c in result.choices] == alone
    streamed = ["", ""]
    for chunk in client.completions.create(
        model=BUILTIN_MODEL, prompt="The quick brown fox", n=2, seed=3, temperature=1.0, max_tokens=8,
        stream=True,
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == alone


@pytest.mark.parametrize("fields", [{"n": 0}, {"n": 17}, {"n": 2, "extra_body": {"diagnostics": {}}}])
def test_bad_n_is_a_400_naming_it(client, fields):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, **fields)
    assert err.value.body["param"] == "n", err.value.body


def test_each_choice_follows_the_grammar(client):
    import json

    result = chat(client, n=3, seed=9, max_tokens=48, response_format={"type": "json_object"})
    for choice in result.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        else:
            assert choice.message.content.lstrip().startswith("{"), choice.message.content
    assert len(set(texts(result))) > 1, texts(result)
