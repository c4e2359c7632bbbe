"""The `direct` target: llama-cpp-python in the harness process, one stream, no HTTP.

It runs the same generation code as the mutex baseline, so it is the ceiling a server can
reach for one stream with the same thread count.
"""

from __future__ import annotations

import pathlib
import time

from benchmarks.client import ChatRequest, RequestResult
from benchmarks.generation import ChatParams, TokenCounter, stream_chat


class DirectModel:
    """One `Llama` loaded in this process."""

    def __init__(self, model_path: pathlib.Path, n_ctx: int, n_threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            # llama-cpp-python would otherwise evaluate prompts on every core, which a pool
            # instance (pinned to its own cores) cannot: compare like with like.
            n_threads_batch=n_threads,
            verbose=False,
        )

    def run(self, request: ChatRequest, clock_origin: float = 0.0) -> RequestResult:
        """Generate one request, timed like an HTTP one; never raises."""
        params = ChatParams.from_body(request.body("direct"))
        counter = TokenCounter(params.logit_bias)
        result = RequestResult(index=request.index, tokens_source="sampler", done=True)
        t0 = time.perf_counter()
        result.start_s = t0 - clock_origin
        last_token_at = None
        try:
            for chunk in stream_chat(self.llm, params, counter):
                choice = chunk["choices"][0]
                if choice.get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - t0
                    last_token_at = now
                    result.chunks += 1
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
        except Exception as exc:  # a llama.cpp error is a result to report, not a crash
            result.error, result.error_message = f"direct:{type(exc).__name__}", str(exc)
        result.e2e_s = time.perf_counter() - t0
        result.completion_tokens = counter.completion_tokens(result.finish_reason)
        result.prompt_tokens = counter.prompt_tokens
        if result.ttft_s is not None and last_token_at is not None:
            result.decode_s = last_token_at - t0 - result.ttft_s
        if result.error is None:
            if result.finish_reason is None:
                result.error = "truncated:no_finish_reason"
            else:
                result.ok = True
        return result

    def close(self) -> None:
        self.llm.close()
