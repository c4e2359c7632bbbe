"""How tools reach the prompt: the model's own chat template, or a generic tool prompt.

A Jinja template that renders `tools` (Qwen, Hermes, Llama 3.x, ...) gets the tools and the
history as OpenAI sends them, with each call's arguments as an object (what those templates
iterate over). Any other template gets llama.cpp's generic tool prompt: a system message
listing the tools and the one JSON shape to answer with, and a history whose calls and
results are written in that shape (minja's polyfills, as llama-server does).
"""

from __future__ import annotations

import json
from typing import Any

# The shape a call is answered with in the generic prompt; router/tools.py reads it back.
CALLS_KEY = "tool_calls"
_PROBE = "llamapool_probe_tool"


def instructions(tools: list[dict[str, Any]], choice: str, name: str | None, parallel: bool) -> str:
    """The generic tool prompt's system text for `tools` (OpenAI tool dicts).

    `choice` is "auto", "required" or "function" (then `name` is the one to call).
    """
    listed = [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description") or "",
            "parameters": t["function"].get("parameters") or {"type": "object"},
        }
        for t in tools
    ]
    many = "one or more calls" if parallel else "exactly one call"
    text = (
        "You can call these tools:\n"
        f"{json.dumps(listed, ensure_ascii=False)}\n\n"
        f"To call tools, answer with only this JSON object ({many} in the list), nothing else:\n"
        f'{{"{CALLS_KEY}": [{{"name": "<tool name>", "arguments": {{<arguments as the '
        "tool's parameters describe>}}]}\n"
    )
    if choice == "function":
        return text + f"Call the tool `{name}` now."
    if choice == "required":
        return text + "Call a tool now."
    return text + "Call a tool only when it helps; otherwise answer the user in plain text."


def has_tool_turns(messages: list[dict[str, Any]]) -> bool:
    """Whether the history holds calls or their results (they need one of the two forms)."""
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def supports_tools(formatter: Any) -> bool:
    """Whether a chat formatter's template renders `tools` (llama.cpp's minja probes alike)."""
    tool = {
        "type": "function",
        "function": {"name": _PROBE, "description": "", "parameters": {"type": "object"}},
    }
    try:
        result = formatter(messages=[{"role": "user", "content": "x"}], tools=[tool])
    except Exception:
        return False
    return _PROBE in getattr(result, "prompt", "")


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history for a template that renders tools: arguments as objects."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_with_object_arguments(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def generic_messages(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The history for any other template: calls and results as JSON text, `system` first."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                calls.append(
                    {
                        "name": call["function"]["name"],
                        "arguments": _arguments(call["function"]["arguments"]),
                        "id": call["id"],
                    }
                )
            payload: dict[str, Any] = {CALLS_KEY: calls}
            if m.get("content"):
                payload["content"] = m["content"]
            m = {"role": "assistant", "content": json.dumps(payload, ensure_ascii=False)}
        elif m.get("role") == "tool":
            response = {"tool": m.get("name") or names.get(m["tool_call_id"], "")}
            response.update(content=m.get("content") or "", tool_call_id=m["tool_call_id"])
            text = json.dumps({"tool_response": response}, ensure_ascii=False)
            m = {"role": "user", "content": text}
        out.append(m)
    if system:
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _arguments(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text  # kept as the client sent it


def _with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = {**call["function"], "arguments": _arguments(call["function"]["arguments"])}
    return {**call, "function": function}
