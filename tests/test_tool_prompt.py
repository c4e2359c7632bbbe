"""The two ways tools reach a prompt (pool/tool_prompt.py), with llama-cpp-python's formatter."""

from __future__ import annotations

import json

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llamapool.pool import tool_prompt

PLAIN = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}"
)
WITH_TOOLS = "{% if tools %}{{ tools | tojson }}{% endif %}" + PLAIN
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "time?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
]


def _formatter(template: str) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")


def test_a_template_that_renders_tools_is_told_apart():
    assert tool_prompt.supports_tools(_formatter(WITH_TOOLS))
    assert not tool_prompt.supports_tools(_formatter(PLAIN))
    assert not tool_prompt.supports_tools(_formatter("{{ raise_exception('no') }}"))


def test_the_generic_form_writes_calls_and_results_as_json():
    system = tool_prompt.instructions(TOOLS, "required", None, True)
    out = tool_prompt.generic_messages(HISTORY, system)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n")
    assert "get_time" in out[0]["content"] and "Call a tool now." in out[0]["content"]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_time", "arguments": {}, "id": "c1"}]
    }
    assert out[3]["role"] == "user"
    assert json.loads(out[3]["content"]) == {
        "tool_response": {"tool": "get_time", "content": "12:00", "tool_call_id": "c1"}
    }
    assert "12:00" in _formatter(PLAIN)(messages=out).prompt


def test_the_native_form_passes_arguments_as_objects():
    out = tool_prompt.native_messages(HISTORY)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {}
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == "{}"  # not changed in place


def test_a_system_message_is_added_when_there_is_none():
    out = tool_prompt.generic_messages(HISTORY[1:2], "TOOLS")
    assert out[0] == {"role": "system", "content": "TOOLS"}
