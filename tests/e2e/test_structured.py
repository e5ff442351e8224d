"""Structured outputs with the official openai client: `response_format` (json_object, json_schema
via `chat.completions.parse` with a Pydantic model) and vLLM's `guided_json`, `guided_regex`,
`guided_choice`. The built-in tiny model has random weights, which is the hardest test: whatever
noise it prefers, the grammar must turn into output that parses and validates."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
import requests
from pydantic import BaseModel, Field

from conftest import BUILTIN_MODEL, CHAT

ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]
    vaccinated: bool


class Owner(BaseModel):
    """Nested models: Pydantic's `$defs` and `$ref`."""

    nickname: str = Field(max_length=5)
    pets: list[Pet] = Field(max_length=2)


def test_parse_with_a_pydantic_model_returns_an_object_for_20_seeds(client):
    for seed in range(20):
        completion = client.chat.completions.parse(
            model=BUILTIN_MODEL,
            messages=ASK,
            response_format=Pet,
            temperature=1,
            seed=seed,
            max_tokens=300,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        pet = choice.message.parsed
        assert isinstance(pet, Pet), (seed, choice.message.content)
        assert Pet.model_validate_json(choice.message.content) == pet


def test_nested_schema_with_refs_validates(client):
    for seed in range(5):
        completion = client.chat.completions.parse(
            model=BUILTIN_MODEL,
            messages=ASK,
            response_format=Owner,
            temperature=1,
            seed=seed,
            max_tokens=400,
        )
        choice = completion.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(choice.message.parsed, Owner), choice.message.content


def test_json_schema_output_streams_the_same_text(client):
    # Without `additionalProperties: false` any extra key (with a string of any length) is valid.
    closed = {**Pet.model_json_schema(), "additionalProperties": False}
    schema = {"name": "pet", "schema": closed, "strict": True}
    fmt = {"type": "json_schema", "json_schema": schema}
    whole = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=ASK, response_format=fmt, seed=3, max_tokens=300
    )
    chunks = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=ASK, response_format=fmt, seed=3, max_tokens=300, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop"
    Pet.model_validate_json(text)


def test_json_object_output_parses(client):
    stopped = 0
    for seed in range(10):
        result = client.chat.completions.create(
            model=BUILTIN_MODEL,
            messages=ASK,
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=400,
        )
        choice = result.choices[0]
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        else:
            # Cut by max_tokens: a prefix of a JSON object.
            assert choice.finish_reason == "length" and choice.message.content.lstrip()[0] == "{"
    assert stopped > 0


def test_guided_choice_returns_one_of_the_choices(client):
    choices = ["positive", "negative", "neutral (mixed)"]
    for seed in range(10):
        result = client.chat.completions.create(
            model=BUILTIN_MODEL,
            messages=ASK,
            seed=seed,
            max_tokens=50,
            extra_body={"guided_choice": choices},
        )
        choice = result.choices[0]
        assert choice.message.content in choices and choice.finish_reason == "stop"


def test_guided_regex_matches(client):
    pattern = r"[A-Z][a-z]{1,6}-[0-9]{2,4}"
    for seed in range(10):
        result = client.chat.completions.create(
            model=BUILTIN_MODEL,
            messages=ASK,
            seed=seed,
            max_tokens=50,
            extra_body={"guided_regex": pattern},
        )
        choice = result.choices[0]
        assert re.fullmatch(pattern, choice.message.content), choice.message.content
        assert choice.finish_reason == "stop"


def test_guided_json_as_object_and_as_string(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    for guided in (schema, json.dumps(schema)):
        result = client.chat.completions.create(
            model=BUILTIN_MODEL, messages=ASK, seed=1, max_tokens=100,
            extra_body={"guided_json": guided},
        )
        value = json.loads(result.choices[0].message.content)
        assert set(value) == {"n"} and 0 <= value["n"] <= 9


def test_max_tokens_cuts_with_length(client):
    result = client.chat.completions.create(
        model=BUILTIN_MODEL, messages=ASK, seed=0, max_tokens=2,
        response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}},
    )
    assert result.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model=BUILTIN_MODEL, messages=ASK, response_format=Pet, seed=0, max_tokens=2
        )


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
         "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_invalid_structured_outputs_are_a_400_naming_the_field(server, extra, param):
    body = {"model": BUILTIN_MODEL, "messages": ASK, "max_tokens": 5, **extra}
    response = requests.post(server.url + CHAT, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"]


def test_unknown_response_format_type_is_a_400(server):
    body = {"model": BUILTIN_MODEL, "messages": ASK, "response_format": {"type": "yaml"}}
    response = requests.post(server.url + CHAT, json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_constrained_and_free_requests_share_the_batch(client):
    """Eight constrained sequences and free-text ones decode together; each keeps its own grammar
    and its seeded output is the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    def pet(seed):
        return client.chat.completions.parse(
            model=BUILTIN_MODEL, messages=ASK, response_format=Pet, seed=seed, max_tokens=300
        ).choices[0].message.content

    def free(seed):
        return client.chat.completions.create(
            model=BUILTIN_MODEL, messages=ASK, seed=seed, max_tokens=40
        ).choices[0].message.content

    alone = [pet(seed) for seed in range(8)]
    with ThreadPoolExecutor(12) as pool:
        together = [pool.submit(pet, seed) for seed in range(8)]
        noise = [pool.submit(free, seed) for seed in range(4)]
        assert [f.result() for f in together] == alone
        assert all(isinstance(f.result(), str) for f in noise)
    for text in alone:
        Pet.model_validate_json(text)
