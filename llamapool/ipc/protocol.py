"""Wire protocol between the router and its workers.

Control channel, ZeroMQ (after the identity frame on the router side):
`[b"LP1"][type: 1 byte][msgpack body]`. Data channel, a stream socket pair per worker:
`[length: 4 bytes big-endian][type: 1 byte][msgpack body]`, length counting type and
body. Bodies are msgspec Structs decoded with a typed decoder per message type; nothing
is ever pickled across the boundary.
"""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec

VERSION = b"LP1"
# The largest data-channel frame either side accepts (a DONE carries embedding vectors).
MAX_FRAME = 256 << 20


class ProtocolError(Exception):
    """A frame that is malformed, of an unknown version or type, or out of order."""


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    # Speculative decoding: tokens drafted, and how many of them the model's own sampling
    # produced (each accepted one is also a completion token).
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(msgspec.Struct):
    prompt_ms: float
    generate_ms: float
    cached_tokens: int = 0
    # Where the cached tokens came from (they add up to cached_tokens): the slot's own
    # sequence, the RAM prompt cache, another slot of the same instance.
    cache_slot_n: int = 0
    cache_ram_n: int = 0
    cache_shared_n: int = 0


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Sampling for one request; None means the model's configured default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] | None = None
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    # GBNF the output must match (rule `root`): JSON mode, a JSON Schema, a forced tool
    # call. The router converts; the worker parses each distinct text once.
    grammar: str | None = None


# worker → router


class Ready(msgspec.Struct):
    worker_id: str
    pid: int
    model_id: str
    n_ctx: int
    capacity: int
    # Its engine takes RESIZE between decode steps (the batching engine), so the
    # supervisor may lend it idle cores (elastic threads).
    resizable: bool = False


class Heartbeat(msgspec.Struct):
    seq: int
    busy_request: str | None = None
    # The RAM prompt cache: bytes held and saved states (the scheduler's affinity reads it).
    cache_bytes: int = 0
    cache_entries: int = 0
    # Elastic threads: the threads its decodes run now (0: not a resizable engine). Fewer
    # than granted when widened decodes were slower than at home (pool/widening.py).
    decode_threads: int = 0


class TopLogprob(msgspec.Struct, array_like=True):
    """One of the most likely tokens at a position: its bytes and log-probability."""

    token: bytes
    logprob: float


class TokenLogprob(msgspec.Struct, array_like=True):
    """A token of the output (or of an echoed prompt) with its log-probability under the
    model, the `top` most likely tokens there, and where its text starts in the choice's
    text (`text_offset`, the prompt included). `logprob` is None for a prompt's first
    token, which nothing predicts."""

    token: bytes
    logprob: float | None
    top: list[TopLogprob]
    offset: int


class Chunk(msgspec.Struct):
    request_id: str
    text: str
    tokens: int
    # With a request's `logprobs`: one entry per token whose text starts in `text`.
    logprobs: list[TokenLogprob] | None = None


class Done(msgspec.Struct):
    request_id: str
    finish_reason: str
    usage: Usage
    timings: Timings | None = None
    # Embedding results travel in DONE: one vector per input.
    embeddings: list[list[float]] | None = None


class Error(msgspec.Struct):
    request_id: str
    code: str
    message: str
    retryable: bool = False
    param: str | None = None


class FatalKind(str, enum.Enum):
    """What a worker's FATAL reports; the supervisor's exit cause is read from it."""

    CANNOT_BOOT = "cannot_boot"  # the model does not load
    ENGINE_DIED = "engine_died"  # the engine thread raised (a failed decode, a broken pipe)
    STALLED = "stalled"  # the stall watchdog: no decode progress with requests in flight


class Fatal(msgspec.Struct):
    reason: str
    kind: FatalKind


class Resized(msgspec.Struct):
    """A RESIZE applied at a step boundary: the engine thread's CPU affinity as the kernel
    reports it, and its thread count. Data socket, after everything decoded before it."""

    seq: int
    cores: list[int]
    n_threads: int


class Ping(msgspec.Struct):
    """Asks for a PONG on the same socket: proof that everything sent before it arrived."""

    seq: int


# router → worker


class Request(msgspec.Struct, kw_only=True):
    request_id: str
    kind: Literal["chat", "completion", "embedding"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None  # text, or token ids taken as they are
    inputs: list[str | list[int]] | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    # Log-probabilities of each output token with this many alternatives (0: the token's
    # own only); None: none. `echo`: a completion's output starts with its prompt (and,
    # with `logprobs`, the prompt tokens' log-probabilities).
    logprobs: int | None = None
    echo: bool = False
    # Tools a chat may call (OpenAI tool dicts), for a chat template that renders them; a
    # template that does not gets `tool_prompt` as a system message instead.
    tools: list[dict[str, Any]] | None = None
    tool_prompt: str | None = None


class Resize(msgspec.Struct):
    """Run the engine on `cores` with `n_threads` threads from the next decode step.

    Data socket, in order with the requests: a widening sent before a request applies
    before its first decode; the worker answers RESIZED."""

    seq: int
    cores: list[int]
    n_threads: int


class Cancel(msgspec.Struct):
    request_id: str


class RouterHeartbeat(msgspec.Struct):
    seq: int


class Shutdown(msgspec.Struct):
    drain: bool = True


class Pong(msgspec.Struct):
    seq: int


Message = (
    Ready
    | Heartbeat
    | Chunk
    | Done
    | Error
    | Fatal
    | Ping
    | Resized
    | Request
    | Cancel
    | RouterHeartbeat
    | Shutdown
    | Pong
    | Resize
)

_TYPES: dict[int, type] = {
    0x01: Ready,
    0x02: Heartbeat,
    0x03: Chunk,
    0x04: Done,
    0x05: Error,
    0x06: Fatal,
    0x07: Ping,
    0x08: Resized,
    0x10: Request,
    0x11: Cancel,
    0x12: RouterHeartbeat,
    0x13: Shutdown,
    0x14: Pong,
    0x15: Resize,
}
_CODES: dict[type, bytes] = {cls: bytes([code]) for code, cls in _TYPES.items()}
_DECODERS = {code: msgspec.msgpack.Decoder(cls) for code, cls in _TYPES.items()}
_encoder = msgspec.msgpack.Encoder()


def encode(message: Any) -> list[bytes]:
    """Frames for one message: version tag, type byte, msgpack body."""
    return [VERSION, _CODES[type(message)], _encoder.encode(message)]


def decode(frames: list[bytes]) -> Any:
    """Decode `[version, type, body]`; raise ProtocolError on anything malformed."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    version, kind, body = frames
    if version != VERSION:
        raise ProtocolError(f"unknown protocol version {bytes(version)[:8]!r}")
    if len(kind) != 1 or kind[0] not in _DECODERS:
        raise ProtocolError(f"unknown message type {bytes(kind)[:4]!r}")
    try:
        return _DECODERS[kind[0]].decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad {_TYPES[kind[0]].__name__} body: {exc}") from None


# -- the data channel: length-prefixed frames on a stream socket ------------------------


def pack(message: Any) -> bytes:
    """One data-channel frame; ValueError if it would be over MAX_FRAME."""
    body = _encoder.encode(message)
    if len(body) >= MAX_FRAME:
        name = type(message).__name__
        raise ValueError(f"{name} of {len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return (len(body) + 1).to_bytes(4, "big") + _CODES[type(message)] + body


class FrameReader:
    """Reassembles data-channel frames from the bytes of a stream, in any split.

    A malformed frame ends the stream: `feed` still returns the messages before it and
    sets `error`; nothing after it is read.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Any]:
        """The messages completed by `data` (none once `error` is set)."""
        if self.error is not None:
            return []
        buf = self._buf
        buf += data
        out = []
        start = 0
        while len(buf) - start >= 4:
            size = int.from_bytes(buf[start : start + 4], "big")
            if not 1 <= size <= MAX_FRAME:
                self.error = ProtocolError(f"bad frame length {size}")
                break
            end = start + 4 + size
            if len(buf) < end:
                break
            code = buf[start + 4]
            if code not in _DECODERS:
                self.error = ProtocolError(f"unknown message type {bytes([code])!r}")
                break
            try:
                out.append(_DECODERS[code].decode(memoryview(buf)[start + 5 : end]))
            except msgspec.DecodeError as exc:
                self.error = ProtocolError(f"bad {_TYPES[code].__name__} body: {exc}")
                break
            start = end
        if self.error is not None:
            buf.clear()
        elif start:
            del buf[:start]
        return out
