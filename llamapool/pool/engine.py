"""The one `Llama` a worker owns: a lock around it, reset discipline, a token loop.

The KV cache is kept between requests so llama-cpp-python's prefix matching in
`Llama.generate` reuses a shared prompt prefix; after any error or cancel the
state is reset, because a half-evaluated batch leaves the cache out of step with
`n_tokens` (the source of "inconsistent sequence positions" errors).
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import functools
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llamapool.config import ModelSpec
from llamapool.ipc.protocol import Request, Timings, Usage

log = logging.getLogger(__name__)

EmitFn = Callable[[str, int], None]


class Sink(Protocol):
    """Where an engine reports each request's start, text, and end (the worker's socket)."""

    def start(self, request_id: str) -> None: ...

    def chunk(self, request_id: str, text: str, tokens: int) -> None: ...

    def done(self, request_id: str, result: Result) -> None: ...

    def error(self, request_id: str, code: str, message: str, param: str | None = None) -> None: ...


def is_broken_pipe(exc: BaseException) -> bool:
    return isinstance(exc, BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno == errno.EPIPE
    )


class Cancelled(Exception):
    """The router asked this request to stop."""


class RequestFailed(Exception):
    """A request the engine refuses or cannot finish; carries the client-facing code."""

    def __init__(self, code: str, message: str, *, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class Result:
    """What a finished request reports in DONE."""

    __slots__ = ("finish_reason", "usage", "timings", "embeddings")

    def __init__(
        self,
        finish_reason: str,
        usage: Usage,
        timings: Timings | None = None,
        embeddings: list[list[float]] | None = None,
    ):
        self.finish_reason = finish_reason
        self.usage = usage
        self.timings = timings
        self.embeddings = embeddings


@dataclass
class Prepared:
    """A validated generation request: prompt tokens, limits and sampling, all resolved."""

    tokens: list[int]
    max_tokens: int
    stops: list[str]
    seed: int
    top_k: int
    top_p: float
    min_p: float
    temperature: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    logit_bias: dict[int, float]


class TextOut:
    """Turns sampled tokens into emitted text: EOG, stop sequences, max_tokens, UTF-8.

    Text that may be the start of a stop sequence is held back until it cannot be.
    """

    def __init__(self, engine: Engine, prep: Prepared, emit: EmitFn):
        self._llama = engine.llama
        self._is_eog = engine.is_eog
        self._stops = prep.stops
        self._max_tokens = prep.max_tokens
        self._emit = emit
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # decoded text held back because it may start a stop sequence
        self._unsent_tokens = 0
        self.produced = 0
        self.finish = "length"

    def push(self, token: int) -> bool:
        """Take one sampled token; True when the request is finished."""
        if self._is_eog(token):
            self.finish = "stop"
            return True
        self.produced += 1
        self._unsent_tokens += 1
        self._pending += self._decoder.decode(self._llama.detokenize([token]))
        cut = _find_stop(self._pending, self._stops)
        if cut is not None:
            self._pending = self._pending[:cut]
            self.finish = "stop"
            self._decoder.reset()  # bytes it holds come after the stop sequence
            return True
        safe = len(self._pending) - _held_back(self._pending, self._stops)
        if safe > 0:
            self._emit(self._pending[:safe], self._unsent_tokens)
            self._pending, self._unsent_tokens = self._pending[safe:], 0
        return self.produced >= self._max_tokens

    def result(
        self, n_prompt: int, n_cached: int, started: float, first_token_at: float | None
    ) -> Result:
        """Emit what is held back (never a stop sequence found) and report the request."""
        self._pending += self._decoder.decode(b"", final=True)
        if self._pending or self._unsent_tokens:
            self._emit(self._pending, self._unsent_tokens)
        self._pending, self._unsent_tokens = "", 0
        ended = time.perf_counter()
        first = first_token_at or ended
        return Result(
            self.finish,
            Usage(prompt_tokens=n_prompt, completion_tokens=self.produced, cached_tokens=n_cached),
            Timings(
                prompt_ms=(first - started) * 1000,
                generate_ms=(ended - first) * 1000,
                cached_tokens=n_cached,
            ),
        )


def chats_through_handler(cfg: Any) -> bool:
    """Whether chat runs through a llama-cpp-python handler (no formatter we can drive)."""
    if cfg.mmproj_path is not None:
        return True
    if cfg.chat_format is None:
        return False
    from llama_cpp import llama_chat_format

    try:
        handler = llama_chat_format.get_chat_completion_handler(cfg.chat_format)
    except Exception:
        return False  # an unknown name: Engine refuses it with a clear error
    return _formatter_from_handler(handler) is None


def _formatter_from_handler(handler: Any) -> Any | None:
    # llama-cpp-python registers named chat formats only as completion handlers
    # wrapping a formatter; the formatter is what we need to run our own loop.
    code = getattr(handler, "__code__", None)
    if code is None or handler.__closure__ is None:
        return None
    for name, cell in zip(code.co_freevars, handler.__closure__, strict=True):
        if name == "chat_formatter":
            return cell.cell_contents
    return None


class Engine:
    """Owns one `llama_cpp.Llama`; every call holds the lock for its whole duration."""

    capacity = 1  # requests served at once

    def __init__(self, spec: ModelSpec, *, llama_n_ctx: int | None = None):
        import llama_cpp
        from llama_cpp import llama_chat_format

        self._llama_cpp = llama_cpp
        self.spec = spec
        cfg = spec.config
        self.cfg = cfg
        self.lock = threading.Lock()
        kwargs: dict[str, Any] = {
            "model_path": cfg.model_path,
            "n_ctx": llama_n_ctx or cfg.n_ctx,
            "n_gpu_layers": cfg.n_gpu_layers,
            "n_batch": min(cfg.n_batch, llama_n_ctx or cfg.n_batch),
            "use_mmap": cfg.use_mmap,
            "use_mlock": cfg.use_mlock,
            "embedding": cfg.embedding,
            "verbose": False,
        }
        if cfg.n_threads is not None:
            kwargs["n_threads"] = cfg.n_threads
            kwargs["n_threads_batch"] = cfg.n_threads
        if cfg.seed is not None:
            kwargs["seed"] = _llama_seed(cfg.seed)
        if cfg.chat_format is not None:
            try:
                llama_chat_format.get_chat_completion_handler(cfg.chat_format)
            except Exception:
                raise ValueError(f"unknown chat_format {cfg.chat_format!r}") from None
            kwargs["chat_format"] = cfg.chat_format
        if cfg.mmproj_path is not None:
            kwargs["chat_handler"] = llama_chat_format.Llava15ChatHandler(
                clip_model_path=cfg.mmproj_path, verbose=False
            )
        self.llama = llama_cpp.Llama(**kwargs)
        self._abort_flag = self._install_abort(self.llama.ctx)
        self._cancel = threading.Event()  # set when the running request is cancelled
        self._cancelled_ids: set[str] = set()
        self._running: str | None = None
        # time.monotonic() of the engine's last sign of life; the I/O thread's stall watchdog
        # reads it (a float assignment is atomic under the GIL).
        self.progress_at = time.monotonic()
        self.n_ctx = self.llama.n_ctx()
        self._vocab = self.llama._model.vocab
        self._formatter = self._make_formatter(llama_chat_format)

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _install_abort(self, ctx: Any) -> Any:
        """Make `ctx`'s decodes stop at the next graph node once the returned flag is set.

        llama.cpp polls `bool cb(void *data)` between graph nodes. libc's strlen over a
        one-byte flag string is exactly that, in C: no Python callback (and no GIL) on
        the hot path, so it can stay installed.
        """
        flag = ctypes.create_string_buffer(2)
        libc = ctypes.CDLL(None)
        self._abort_cb = ctypes.cast(libc.strlen, self._llama_cpp.ggml_abort_callback)
        self._llama_cpp.llama_set_abort_callback(
            ctx, self._abort_cb, ctypes.cast(flag, ctypes.c_void_p)
        )
        return flag

    def abort(self) -> None:
        """Stop the running decode (prompt evaluation included) at the next graph node.

        Called from the worker's I/O thread; `run` clears it when the next request starts.
        """
        self._abort_flag[0] = b"\x01"

    def _make_formatter(self, llama_chat_format: Any) -> Any | None:
        """The chat formatter for our own token loop; None → llama-cpp-python's handler."""
        if self.cfg.mmproj_path is not None:
            return None  # images are embedded by the Llava handler itself
        llama = self.llama
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        eos = llama._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llama._model.token_get_text(bos_id) if bos_id != -1 else ""
        if self.cfg.chat_format_template is not None:
            template = self.cfg.chat_format_template
            if os.path.isfile(template):
                with open(template, encoding="utf-8") as fh:
                    template = fh.read()
            return llama_chat_format.Jinja2ChatFormatter(
                template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
            )
        name = llama.chat_format
        if name in llama._chat_handlers:
            # Built by Llama.__init__ from the GGUF's embedded template.
            template = llama.metadata.get("tokenizer.chat_template")
            if name == "chat_template.default" and template:
                return llama_chat_format.Jinja2ChatFormatter(
                    template=template, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
                )
            return _formatter_from_handler(llama._chat_handlers[name])
        return _formatter_from_handler(llama_chat_format.get_chat_completion_handler(name))

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
                sink.error(rid, "cancelled", "request cancelled")
            except RequestFailed as exc:
                sink.error(rid, exc.code, exc.message, exc.param)
            except Exception as exc:
                if is_broken_pipe(exc):
                    raise
                log.exception("request %s failed", rid)
                sink.error(rid, "generation_failed", self._failure(exc))
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
            self._abort_flag[0] = b"\x00"
            if cancelled.is_set():
                self._abort_flag[0] = b"\x01"
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

    def _prompt_tokens(self, req: Request) -> tuple[list[int], list[str]]:
        llama = self.llama
        if req.kind == "completion":
            text = req.prompt or ""
            # Special tokens written in the prompt are tokens, as in llama-cpp-python's and
            # llama-server's completions: a hand-templated prompt means what it says.
            return llama.tokenize(text.encode("utf-8"), add_bos=True, special=True), []
        if self._formatter is None:
            raise RequestFailed(
                "invalid_request",
                f"model {self.spec.id!r} chats only through its multimodal handler",
            )
        try:
            result = self._formatter(messages=req.messages or [])
        except Exception as exc:  # a template's raise_exception, or a bad message shape
            raise RequestFailed(
                "invalid_request", f"chat template rejected the messages: {exc}", param="messages"
            ) from None
        stops = result.stop if isinstance(result.stop, list) else [result.stop or ""]
        tokens = llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return tokens, [s for s in stops if s]

    def prepare(self, req: Request) -> Prepared:
        """Tokenize and validate a chat or completion request; raise RequestFailed if bad."""
        cfg, p = self.cfg, req.params
        tokens, template_stops = self._prompt_tokens(req)
        n_prompt = len(tokens)
        room = self.n_ctx - n_prompt
        if n_prompt == 0:
            raise RequestFailed("invalid_request", "the prompt is empty", param="prompt")
        if room < 1:
            raise RequestFailed(
                "context_length_exceeded",
                f"the prompt is {n_prompt} tokens but model {self.spec.id!r} has a context of "
                f"{self.n_ctx} tokens; shorten the prompt by at least {n_prompt - self.n_ctx + 1}",
                param="messages" if req.kind == "chat" else "prompt",
            )
        if p.logit_bias:
            n_vocab = self.llama.n_vocab()
            for token_id in p.logit_bias:
                if not 0 <= token_id < n_vocab:
                    raise RequestFailed(
                        "invalid_request",
                        f"logit_bias names token {token_id}, outside the vocabulary "
                        f"(0..{n_vocab - 1})",
                        param="logit_bias",
                    )
        default_max = 16 if req.kind == "completion" else room
        max_tokens = min(p.max_tokens or cfg.max_tokens or default_max, room)
        stops = template_stops + [s for s in (p.stop if p.stop is not None else cfg.stop_list())]
        seed = _llama_seed(p.seed if p.seed is not None else cfg.seed)
        return Prepared(
            tokens=tokens,
            max_tokens=max_tokens,
            stops=[s for s in dict.fromkeys(stops) if s],
            seed=seed if seed is not None else random.getrandbits(31),
            top_k=_pick(p.top_k, cfg.top_k),
            top_p=_pick(p.top_p, cfg.top_p),
            min_p=_pick(p.min_p, cfg.min_p),
            temperature=_temperature(_pick(p.temperature, cfg.temperature)),
            repeat_penalty=_pick(p.repeat_penalty, cfg.repeat_penalty),
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logit_bias=p.logit_bias or {},
        )

    def _generate(self, req: Request, emit: EmitFn, cancelled: threading.Event) -> Result:
        if req.kind == "chat" and self._formatter is None:
            return self._generate_with_handler(req, emit, cancelled)
        llama = self.llama
        started = time.perf_counter()  # the prompt's clock includes templating and tokenizing
        prep = self.prepare(req)
        llama.set_seed(prep.seed)
        logits_processor = None
        if prep.logit_bias:
            logits_processor = self._logit_bias_processor(prep.logit_bias)

        cached = self._cached_prefix(prep.tokens)
        first_token_at: float | None = None
        out = TextOut(self, prep, emit)
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
        llama = self.llama
        return common_prefix(llama._input_ids[: llama.n_tokens].tolist(), tokens)

    def _logit_bias_processor(self, bias: dict[int, float]) -> Any:
        import numpy as np
        from llama_cpp import LogitsProcessorList

        ids = np.fromiter(bias.keys(), dtype=np.intc)
        values = np.fromiter(bias.values(), dtype=np.single)

        def apply(_input_ids: Any, scores: Any) -> Any:
            scores[ids] += values
            return scores

        return LogitsProcessorList([apply])

    def _generate_with_handler(
        self, req: Request, emit: EmitFn, cancelled: threading.Event
    ) -> Result:
        """Chat through llama-cpp-python's own handler (multimodal models)."""
        cfg, p = self.cfg, req.params
        produced = 0

        def stop_when_cancelled(_ids: Any, _logits: Any) -> bool:
            nonlocal produced
            produced += 1
            self.progress_at = time.monotonic()
            return cancelled.is_set()

        from llama_cpp import StoppingCriteriaList

        stream = self.llama.create_chat_completion(
            messages=req.messages or [],
            stream=True,
            max_tokens=p.max_tokens or cfg.max_tokens,
            temperature=_temperature(_pick(p.temperature, cfg.temperature)),
            top_p=_pick(p.top_p, cfg.top_p),
            top_k=_pick(p.top_k, cfg.top_k),
            min_p=_pick(p.min_p, cfg.min_p),
            repeat_penalty=_pick(p.repeat_penalty, cfg.repeat_penalty),
            stop=p.stop if p.stop is not None else cfg.stop_list(),
            seed=_llama_seed(p.seed if p.seed is not None else cfg.seed),
            stopping_criteria=StoppingCriteriaList([stop_when_cancelled]),
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
            raise RequestFailed(
                "invalid_request",
                f"model {self.spec.id!r} does not serve embeddings (set `embedding: true`)",
                param="model",
            )
        inputs = req.inputs or []
        vectors: list[list[float]] = []
        n_tokens = 0
        for i, text in enumerate(inputs):
            tokens = self.llama.tokenize(text.encode("utf-8"), add_bos=True)
            if not tokens or not text:
                raise RequestFailed(
                    "invalid_request", f"input {i} is empty: nothing to embed", param="input"
                )
            if len(tokens) > self.n_ctx:
                raise RequestFailed(
                    "context_length_exceeded",
                    f"an input is {len(tokens)} tokens; model {self.spec.id!r} has a context "
                    f"of {self.n_ctx} tokens",
                    param="input",
                )
            n_tokens += len(tokens)
            self.progress_at = time.monotonic()
            vec = self.llama.embed(text)
            if vec and isinstance(vec[0], list):
                # No pooling in the model: mean-pool the per-token vectors ourselves.
                width = len(vec[0])
                vec = [sum(row[j] for row in vec) / len(vec) for j in range(width)]
            vectors.append(_unit(vec))
        return Result(
            "stop", Usage(prompt_tokens=n_tokens, completion_tokens=0), embeddings=vectors
        )


def _unit(vector: list[float]) -> list[float]:
    """`vector` scaled to length 1, as OpenAI and llama-server return embeddings."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [float(x) / norm for x in vector] if norm > 0 else [float(x) for x in vector]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


# llama.cpp's seeds are 32-bit and 0xFFFFFFFF means "pick a random one".
_SEED_MODULUS = 0xFFFFFFFF
# A temperature this close to 0 divides the logits into overflow (garbage text).
_GREEDY_BELOW = 1e-5


def _llama_seed(seed: int | None) -> int | None:
    """A seed as llama.cpp takes it; None for a random one.

    -1 is random, as in llama-cpp-python and llama-server; any other integer is reduced to
    32 bits so that it is reproducible (never llama.cpp's "random" 0xFFFFFFFF).
    """
    return None if seed is None or seed == -1 else seed % _SEED_MODULUS


def _temperature(value: float) -> float:
    """The sampling temperature; one too small to divide by means greedy (0)."""
    return 0.0 if value < _GREEDY_BELOW else value


def _find_stop(text: str, stops: list[str]) -> int | None:
    best: int | None = None
    for stop in stops:
        i = text.find(stop)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop sequence."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep
