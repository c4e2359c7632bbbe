"""Real behaviour with the embedded SmolLM2: its chat template is applied, answers make sense."""

from __future__ import annotations

import json

import jsonschema
import llama_cpp
import openai
import pytest
from conftest import running_server
from serverutil import model_entry

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    # One word asked for: the bare question tips this 135M model into French on
    # some CPUs (different SIMD kernels, different greedy path).
    {"role": "user", "content": "What is the capital of France? Answer in one word."},
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("smol"),
        [model_entry("smollm2", smollm2_gguf, config={"n_ctx": 4096})],
    ) as srv:
        yield srv


def test_greedy_answer_names_paris(smol):
    with openai.OpenAI(base_url=f"{smol.url}/v1", api_key="x", max_retries=0) as client:
        r = client.chat.completions.create(
            model="smollm2", messages=QUESTION, temperature=0, max_tokens=30
        )
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"  # the model ends its turn by itself
        streamed = client.chat.completions.create(
            model="smollm2", messages=QUESTION, temperature=0, max_tokens=30, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == r.choices[0].message.content


def test_chat_template_from_the_gguf_is_applied(smol, smollm2_gguf):
    vocab = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    rendered = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expected = len(vocab.tokenize(rendered.encode(), add_bos=False, special=True))
    with openai.OpenAI(base_url=f"{smol.url}/v1", api_key="x", max_retries=0) as client:
        r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=1)
    assert r.usage.prompt_tokens == expected


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
EXTRACT = [
    {"role": "system", "content": "Extract the person from the text as JSON."},
    {"role": "user", "content": "Maria Lopez, who is 34 years old, lives in Madrid."},
]


@pytest.mark.parametrize("stream", [False, True])
def test_extraction_with_a_json_schema(smol, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with openai.OpenAI(base_url=f"{smol.url}/v1", api_key="x", max_retries=0) as client:
        r = client.chat.completions.create(
            model="smollm2",
            messages=EXTRACT,
            response_format=fmt,
            temperature=0,
            max_tokens=80,
            stream=stream,
        )
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    person = json.loads(text)
    jsonschema.validate(person, PERSON)
    assert person["name"]  # the shape, not the model's wisdom


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_a_tool_round_trip(smol):
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris now?"}]
    with openai.OpenAI(base_url=f"{smol.url}/v1", api_key="x", max_retries=0) as client:
        first = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            temperature=0,
            max_tokens=80,
        )
        assert first.choices[0].finish_reason == "tool_calls"
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "c": 21}'}
        )
        final = client.chat.completions.create(
            model="smollm2", messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=60
        )
    choice = final.choices[0]
    # "auto": a plain answer, or a well-formed call; either way the shapes hold.
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "get_weather"
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content
    assert final.usage.prompt_tokens > first.usage.prompt_tokens
