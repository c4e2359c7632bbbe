"""The wire protocol: typed round trips and loud failures on anything malformed."""

from __future__ import annotations

import msgspec
import pytest

from llamapool.ipc import protocol as P


@pytest.mark.parametrize(
    "message",
    [
        P.Ready(worker_id="m-1", pid=42, model_id="m", n_ctx=2048, capacity=1),
        P.Heartbeat(seq=3, busy_request="r-1"),
        P.Chunk(request_id="r-1", text="héllo", tokens=2),
        P.Chunk(
            request_id="r-1",
            text="hé",
            tokens=1,
            logprobs=[
                P.TokenLogprob(b"h\xc3", -0.25, [P.TopLogprob(b"h\xc3", -0.25)], 0),
                P.TokenLogprob(b"a", None, [], 1),
            ],
        ),
        P.Done(
            request_id="r-1",
            finish_reason="length",
            usage=P.Usage(prompt_tokens=3, completion_tokens=4),
            timings=P.Timings(prompt_ms=1.5, generate_ms=20.0, cached_tokens=2),
        ),
        P.Done(
            request_id="r-2", finish_reason="stop", usage=P.Usage(1, 0), embeddings=[[0.5, -1.0]]
        ),
        P.Error(
            request_id="r-1", code="context_length_exceeded", message="too long", param="prompt"
        ),
        P.Fatal(reason="boom", kind=P.FatalKind.CANNOT_BOOT),
        P.Ping(seq=3),
        P.Request(
            request_id="r-9",
            kind="chat",
            messages=[{"role": "user", "content": "hi"}],
            params=P.SamplingParams(max_tokens=5, stop=["\n"], logit_bias={2: -100.0}),
        ),
        P.Request(request_id="r-10", kind="completion", prompt=[1, 2, 3], logprobs=2, echo=True),
        P.Request(request_id="r-11", kind="embedding", inputs=["a", [1, 2]]),
        P.Cancel(request_id="r-9"),
        P.RouterHeartbeat(seq=1),
        P.Shutdown(drain=False),
        P.Pong(seq=3),
        P.Resize(seq=2, cores=[0, 1], n_threads=2),
        P.Resized(seq=2, cores=[0, 1], n_threads=2),
    ],
)
def test_round_trip(message):
    frames = P.encode(message)
    assert frames[0] == P.VERSION and len(frames[1]) == 1
    assert P.decode(frames) == message


def test_usage_total():
    assert P.Usage(prompt_tokens=3, completion_tokens=4).total_tokens == 7


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        ([b"LP0", b"\x01", b"\x80"], "version"),
        ([b"LP1", b"\x7f", b"\x80"], "type"),
        ([b"LP1", b"\x01\x02", b"\x80"], "type"),
        ([b"LP1", b"\x01"], "3 frames"),
        ([b"LP1", b"\x01", b"\xc1garbage"], "Ready"),
        # A well-formed body of the wrong shape is rejected by the typed decoder.
        ([b"LP1", b"\x03", msgspec.msgpack.encode({"request_id": 1})], "Chunk"),
    ],
)
def test_malformed_frames_raise(frames, needle):
    with pytest.raises(P.ProtocolError, match=needle):
        P.decode(frames)


# -- the data channel's framing -------------------------------------------------------

_STREAM = [
    P.Request(request_id="r-1", kind="completion", prompt="hé"),
    P.Chunk(request_id="r-1", text="ü", tokens=1),
    P.Done(request_id="r-1", finish_reason="stop", usage=P.Usage(2, 1)),
    P.Pong(seq=4),
    P.Resize(seq=1, cores=[3], n_threads=1),
]


def test_frames_survive_any_split_of_the_stream():
    data = b"".join(P.pack(m) for m in _STREAM)
    for step in (1, 2, 3, 7, len(data)):
        reader = P.FrameReader()
        got = []
        for i in range(0, len(data), step):
            got += reader.feed(data[i : i + step])
        assert got == _STREAM


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x00\x00\x00\x00", "bad frame length 0"),
        ((P.MAX_FRAME + 1).to_bytes(4, "big"), "bad frame length"),
        (b"\x00\x00\x00\x01\x7f", "unknown message type"),
        (b"\x00\x00\x00\x02\x03\xc0", "bad Chunk body"),
    ],
)
def test_a_malformed_frame_ends_the_stream_after_what_came_before(data, needle):
    reader = P.FrameReader()
    good = P.pack(_STREAM[1])
    assert reader.feed(good + data + good) == [_STREAM[1]]
    assert reader.error is not None and needle in str(reader.error)
    assert reader.feed(good) == []  # nothing after a broken frame is trusted


def test_a_frame_over_the_limit_is_refused_when_packed(monkeypatch):
    monkeypatch.setattr(P, "MAX_FRAME", 1000)
    assert P.FrameReader().feed(P.pack(P.Chunk(request_id="r", text="x" * 900, tokens=1)))
    with pytest.raises(ValueError, match="Chunk of 10.. bytes is over the 1000-byte frame limit"):
        P.pack(P.Chunk(request_id="r", text="x" * 1000, tokens=1))


def test_a_request_carries_no_deadline():
    # The queue's deadline is the router's timer; nothing on the wire pretends to limit how
    # long a worker runs a request.
    assert "deadline" not in P.Request.__struct_fields__
