"""What both engines do around a request: prepare it, and turn its tokens into output.

`Preparer` formats a chat with llama-cpp-python's formatters, tokenizes, validates against
the context, and resolves sampling defaults into a `Prepared`; `TextOut` turns sampled
tokens into emitted text (EOG, stop sequences with hold-back, max_tokens, UTF-8) and the
request's `Result`. The batching engine and the one-at-a-time engine each hold a `Preparer`.
"""

from __future__ import annotations

import codecs
import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llamapool.config import LlamaSettings, ModelSpec
from llamapool.errors import ErrorCode
from llamapool.ipc.protocol import Request, Timings, TokenLogprob, Usage
from llamapool.pool import llama_adapter, tool_prompt

# (text, tokens) or (text, tokens, logprobs of the tokens whose text starts in `text`).
EmitFn = Callable[..., None]


class Sink(Protocol):
    """Where an engine reports each request's start, text, and end (the worker's socket)."""

    def start(self, request_id: str) -> None: ...

    def chunk(
        self,
        request_id: str,
        text: str,
        tokens: int,
        logprobs: list[TokenLogprob] | None = None,
    ) -> None: ...

    def flush(self) -> None:
        """Send the chunks held so far now (a first token mid-step), not at the step's end."""

    def done(self, request_id: str, result: Result) -> None: ...

    def error(
        self, request_id: str, code: ErrorCode, message: str, param: str | None = None
    ) -> None: ...


def is_broken_pipe(exc: BaseException) -> bool:
    """Whether `exc` means the data socket to the router is gone (the worker must die)."""
    return isinstance(exc, BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno == errno.EPIPE
    )


class RequestFailed(Exception):
    """A request the engine refuses or cannot finish; carries the client-facing code."""

    def __init__(self, code: ErrorCode, message: str, *, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def embeddings_refused(model_id: str) -> RequestFailed:
    """The refusal of an embedding request by a model without `embedding: true`."""
    return RequestFailed(
        ErrorCode.INVALID_REQUEST,
        f"model {model_id!r} does not serve embeddings (set `embedding: true`)",
        param="model",
    )


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
    grammar: str | None = None  # GBNF the output must match (the batching engine only)
    logprobs: int | None = None  # alternatives per token's logprob; None: no logprobs
    echo: bool = False  # the output starts with the prompt (the batching engine only)
    prompt_text: str | None = None  # a completion's prompt as the client wrote it, if text


class Detokenizer(Protocol):
    """What `TextOut` needs of a model: a token's bytes and whether it ends generation."""

    def detokenize(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...


class TextOut:
    """Turns sampled tokens into emitted text: EOG, stop sequences, max_tokens, UTF-8.

    Text that may be the start of a stop sequence is held back until it cannot be; a
    token's logprob entry travels with the chunk its text starts in, and is dropped with
    it when a stop sequence cuts that text away.
    """

    def __init__(self, vocab: Detokenizer, prep: Prepared, emit: EmitFn):
        self._detokenize = vocab.detokenize
        self._is_eog = vocab.is_eog
        self._stops = prep.stops
        self._max_tokens = prep.max_tokens
        self._emit = emit
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # decoded text held back because it may start a stop sequence
        self._unsent_tokens = 0
        # Logprob entries not sent yet, each with where its token's text starts in _pending.
        self._entries: list[tuple[int, TokenLogprob]] = []
        self.produced = 0
        self.finish = "length"

    @property
    def wants_tokens(self) -> bool:
        """False for a request that asks for no output token (`max_tokens: 0`)."""
        return self._max_tokens > 0

    def echo(self, text: str, entries: list[TokenLogprob] | None) -> None:
        """Emit the prompt (`echo`) ahead of any output, with its tokens' logprobs."""
        if text or entries:
            self._send(text, 0, entries or None)

    def push(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Take one sampled token (and its logprob entry); True when the request is finished."""
        if self._is_eog(token):
            self.finish = "stop"
            return True
        self.produced += 1
        self._unsent_tokens += 1
        if logprob is not None:
            self._entries.append((len(self._pending), logprob))
        self._pending += self._decoder.decode(self._detokenize(token))
        cut = _find_stop(self._pending, self._stops)
        if cut is not None:
            self._pending = self._pending[:cut]
            self._entries = [e for e in self._entries if e[0] < cut]
            self.finish = "stop"
            self._decoder.reset()  # bytes it holds come after the stop sequence
            return True
        safe = len(self._pending) - _held_back(self._pending, self._stops)
        if safe > 0:
            self._flush(safe)
        return self.produced >= self._max_tokens

    @property
    def remaining(self) -> int:
        """Tokens it may still take before max_tokens ends the request."""
        return self._max_tokens - self.produced

    def _flush(self, n: int, final: bool = False) -> None:
        """Emit the first `n` characters held, with the entries of tokens starting there
        (all of them when `final`)."""
        sent = [e for at, e in self._entries if final or at < n]
        self._entries = [(at - n, e) for at, e in self._entries if not (final or at < n)]
        self._send(self._pending[:n], self._unsent_tokens, sent or None)
        self._pending, self._unsent_tokens = self._pending[n:], 0

    def _send(self, text: str, tokens: int, entries: list[TokenLogprob] | None) -> None:
        if entries is None:
            self._emit(text, tokens)  # sinks that know nothing of logprobs still work
        else:
            self._emit(text, tokens, entries)

    def result(
        self, n_prompt: int, n_cached: int, started: float, first_token_at: float | None
    ) -> Result:
        """Emit what is held back (never a stop sequence found) and report the request."""
        self._pending += self._decoder.decode(b"", final=True)
        if self._pending or self._unsent_tokens or self._entries:
            self._flush(len(self._pending), final=True)
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


def chats_through_handler(cfg: LlamaSettings) -> bool:
    """Whether chat runs through a llama-cpp-python handler (no formatter we can drive)."""
    if cfg.mmproj_path is not None:
        return True
    return cfg.chat_format is not None and llama_adapter.handler_only(cfg.chat_format)


def load_llama(spec: ModelSpec, *, n_ctx: int | None = None) -> Any:
    """The model's `llama_cpp.Llama` with a context of `n_ctx` (default: the model's)."""
    return llama_adapter.open_llama(spec.config, n_ctx=n_ctx, seed=llama_seed(spec.config.seed))


class Preparer:
    """Turns a model's chat and completion requests into `Prepared`, or refuses them."""

    def __init__(self, llama: Any, spec: ModelSpec, *, n_ctx: int):
        self.llama = llama
        self.spec = spec
        self.cfg = spec.config
        self.n_ctx = n_ctx  # per request
        self.vocab = llama_adapter.Vocab(llama)
        # None: chat only through llama-cpp-python's own handler (multimodal models, whose
        # images the Llava handler embeds itself).
        self.formatter = (
            None
            if self.cfg.mmproj_path is not None
            else llama_adapter.chat_formatter(llama, self.cfg.chat_format_template)
        )
        self.native_tools = self.formatter is not None and tool_prompt.supports_tools(
            self.formatter
        )

    def _prompt_tokens(self, req: Request) -> tuple[list[int], list[str]]:
        llama = self.llama
        if req.kind == "completion":
            if isinstance(req.prompt, list):
                return self.check_tokens(req.prompt, "prompt"), []
            text = req.prompt or ""
            # Special tokens written in the prompt are tokens, as in llama-cpp-python's and
            # llama-server's completions: a hand-templated prompt means what it says.
            return llama.tokenize(text.encode("utf-8"), add_bos=True, special=True), []
        if self.formatter is None:
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"model {self.spec.id!r} chats only through its multimodal handler",
            )
        messages, extra = req.messages or [], {}
        if req.tools or tool_prompt.has_tool_turns(messages):
            if self.native_tools:
                messages = tool_prompt.native_messages(messages)
                extra = {"tools": req.tools} if req.tools else {}
            else:
                messages = tool_prompt.generic_messages(messages, req.tool_prompt)
        try:
            result = self.formatter(messages=messages, **extra)
        except Exception as exc:  # a template's raise_exception, or a bad message shape
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"chat template rejected the messages: {exc}",
                param="messages",
            ) from None
        stops = result.stop if isinstance(result.stop, list) else [result.stop or ""]
        tokens = llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return tokens, [s for s in stops if s]

    def check_tokens(self, tokens: list[int], param: str) -> list[int]:
        """`tokens` as given (no BOS added, as llama-server takes them), if every id is in
        the vocabulary; else RequestFailed naming `param`."""
        n_vocab = self.llama.n_vocab()
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"{param} names token {bad}, outside the vocabulary (0..{n_vocab - 1})",
                param=param,
            )
        return list(tokens)

    def prepare(self, req: Request) -> Prepared:
        """Tokenize and validate a chat or completion request; raise RequestFailed if bad."""
        if req.kind == "embedding":
            raise embeddings_refused(self.spec.id)
        cfg, p = self.cfg, req.params
        tokens, template_stops = self._prompt_tokens(req)
        n_prompt = len(tokens)
        room = self.n_ctx - n_prompt
        if n_prompt == 0:
            raise RequestFailed(ErrorCode.INVALID_REQUEST, "the prompt is empty", param="prompt")
        if room < 1:
            raise RequestFailed(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"the prompt is {n_prompt} tokens but model {self.spec.id!r} has a context of "
                f"{self.n_ctx} tokens; shorten the prompt by at least {n_prompt - self.n_ctx + 1}",
                param="messages" if req.kind == "chat" else "prompt",
            )
        if p.logit_bias:
            n_vocab = self.llama.n_vocab()
            for token_id in p.logit_bias:
                if not 0 <= token_id < n_vocab:
                    raise RequestFailed(
                        ErrorCode.INVALID_REQUEST,
                        f"logit_bias names token {token_id}, outside the vocabulary "
                        f"(0..{n_vocab - 1})",
                        param="logit_bias",
                    )
        default_max = 16 if req.kind == "completion" else room
        # 0 is a request's own (a completion that only scores its prompt with `echo`).
        max_tokens = min(pick(p.max_tokens, cfg.max_tokens or default_max), room)
        stops = template_stops + [s for s in (p.stop if p.stop is not None else cfg.stop_list())]
        seed = llama_seed(p.seed if p.seed is not None else cfg.seed)
        return Prepared(
            tokens=tokens,
            max_tokens=max_tokens,
            stops=[s for s in dict.fromkeys(stops) if s],
            seed=seed if seed is not None else random.getrandbits(31),
            top_k=pick(p.top_k, cfg.top_k),
            top_p=pick(p.top_p, cfg.top_p),
            min_p=pick(p.min_p, cfg.min_p),
            temperature=temperature(pick(p.temperature, cfg.temperature)),
            repeat_penalty=pick(p.repeat_penalty, cfg.repeat_penalty),
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            logit_bias=p.logit_bias or {},
            grammar=p.grammar,
            logprobs=req.logprobs,
            echo=req.echo,
            prompt_text=req.prompt if isinstance(req.prompt, str) else None,
        )


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pick(value: Any, default: Any) -> Any:
    """A request's value, or the model's default when the request sets none."""
    return default if value is None else value


# llama.cpp's seeds are 32-bit and 0xFFFFFFFF means "pick a random one".
SEED_MODULUS = 0xFFFFFFFF
# A temperature this close to 0 divides the logits into overflow (garbage text).
_GREEDY_BELOW = 1e-5


def llama_seed(seed: int | None) -> int | None:
    """A seed as llama.cpp takes it; None for a random one.

    -1 is random, as in llama-cpp-python and llama-server; any other integer is reduced to
    32 bits so that it is reproducible (never llama.cpp's "random" 0xFFFFFFFF).
    """
    return None if seed is None or seed == -1 else seed % SEED_MODULUS


def temperature(value: float) -> float:
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
