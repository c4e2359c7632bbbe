"""Structured outputs end to end: JSON mode and JSON Schema, held by llama.cpp's grammar.

The tiny model's weights are random, so whatever shape its output has comes from the
grammar alone: every response must parse and validate.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from conftest import running_server
from serverutil import model_entry

# Bounded everywhere (enum, boolean, integer, short strings), so even a random model
# finishes the JSON well inside max_tokens.
RECORD = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer"},
        "tag": {"enum": ["red", "green", "blue"]},
        "word": {"type": "string", "maxLength": 6},
        "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "number"}]},
    },
    "required": ["ok", "n", "tag", "word", "items", "maybe"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD}}
MESSAGES = [{"role": "user", "content": "Describe a record."}]


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    # reset_each_request: a free request's greedy text is compared with its text alone, and
    # a prompt partly reused from the KV cache may sample differently (docs/operations.md).
    config = {"n_parallel": 16, "reset_each_request": True}
    models = [model_entry("tiny", tiny_gguf, config=config)]
    with running_server(tmp_path_factory.mktemp("structured"), models) as srv:
        yield srv


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(client, temperature):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            response_format=SCHEMA_FORMAT,
            max_tokens=400,
            temperature=temperature,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), RECORD)
        assert r.usage.completion_tokens > 0


def test_json_schema_output_validates_streamed(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        response_format=SCHEMA_FORMAT,
        max_tokens=400,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    jsonschema.validate(json.loads(text), RECORD)
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode_gives_an_object(server, stream):
    # A bias towards "}" closes the object: a random model would write keys until
    # max_tokens. The grammar still decides what may follow, and then only the end.
    close = client_token_id(server, "}")
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "response_format": {"type": "json_object"},
        "max_tokens": 40,
        "logit_bias": {str(close): 20},
        "stream": stream,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line[6:7] == "{"]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        finish = events[-1]["choices"][0]["finish_reason"]
    else:
        text = r.json()["choices"][0]["message"]["content"]
        finish = r.json()["choices"][0]["finish_reason"]
    assert finish == "stop"
    assert isinstance(json.loads(text), dict)


def client_token_id(server, char: str) -> int:
    """The tiny model's byte token for an ASCII character (<0xNN>, after 5 control tokens)."""
    return 5 + ord(char)


def test_a_grammar_cut_by_max_tokens_ends_with_length(client):
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=SCHEMA_FORMAT, max_tokens=5
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].message.content.startswith("{")


def test_constrained_and_free_requests_share_a_batch(server):
    # Free requests' greedy text must not change because constrained ones ran beside them.
    free = {"model": "tiny", "messages": MESSAGES, "max_tokens": 48, "temperature": 0}
    alone = httpx.post(f"{server.url}/v1/chat/completions", json=free, timeout=60).json()
    alone_text = alone["choices"][0]["message"]["content"]

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            constrained = {**free, "max_tokens": 400, "response_format": SCHEMA_FORMAT}
            bodies = [free] * 8 + [constrained] * 8
            rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=b) for b in bodies))
            return [r.json() for r in rs]

    results = asyncio.run(run())
    for r in results[:8]:
        assert r["choices"][0]["message"]["content"] == alone_text
    for r in results[8:]:
        assert r["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), RECORD)
    # One instance with 16 slots served all of them, so they ran in the same batches.
    (worker,) = server.pool()["workers"]
    assert worker["capacity"] == 16


def _chat(**extra) -> dict:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **extra}


def _schema(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            _schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}),
            "response_format.json_schema.schema.properties.a.minimum",
        ),
        (_schema({"type": "object", "not": {}}), "response_format.json_schema.schema.not"),
        (_schema({"type": "decimal"}), "response_format.json_schema.schema.type"),
        (
            _schema({"type": "object", "properties": {}, "required": ["a"]}),
            "response_format.json_schema.schema.required",
        ),
        (
            _schema({"$ref": "https://example.com/s.json"}),
            "response_format.json_schema.schema.$ref",
        ),
        (
            _schema({"type": "string", "format": "email"}),
            "response_format.json_schema.schema.format",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
            "response_format.json_schema.name",
        ),
    ],
)
def test_unsupported_response_formats_are_400s_naming_the_field(server, response_format, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(response_format=response_format))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert param.rsplit(".", 1)[-1] in r.json()["error"]["message"]
