"""Tool calling end to end through the official `openai` client, with real llama.cpp.

The tiny model's weights are random: a forced call is well formed only because the
grammar makes it so, which is what these tests hold the server to.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from conftest import running_server
from serverutil import model_entry

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit", "days"],
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
# A random model would add calls to the list until max_tokens: a bias on "]" (the tiny
# model's byte token for it) closes the list at its first chance. The grammar still
# decides where "]" may go (inside a string it is just a character).
CLOSE_LIST = {str(5 + ord("]")): 100}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# A template that renders `tools` (as Hermes/Qwen templates do), for the native path.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    models = [
        model_entry("tiny", tiny_gguf, config={"n_parallel": 4}),
        model_entry("tiny-native", tiny_gguf, config={"chat_format_template": TOOLS_TEMPLATE}),
    ]
    with running_server(tmp_path_factory.mktemp("tools"), models) as srv:
        yield srv


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _check_calls(calls, names=("get_weather", "get_time"), at_most=None):
    assert calls
    if at_most is not None:
        assert len(calls) <= at_most
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


CHOICES = [
    ("required", ("get_weather", "get_time")),
    ({"type": "function", "function": {"name": "get_time"}}, ("get_time",)),
]


@pytest.mark.parametrize("model", ["tiny", "tiny-native"])
@pytest.mark.parametrize(("tool_choice", "names"), CHOICES)
def test_a_forced_call_parses(client, model, tool_choice, names):
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=300,
        logit_bias=CLOSE_LIST,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls, names)
    assert r.usage.completion_tokens > 0


@pytest.mark.parametrize(("tool_choice", "names"), CHOICES)
def test_a_forced_call_streams_and_the_client_assembles_it(client, tool_choice, names):
    kwargs = dict(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, logit_bias=CLOSE_LIST
    )
    with client.chat.completions.stream(**kwargs, max_tokens=300) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    _check_calls(final.choices[0].message.tool_calls, names)
    # The raw chunks, as a client without the helper reads them.
    chunks = list(client.chat.completions.create(**kwargs, max_tokens=300, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and all(d.id.startswith("call_") for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_makes_one_call(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
    )
    _check_calls(r.choices[0].message.tool_calls, at_most=1)


def test_auto_answers_of_a_random_model_are_content(client):
    # Its output is not a call (random letters), so it comes back as content, streamed too.
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=8, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_history_with_calls_and_results_renders_in_both_forms(client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "utc"}'},
    }
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    for model in ("tiny", "tiny-native"):
        r = client.chat.completions.create(
            model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=4
        )
        assert r.choices[0].finish_reason == "length"
        longer = client.chat.completions.create(
            model=model, messages=history, tools=TOOLS, max_tokens=1
        )
        # The tools (and, generically, the instructions) are in the prompt unless "none".
        assert longer.usage.prompt_tokens > r.usage.prompt_tokens


def _post(server, **extra) -> httpx.Response:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        (
            {
                "messages": [
                    *MESSAGES,
                    {"role": "tool", "content": "12:00"},
                ]
            },
            "messages[1].tool_call_id",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"n": {"type": "integer", "maximum": 3}},
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools[0].function.parameters.properties.n.maximum",
        ),
        (
            {"tools": TOOLS, "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tool_fields_are_400s_naming_the_field(server, extra, param):
    r = _post(server, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
