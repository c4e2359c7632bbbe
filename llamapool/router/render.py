"""How the OpenAI endpoints render a generation: whole responses, SSE chunks, usage."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from llamapool.ipc import protocol as P

_json = msgspec.json.Encoder()


def usage_dict(u: P.Usage) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }
    if u.drafted_tokens:  # speculative decoding, in OpenAI's predicted-outputs fields
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": u.accepted_tokens,
            "rejected_prediction_tokens": u.drafted_tokens - u.accepted_tokens,
        }
    return usage


def timings_dict(done: P.Done) -> dict[str, Any] | None:
    """The worker's own clock, in llama-server's `timings` shape (an extension field)."""
    t = done.timings
    if t is None:
        return None
    timings: dict[str, Any] = {
        "cache_n": t.cached_tokens,
        "cache_slot_n": t.cache_slot_n,
        "cache_ram_n": t.cache_ram_n,
        "cache_shared_n": t.cache_shared_n,
        "prompt_n": done.usage.prompt_tokens - t.cached_tokens,
        "prompt_ms": round(t.prompt_ms, 3),
        "predicted_n": done.usage.completion_tokens,
        "predicted_ms": round(t.generate_ms, 3),
    }
    if done.usage.drafted_tokens:  # as llama-server, only when it drafted
        timings["draft_n"] = done.usage.drafted_tokens
        timings["draft_n_accepted"] = done.usage.accepted_tokens
    return timings


def sse(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


def merged_usage(parts: list[P.Usage], n: int) -> P.Usage:
    """The usage of a request's choices, `n` per prompt in order: each prompt counted once
    (as OpenAI counts it with `n`), every choice's completion tokens."""
    first = parts[::n]
    return P.Usage(
        prompt_tokens=sum(u.prompt_tokens for u in first),
        completion_tokens=sum(u.completion_tokens for u in parts),
        cached_tokens=sum(u.cached_tokens for u in first),
    )


def _text(token: bytes) -> str:
    return token.decode("utf-8", "replace")


def chat_logprobs(entries: list[P.TokenLogprob]) -> dict[str, Any]:
    """OpenAI's `choices[].logprobs` of a chat: `content`, one object per token."""
    content = [
        {
            "token": _text(e.token),
            "logprob": e.logprob,
            "bytes": list(e.token),
            "top_logprobs": [
                {"token": _text(t.token), "logprob": t.logprob, "bytes": list(t.token)}
                for t in e.top
            ],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[P.TokenLogprob]) -> dict[str, Any]:
    """OpenAI's `choices[].logprobs` of a completion: parallel lists per token. The top
    alternatives include the token itself (up to `logprobs` + 1, as OpenAI says); an echoed
    prompt's first token has null for both. Tokens spelled alike (bytes of a split
    character all read U+FFFD) share a key, which keeps the likeliest."""
    tops: list[dict[str, float] | None] = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t in e.top:  # most likely first
            top.setdefault(_text(t.token), t.logprob)
        top.setdefault(_text(e.token), e.logprob)
        tops.append(top)
    return {
        "tokens": [_text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": tops,
        "text_offset": [e.offset for e in entries],
    }


class Shape:
    """How one endpoint renders deltas, final choices and whole responses."""

    def __init__(self, kind: str, model: str, *, logprobs: bool = False):
        self.kind, self.model = kind, model
        self.logprobs = logprobs  # the request asked for them: `logprobs` is never null
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

    def render_logprobs(self, entries: list[P.TokenLogprob] | None) -> dict[str, Any] | None:
        """A choice's (or a chunk's) `logprobs`: null unless the request asked for them."""
        if not self.logprobs:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries or [])
        return completion_logprobs(entries or [])

    def delta(
        self,
        text: str | None,
        finish: str | None = None,
        role: bool = False,
        done: P.Done | None = None,
        *,
        index: int = 0,
        logprobs: list[P.TokenLogprob] | None = None,
    ) -> bytes:
        lp = self.render_logprobs(logprobs) if logprobs else None
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        env = self._envelope([choice], self.chunk_object)
        if done is not None and (timings := timings_dict(done)) is not None:
            env["timings"] = timings
        return sse(env)

    def usage_chunk(self, usage: P.Usage) -> bytes:
        env = self._envelope([], self.chunk_object)
        env["usage"] = usage_dict(usage)
        return sse(env)

    def tool_calls_delta(self, calls: list[dict[str, Any]], *, index: int = 0) -> bytes:
        """A chat stream's calls, one chunk each, whole (the `openai` client joins them)."""
        out = b""
        for i, call in enumerate(calls):
            delta = {"tool_calls": [{"index": i, **call}]}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            out += sse(self._envelope([choice], self.chunk_object))
        return out

    def choice(
        self,
        text: str,
        done: P.Done,
        calls: list[dict[str, Any]] | None = None,
        *,
        index: int = 0,
        logprobs: list[P.TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        """One finished choice of a whole (non-streamed) response."""
        lp = self.render_logprobs(logprobs)
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            return {
                "index": index,
                "message": message,
                "logprobs": lp,
                "finish_reason": "tool_calls",
            }
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            return {
                "index": index,
                "message": message,
                "logprobs": lp,
                "finish_reason": done.finish_reason,
            }
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": done.finish_reason}

    def whole(
        self,
        text: str,
        done: P.Done,
        calls: list[dict[str, Any]] | None = None,
        logprobs: list[P.TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        env = self._envelope([self.choice(text, done, calls, logprobs=logprobs)], self.object)
        env["usage"] = usage_dict(done.usage)
        if (timings := timings_dict(done)) is not None:
            env["timings"] = timings
        return env

    def whole_many(self, choices: list[dict[str, Any]], usage: P.Usage) -> dict[str, Any]:
        """A whole response of several choices (prompts × n), in index order."""
        env = self._envelope(choices, self.object)
        env["usage"] = usage_dict(usage)
        return env
