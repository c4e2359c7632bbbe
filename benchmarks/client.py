"""The load client: one streamed chat request over httpx, timed and classified.

Every request ends as exactly one `RequestResult`: ok, or an error with a key that says
what kind (`http_503:queue_full`, `sse_error:worker_crashed`, `truncated:no_done`,
`timeout`, `transport:ReadError`, ...).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while moving.",
    "List some ideas for a rainy afternoon with children.",
    "Describe the water cycle to a ten year old.",
    "Write a friendly email inviting a colleague to lunch.",
    "What are the main differences between tea and coffee?",
    "Give advice to someone learning to cook for the first time.",
    "Describe a walk through a forest in autumn.",
)

# Error bodies are small; a runaway one must not eat the client's memory.
_MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class ChatRequest:
    """One benchmark request: the same index gives the same prompt and seed on every target."""

    index: int
    max_tokens: int
    temperature: float
    seed: int
    logit_bias: dict[int, float]

    def body(self, model_name: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": PROMPTS[self.index % len(PROMPTS)]}]
        return chat_body(
            model_name, messages, self.max_tokens, self.temperature, self.seed, self.logit_bias
        )


def chat_body(
    model_name: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    temperature: float,
    seed: int,
    logit_bias: dict[int, float],
) -> dict[str, Any]:
    """A streamed chat request body, with usage in the stream."""
    return {
        "model": model_name,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        # OpenAI's wire format has string keys.
        "logit_bias": {str(k): v for k, v in logit_bias.items()},
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def make_requests(
    count: int, max_tokens: int, temperature: float, seed: int, logit_bias: dict[int, float]
) -> list[ChatRequest]:
    """`count` requests with seeds seed, seed+1, ..."""
    return [ChatRequest(i, max_tokens, temperature, seed + i, logit_bias) for i in range(count)]


@dataclass
class RequestResult:
    """How one request ended. Times are seconds; `start_s` is relative to the run's clock."""

    index: int
    ok: bool = False
    status: int | None = None
    error: str | None = None
    error_message: str | None = None
    # A failure the client can act on: an OpenAI error body or SSE error event with a message.
    clear_error: bool = False
    retry_after: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    # The server's own time from taking the request to its first token (llama-server's and
    # llamapool's `timings.prompt_ms`): ttft_s minus this is what HTTP and routing add.
    server_ttft_s: float | None = None
    e2e_s: float | None = None
    decode_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    # Prompt tokens the server evaluated and those it took from its cache: llama-server's
    # and llamapool's `timings.prompt_n` / `cache_n`, else OpenAI's
    # `usage.prompt_tokens_details.cached_tokens` (evaluated = prompt_tokens - cached).
    prompt_evaluated: int | None = None
    prompt_cached: int | None = None
    tokens_source: str = "chunks"
    chunks: int = 0
    finish_reason: str | None = None
    done: bool = False
    # The answer's text, kept only when asked (a chat replay sends it back next turn).
    content: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not data["extra"]:
            del data["extra"]
        if data["content"] is None:
            del data["content"]
        return data


def _error_fields(obj: Any) -> tuple[str | None, str | None]:
    """(code, message) of an OpenAI error object, or (None, None) if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return None, None
    err = obj["error"]
    code = err.get("code") or err.get("type")
    message = err.get("message")
    return (str(code) if code is not None else None), (str(message) if message else None)


async def send_chat(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    index: int,
    timeout: float,
    clock_origin: float = 0.0,
    keep_content: bool = False,
) -> RequestResult:
    """POST one streamed chat request and classify how it ended; never raises.

    With `keep_content`, the streamed text is kept in `result.content`.
    """
    result = RequestResult(index=index, content="" if keep_content else None)
    t0 = time.perf_counter()
    result.start_s = t0 - clock_origin
    try:
        await asyncio.wait_for(_exchange(client, url, body, result, t0), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        result.error, result.error_message = "timeout", f"no complete answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        result.error, result.error_message = f"transport:{type(exc).__name__}", str(exc)
    end = time.perf_counter()
    result.e2e_s = end - t0
    if result.error is None:
        if result.finish_reason is None:
            result.error = "truncated:no_finish_reason"
            result.error_message = "stream ended without a finish_reason"
        elif not result.done:
            result.error = "truncated:no_done"
            result.error_message = "stream ended without data: [DONE]"
        else:
            result.ok = True
    _derive_evaluated(result)
    return result


def _derive_evaluated(result: RequestResult) -> None:
    """Evaluated prompt tokens from the cached count, for servers that send only that."""
    if (
        result.prompt_evaluated is None
        and result.prompt_cached is not None
        and isinstance(result.prompt_tokens, int)
    ):
        result.prompt_evaluated = result.prompt_tokens - result.prompt_cached


async def _exchange(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult, t0: float
) -> None:
    async with client.stream("POST", url, json=body) as response:
        result.status = response.status_code
        result.retry_after = response.headers.get("retry-after")
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            await _read_error_body(response, result)
            return
        last_token_at = None
        pieces: list[str] = []
        async for line in response.aiter_lines():
            # Cheap prefilter: only "data:" lines matter; comments and "event:" lines are skipped.
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                result.done = True
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                result.error, result.error_message = "protocol:bad_json", data[:200]
                return
            code, message = _error_fields(obj)
            if code is not None or message is not None:
                result.error = f"sse_error:{code or 'unknown'}"
                result.error_message = message
                result.clear_error = message is not None
                return
            for choice in obj.get("choices") or ():
                delta = choice.get("delta")
                if delta and delta.get("content"):
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - t0
                    last_token_at = now
                    result.chunks += 1
                    if result.content is not None:
                        pieces.append(delta["content"])
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
            timings = obj.get("timings")
            if isinstance(timings, dict):
                _read_timings(timings, result)
            usage = obj.get("usage")
            if usage:
                result.completion_tokens = int(usage.get("completion_tokens") or 0)
                result.prompt_tokens = usage.get("prompt_tokens")
                result.tokens_source = "usage"
                details = usage.get("prompt_tokens_details")
                cached = details.get("cached_tokens") if isinstance(details, dict) else None
                if isinstance(cached, int) and result.prompt_cached is None:
                    result.prompt_cached = cached
        if result.content is not None:
            result.content = "".join(pieces)
        if result.tokens_source != "usage":
            result.completion_tokens = result.chunks
        if result.ttft_s is not None and last_token_at is not None:
            result.decode_s = last_token_at - t0 - result.ttft_s


def _read_timings(timings: dict[str, Any], result: RequestResult) -> None:
    """llama-server's `timings` extension: the server's prompt time and token counts."""
    if isinstance(timings.get("prompt_ms"), int | float):
        result.server_ttft_s = timings["prompt_ms"] / 1000
    if isinstance(timings.get("prompt_n"), int):
        result.prompt_evaluated = timings["prompt_n"]
    # The cache count of `timings` wins over usage's: both come from the server, and
    # `timings` is what llama-server always sends.
    if isinstance(timings.get("cache_n"), int):
        result.prompt_cached = timings["cache_n"]


async def _read_error_body(response: httpx.Response, result: RequestResult) -> None:
    raw = b""
    async for part in response.aiter_bytes():
        raw += part
        if len(raw) > _MAX_ERROR_BODY:
            break
    status = response.status_code
    try:
        code, message = _error_fields(json.loads(raw))
    except ValueError:
        code, message = None, None
    if status == 200:
        result.error = "protocol:not_sse"
        result.error_message = "expected text/event-stream for a streamed request"
        return
    result.error = f"http_{status}:{code or 'no_error_body'}"
    result.error_message = message or raw[:200].decode("utf-8", "replace")
    result.clear_error = message is not None
