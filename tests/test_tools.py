"""Reading tool calls back from a model's text (router/tools.py), without a model."""

from __future__ import annotations

import json

import pytest

from llamapool.router import tools
from llamapool.router.schemas import ChatCompletionRequest, parse_body

TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_weather"}},
]


def _plan(**extra) -> tools.ToolPlan:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, **extra}
    plan = tools.plan(parse_body(json.dumps(body).encode(), ChatCompletionRequest))
    assert plan is not None
    return plan


@pytest.mark.parametrize(
    "text",
    [
        '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "utc"}}]}',
        ' {"tool_call": {"name": "get_time", "arguments": {"zone": "utc"}}}\n',
        '{"name": "get_time", "parameters": {"zone": "utc"}}',
        '{"name": "get_time", "arguments": "{\\"zone\\": \\"utc\\"}"}',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>',
        '```json\n{"tool_calls": [{"name": "get_time", "arguments": {"zone": "utc"}}]}\n```',
    ],
)
def test_the_call_shapes_models_write_are_read(text):
    (call,) = tools.parse_calls(text, _plan())
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) == {"zone": "utc"}


@pytest.mark.parametrize(
    "text",
    [
        "The time is noon.",
        '{"tool_calls": [{"name": "unknown", "arguments": {}}]}',
        '{"tool_calls": [{"name": "get_time", "arguments": [1]}]}',
        '{"tool_calls": []}',
        '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "utc"}',  # cut short
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call> and some words',
    ],
)
def test_anything_else_is_content(text):
    assert tools.parse_calls(text, _plan()) is None


def test_a_named_choice_accepts_only_that_function():
    plan = _plan(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tools.parse_calls('{"name": "get_time", "arguments": {}}', plan) is None
    assert tools.parse_calls('{"name": "get_weather", "arguments": {}}', plan)


def test_two_calls_unless_parallel_calls_are_off():
    text = json.dumps({"tool_calls": [{"name": "get_time", "arguments": {}}] * 2})
    assert len(tools.parse_calls(text, _plan())) == 2
    assert len(tools.parse_calls(text, _plan(parallel_tool_calls=False))) == 1


def test_a_stream_holds_only_what_may_be_a_call():
    reader = tools.CallReader(_plan())
    assert reader.feed("  ") == ""
    assert reader.feed("Hel") == "  Hel"
    assert reader.feed("lo") == "lo"
    assert reader.finish() == (None, "")
    reader = tools.CallReader(_plan())
    assert reader.feed('{"name": "get_time", ') == ""
    assert reader.feed('"arguments": {}}') == ""
    calls, held = reader.finish()
    assert calls[0]["function"]["name"] == "get_time" and held == ""
    reader = tools.CallReader(_plan())
    assert reader.feed("{not json") == ""
    assert reader.finish() == (None, "{not json")


def test_forced_calls_get_a_grammar_and_auto_does_not():
    assert _plan().grammar is None
    grammar = _plan(tool_choice="required").grammar
    assert '"\\"get_time\\""' in grammar and '"\\"get_weather\\""' in grammar
    named = _plan(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert '"\\"get_time\\""' not in named.grammar


def test_tool_choice_none_asks_for_no_call():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    body["tool_choice"] = "none"
    assert tools.plan(parse_body(json.dumps(body).encode(), ChatCompletionRequest)) is None
