"""One streamed chat completion on a `llama_cpp.Llama`, shared by the mutex baseline and `direct`.

Both baselines run exactly this code, so the gap between them is the HTTP server alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ChatParams:
    """The OpenAI request fields the baselines honour."""

    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    stop: list[str] | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ChatParams:
        """Validate an OpenAI chat request body; raises ValueError with a client-facing message."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError("each message needs a 'role' and 'content'")
        bias = body.get("logit_bias") or None
        stop = body.get("stop")
        return cls(
            messages=messages,
            max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 256),
            temperature=float(body.get("temperature", 0.8)),
            top_p=float(body.get("top_p", 0.95)),
            seed=None if body.get("seed") is None else int(body["seed"]),
            logit_bias={int(k): float(v) for k, v in bias.items()} if bias else None,
            stop=[stop] if isinstance(stop, str) else stop,
        )


class TokenCounter:
    """A logits processor that counts sampling steps and applies the logit bias.

    llama-cpp-python's streamed chat chunks do not map one-to-one to tokens and carry no
    usage, so the sampler is the only exact count. The bias is applied here because
    llama-cpp-python drops `logit_bias` when a logits processor is also given
    (`LogitsProcessorList.extend` returns None).
    """

    def __init__(self, logit_bias: dict[int, float] | None) -> None:
        bias = logit_bias or {}
        self._ids = np.fromiter(bias.keys(), dtype=np.intc, count=len(bias))
        self._bias = np.fromiter(bias.values(), dtype=np.single, count=len(bias))
        self.prompt_tokens = 0
        self.steps = 0

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.steps == 0:
            # On the first step the context holds exactly the prompt.
            self.prompt_tokens = len(input_ids)
        self.steps += 1
        if self._ids.size:
            scores[self._ids] += self._bias
        return scores

    def completion_tokens(self, finish_reason: str | None) -> int:
        # An end-of-generation token is sampled but not part of the completion.
        return max(0, self.steps - 1) if finish_reason == "stop" else self.steps

    def usage(self, finish_reason: str | None) -> dict[str, int]:
        completion = self.completion_tokens(finish_reason)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def stream_chat(llm: Any, params: ChatParams, counter: TokenCounter) -> Iterator[dict[str, Any]]:
    """llama-cpp-python's streamed chat chunks for `params`, counted by `counter`."""
    from llama_cpp import LogitsProcessorList

    return llm.create_chat_completion(
        messages=params.messages,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
        stream=True,
        logits_processor=LogitsProcessorList([counter]),
    )
