"""How the OpenAI endpoints render a generation: whole responses, SSE chunks, usage."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from llamapool.ipc import protocol as P

_json = msgspec.json.Encoder()


def usage_dict(u: P.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def timings_dict(done: P.Done) -> dict[str, Any] | None:
    """The worker's own clock, in llama-server's `timings` shape (an extension field)."""
    t = done.timings
    if t is None:
        return None
    return {
        "cache_n": t.cached_tokens,
        "cache_slot_n": t.cache_slot_n,
        "cache_ram_n": t.cache_ram_n,
        "cache_shared_n": t.cache_shared_n,
        "prompt_n": done.usage.prompt_tokens - t.cached_tokens,
        "prompt_ms": round(t.prompt_ms, 3),
        "predicted_n": done.usage.completion_tokens,
        "predicted_ms": round(t.generate_ms, 3),
    }


def sse(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


class Shape:
    """How one endpoint renders deltas, final choices and whole responses."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _envelope(self, choices: list[dict[str, Any]], obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def delta(
        self,
        text: str | None,
        finish: str | None = None,
        role: bool = False,
        done: P.Done | None = None,
    ) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        env = self._envelope([choice], self.chunk_object)
        if done is not None and (timings := timings_dict(done)) is not None:
            env["timings"] = timings
        return sse(env)

    def usage_chunk(self, usage: P.Usage) -> bytes:
        env = self._envelope([], self.chunk_object)
        env["usage"] = usage_dict(usage)
        return sse(env)

    def tool_calls_delta(self, calls: list[dict[str, Any]]) -> bytes:
        """A chat stream's calls, one chunk each, whole (the `openai` client joins them)."""
        out = b""
        for i, call in enumerate(calls):
            delta = {"tool_calls": [{"index": i, **call}]}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            out += sse(self._envelope([choice], self.chunk_object))
        return out

    def whole(
        self, text: str, done: P.Done, calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            choice = {"index": 0, "message": message, "logprobs": None}
            choice["finish_reason"] = "tool_calls"
        elif self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }
        env = self._envelope([choice], self.object)
        env["usage"] = usage_dict(done.usage)
        if (timings := timings_dict(done)) is not None:
            env["timings"] = timings
        return env
