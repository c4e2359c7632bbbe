"""The one-at-a-time engine: one `Llama`, a lock around it, reset discipline, a token loop.

It serves the models the batching engine cannot: embedding models, multimodal models
(`mmproj_path`) and chat formats that exist only as llama-cpp-python handlers. The KV
cache is kept between requests so llama-cpp-python's prefix matching in `Llama.generate`
reuses a shared prompt prefix; after any error or cancel the state is reset, because a
half-evaluated batch leaves the cache out of step with `n_tokens` (the source of
"inconsistent sequence positions" errors).
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time

from llamapool.config import ModelSpec
from llamapool.errors import ErrorCode
from llamapool.ipc.protocol import Request, Usage
from llamapool.pool.llama_adapter import (
    AbortFlag,
    embed_tokens,
    evaluated_tokens,
    logit_bias_processor,
    stopping_criteria,
)
from llamapool.pool.prepare import (
    EmitFn,
    Preparer,
    RequestFailed,
    Result,
    Sink,
    TextOut,
    common_prefix,
    embeddings_refused,
    is_broken_pipe,
    llama_seed,
    load_llama,
    pick,
    temperature,
)

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The router asked this request to stop."""


class Engine:
    """Owns one `llama_cpp.Llama`; every call holds the lock for its whole duration."""

    capacity = 1  # requests served at once

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.cfg = spec.config
        self.lock = threading.Lock()
        self.llama = load_llama(spec)
        self._abort_flag = AbortFlag(self.llama.ctx)
        self._cancel = threading.Event()  # set when the running request is cancelled
        self._cancelled_ids: set[str] = set()
        self._running: str | None = None
        # time.monotonic() of the engine's last sign of life; the I/O thread's stall watchdog
        # reads it (a float assignment is atomic under the GIL).
        self.progress_at = time.monotonic()
        self.preparer = Preparer(self.llama, spec, n_ctx=self.llama.n_ctx())
        self.n_ctx = self.preparer.n_ctx

    def abort(self) -> None:
        """Stop the running decode (prompt evaluation included) at the next graph node.

        Called from the worker's I/O thread; `run` clears it when the next request starts.
        """
        self._abort_flag.set()

    # -- public entry points --------------------------------------------------

    def serve(self, jobs: queue.Queue[Request | None], sink: Sink) -> None:
        """Serve requests from `jobs` one at a time until None arrives."""
        while (req := jobs.get()) is not None:
            rid = req.request_id
            self.progress_at = time.monotonic()
            sink.start(rid)
            self._running = rid
            self._cancel.clear()
            if rid in self._cancelled_ids:
                self._cancel.set()
            try:
                emit = functools.partial(sink.chunk, rid)
                result = self.run(req, emit, self._cancel)
            except Cancelled:
                sink.error(rid, ErrorCode.CANCELLED, "request cancelled")
            except RequestFailed as exc:
                sink.error(rid, exc.code, exc.message, exc.param)
            except Exception as exc:
                if is_broken_pipe(exc):
                    raise
                log.exception("request %s failed", rid)
                sink.error(rid, ErrorCode.GENERATION_FAILED, self._failure(exc))
            else:
                sink.done(rid, result)
            finally:
                self._running = None
                self._cancelled_ids.discard(rid)

    def _failure(self, exc: Exception) -> str:
        return f"generation failed in model {self.spec.id!r}: {exc}"

    def forget(self, request_id: str) -> None:
        """The request has ended: drop a cancel that arrived after its last step."""
        self._cancelled_ids.discard(request_id)

    def cancel(self, request_id: str) -> None:
        """Stop a request, queued or running (called from the worker's I/O thread)."""
        self._cancelled_ids.add(request_id)
        if self._running == request_id:
            self._cancel.set()
            self.abort()

    def run(self, req: Request, emit: EmitFn, cancelled: threading.Event) -> Result:
        """Serve one request under the lock; reset the state after any error or cancel."""
        with self.lock:
            # A CANCEL may have arrived while this request waited for the lock.
            self._abort_flag.set(cancelled.is_set())
            try:
                if req.kind == "embedding":
                    return self._embed(req)
                return self._generate(req, emit, cancelled)
            except RuntimeError:
                self.llama.reset()
                if cancelled.is_set():  # llama_decode returned "aborted"
                    raise Cancelled() from None
                raise
            except BaseException:
                self.llama.reset()
                raise
            finally:
                if self.cfg.reset_each_request:
                    self.llama.reset()

    # -- generation -----------------------------------------------------------

    def _generate(self, req: Request, emit: EmitFn, cancelled: threading.Event) -> Result:
        if req.kind == "chat" and self.preparer.formatter is None:
            return self._generate_with_handler(req, emit, cancelled)
        llama = self.llama
        started = time.perf_counter()  # the prompt's clock includes templating and tokenizing
        _refuse_scoring(req, self.spec.id)
        prep = self.preparer.prepare(req)
        llama.set_seed(prep.seed)
        logits_processor = None
        if prep.logit_bias:
            logits_processor = logit_bias_processor(prep.logit_bias)

        cached = self._cached_prefix(prep.tokens)
        first_token_at: float | None = None
        out = TextOut(self.preparer.vocab, prep, emit)
        if not out.wants_tokens:  # `max_tokens: 0`
            return out.result(len(prep.tokens), cached, started, None)
        gen = llama.generate(
            prep.tokens,
            top_k=prep.top_k,
            top_p=prep.top_p,
            min_p=prep.min_p,
            temp=prep.temperature,
            repeat_penalty=prep.repeat_penalty,
            frequency_penalty=prep.frequency_penalty,
            presence_penalty=prep.presence_penalty,
            logits_processor=logits_processor,
        )
        try:
            for token in gen:
                self.progress_at = time.monotonic()
                if cancelled.is_set():
                    raise Cancelled()
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if out.push(token):
                    break
        finally:
            gen.close()
        return out.result(len(prep.tokens), cached, started, first_token_at)

    def _cached_prefix(self, tokens: list[int]) -> int:
        return common_prefix(evaluated_tokens(self.llama), tokens)

    def _generate_with_handler(
        self, req: Request, emit: EmitFn, cancelled: threading.Event
    ) -> Result:
        """Chat through llama-cpp-python's own handler (multimodal models)."""
        cfg, p = self.cfg, req.params
        produced = 0

        def stop_when_cancelled() -> bool:
            nonlocal produced
            produced += 1
            self.progress_at = time.monotonic()
            return cancelled.is_set()

        stream = self.llama.create_chat_completion(
            messages=req.messages or [],
            stream=True,
            max_tokens=p.max_tokens or cfg.max_tokens,
            temperature=temperature(pick(p.temperature, cfg.temperature)),
            top_p=pick(p.top_p, cfg.top_p),
            top_k=pick(p.top_k, cfg.top_k),
            min_p=pick(p.min_p, cfg.min_p),
            repeat_penalty=pick(p.repeat_penalty, cfg.repeat_penalty),
            stop=p.stop if p.stop is not None else cfg.stop_list(),
            seed=llama_seed(p.seed if p.seed is not None else cfg.seed),
            stopping_criteria=stopping_criteria(stop_when_cancelled),
        )
        finish = "stop"
        for chunk in stream:
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") or ""
            if text:
                emit(text, 1)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        if cancelled.is_set():
            raise Cancelled()
        return Result(finish, Usage(prompt_tokens=0, completion_tokens=produced))

    # -- embeddings -----------------------------------------------------------

    def _embed(self, req: Request) -> Result:
        if not self.cfg.embedding:
            raise embeddings_refused(self.spec.id)
        inputs = req.inputs or []
        vectors: list[list[float]] = []
        n_tokens = 0
        for i, text in enumerate(inputs):
            if isinstance(text, list):  # token ids, taken as they are
                tokens = self.preparer.check_tokens(text, "input")
            else:
                tokens = self.llama.tokenize(text.encode("utf-8"), add_bos=True)
            if not tokens or not text:
                raise RequestFailed(
                    ErrorCode.INVALID_REQUEST,
                    f"input {i} is empty: nothing to embed",
                    param="input",
                )
            if len(tokens) > self.n_ctx:
                raise RequestFailed(
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"an input is {len(tokens)} tokens; model {self.spec.id!r} has a context "
                    f"of {self.n_ctx} tokens",
                    param="input",
                )
            n_tokens += len(tokens)
            self.progress_at = time.monotonic()
            if isinstance(text, list):
                vec = embed_tokens(self.llama, tokens)
            else:
                vec = self.llama.embed(text)
            if vec and isinstance(vec[0], list):
                # No pooling in the model: mean-pool the per-token vectors ourselves.
                width = len(vec[0])
                vec = [sum(row[j] for row in vec) / len(vec) for j in range(width)]
            vectors.append(_unit(vec))
        return Result(
            "stop", Usage(prompt_tokens=n_tokens, completion_tokens=0), embeddings=vectors
        )


def _refuse_scoring(req: Request, model_id: str) -> None:
    """Logprobs and echo are the batching engine's; this one refuses them by name."""
    for param, asked in (("logprobs", req.logprobs is not None), ("echo", req.echo)):
        if asked:
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"model {model_id!r} cannot return `{param}` (it is served one request at a "
                "time, through llama-cpp-python's own generation)",
                param=param,
            )


def _unit(vector: list[float]) -> list[float]:
    """`vector` scaled to length 1, as OpenAI and llama-server return embeddings."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [float(x) / norm for x in vector] if norm > 0 else [float(x) for x in vector]
