"""Tool calling: checks `tools` and `tool_choice`, constrains forced calls, reads calls back.

The prompt side is pool/tool_prompt.py (the model's template or the generic tool prompt).
A forced call (`"required"` or a named function) is sampled under a grammar of the generic
shape, `{"tool_calls": [{"name": ..., "arguments": {...}}]}`, with each tool's parameters
schema inside, so the call is well formed whatever the model. With `"auto"` the output is
free: a well-formed call (that shape, a bare `{"name", "arguments"}` object, or Hermes'
`<tool_call>...</tool_call>` blocks) becomes `tool_calls`, anything else is content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from llamapool import errors
from llamapool.pool import tool_prompt
from llamapool.router import structured
from llamapool.router.schemas import ChatCompletionRequest

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# Text that may still become a call: held back from a stream until it is known.
_CALL_STARTS = ("{", "[", "<tool_call>", "```")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt, its sampling and its answer."""

    tools: list[dict[str, Any]]  # OpenAI tool dicts, for the template
    names: frozenset[str]
    choice: str  # "auto", "required" or "function"
    name: str | None  # the function a named choice forces
    parallel: bool
    grammar: str | None  # forced calls only
    instructions: str  # the generic tool prompt

    @property
    def forced(self) -> bool:
        return self.choice != "auto"


def plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """Check the request's tool fields (400s naming them); None when no call is possible."""
    if body.tools is None or not body.tools:
        if body.tool_choice is not None:
            raise errors.InvalidRequest(
                "`tool_choice` is only allowed when `tools` are given", param="tool_choice"
            )
        if body.parallel_tool_calls is not None:
            raise errors.InvalidRequest(
                "`parallel_tool_calls` is only allowed when `tools` are given",
                param="parallel_tool_calls",
            )
        return None
    tools, params = [], {}
    for i, tool in enumerate(body.tools):
        if tool.type != "function":
            raise errors.InvalidRequest(
                f"tools[{i}] is of type {tool.type[:40]!r}; this server calls only `function` "
                "tools",
                param=f"tools[{i}].type",
            )
        if tool.function is None:
            raise errors.InvalidRequest(
                f"tools[{i}] has no `function`", param=f"tools[{i}].function"
            )
        fn = tool.function
        schema = {"type": "object", "properties": {}} if fn.parameters is None else fn.parameters
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise errors.InvalidRequest(
                f"tools[{i}].function.parameters must be a JSON Schema of type `object`",
                param=f"tools[{i}].function.parameters",
            )
        if fn.name in params:
            raise errors.InvalidRequest(
                f"tools[{i}] repeats the function name {fn.name!r}",
                param=f"tools[{i}].function.name",
            )
        params[fn.name] = schema
        tools.append(msgspec.to_builtins(tool))
    choice, name = "auto", None
    if isinstance(body.tool_choice, str):
        choice = body.tool_choice
    elif body.tool_choice is not None:
        choice, name = "function", body.tool_choice.function.name
        if name not in params:
            raise errors.InvalidRequest(
                f"tool_choice names function {name[:64]!r}, which is not in `tools` "
                f"({', '.join(params)})",
                param="tool_choice.function.name",
            )
    if choice == "none":
        return None
    parallel = body.parallel_tool_calls is not False and choice != "function"
    grammar = None
    if choice != "auto":
        forced = {name: params[name]} if name is not None else params
        grammar = _calls_grammar(forced, parallel, list(params))
    return ToolPlan(
        tools=tools,
        names=frozenset(params),
        choice=choice,
        name=name,
        parallel=parallel,
        grammar=grammar,
        instructions=tool_prompt.instructions(tools, choice, name, parallel),
    )


def _calls_grammar(params: dict[str, Any], parallel: bool, order: list[str]) -> str:
    index = {n: i for i, n in enumerate(order)}
    calls = []
    for fn_name, schema in params.items():
        where = f"tools[{index[fn_name]}].function.parameters"
        structured.check_schema(schema, where, refs=False)
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn_name}, "arguments": schema},
                "required": ["name", "arguments"],
            }
        )
    items: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    envelope = {
        "type": "object",
        "properties": {
            tool_prompt.CALLS_KEY: {
                "type": "array",
                "items": items,
                "minItems": 1,
                **({} if parallel else {"maxItems": 1}),
            }
        },
        "required": [tool_prompt.CALLS_KEY],
    }
    return structured.schema_grammar(envelope, "tools")


def parse_calls(text: str, plan: ToolPlan) -> list[dict[str, Any]] | None:
    """The OpenAI `tool_calls` in a model's answer, or None if it is not a well-formed call."""
    text = text.strip()
    if (fence := _FENCE.match(text)) is not None:
        text = fence.group(1)
    if text.startswith("<tool_call>"):
        found = [_load(block) for block in _HERMES.findall(text)]
        if any(f is None for f in found) or _HERMES.sub("", text).strip():
            return None
    else:
        loaded = _load(text)
        if isinstance(loaded, dict) and tool_prompt.CALLS_KEY in loaded:
            found = loaded[tool_prompt.CALLS_KEY]
        elif isinstance(loaded, dict) and "tool_call" in loaded:
            found = [loaded["tool_call"]]
        else:
            found = loaded if isinstance(loaded, list) else [loaded]
    if not isinstance(found, list) or not found:
        return None
    calls = []
    for item in found if plan.parallel else found[:1]:
        call = _call(item, plan)
        if call is None:
            return None
        calls.append(call)
    return calls


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(item: Any, plan: ToolPlan) -> dict[str, Any] | None:
    if not isinstance(item, dict) or item.get("name") not in plan.names:
        return None
    if plan.name is not None and item["name"] != plan.name:
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        args = _load(args)
    if not isinstance(args, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(args, ensure_ascii=False)},
    }


class CallReader:
    """A stream's text with tools: content goes out at once unless it may be a call.

    Forced calls are held whole; with `"auto"`, text is held only while its start could
    still be a call (`{`, `[`, `<tool_call>`, a code fence), then sent as content.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._held = ""
        self._content = False  # decided: this answer is content, stream it

    def feed(self, text: str) -> str:
        """The part of `text` to send as content now."""
        if self._content:
            return text
        self._held += text
        start = self._held.lstrip()
        if self.plan.forced or not start or _may_be_call(start):
            return ""
        self._content, out, self._held = True, self._held, ""
        return out

    def finish(self) -> tuple[list[dict[str, Any]] | None, str]:
        """At the end: the calls, or None and the content still held."""
        if self._content:
            return None, ""
        calls = parse_calls(self._held, self.plan)
        return calls, "" if calls is not None else self._held


def _may_be_call(start: str) -> bool:
    return any(start.startswith(p) or p.startswith(start) for p in _CALL_STARTS)
