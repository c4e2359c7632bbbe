"""The batching engine on real llama.cpp (tiny random model): slots, joins, cancels, reuse."""

from __future__ import annotations

import logging
import queue
import threading

import pytest
from engineutil import together
from tinymodel import IM_END_ID

from llamapool.config import parse_config
from llamapool.errors import ErrorCode
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.batch import BatchEngine, SlotState, SlotStateError


def _spec(path, **config):
    cfg = {"model_path": str(path), "n_ctx": 512, "n_threads": 1, "n_parallel": 4, **config}
    return parse_config({"models": [{"id": "t", "config": cfg}]}).models["t"]


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    eng = BatchEngine(_spec(tiny_gguf))
    yield eng
    eng.close()


class Recorder:
    """A sink that keeps every event in order, and can act on a request's n-th chunk."""

    def __init__(self):
        self.events: list[tuple[str, str, object]] = []
        self.on_chunk: dict[tuple[str, int], object] = {}
        self._chunks: dict[str, int] = {}

    def start(self, rid):
        self.events.append(("start", rid, None))

    def flush(self) -> None:
        self.events.append(("flush", "", None))

    def chunk(self, rid, text, tokens):
        self.events.append(("chunk", rid, (text, tokens)))
        n = self._chunks[rid] = self._chunks.get(rid, 0) + 1
        action = self.on_chunk.pop((rid, n), None)
        if action is not None:
            action()

    def done(self, rid, result):
        self.events.append(("done", rid, result))

    def error(self, rid, code, message, param=None):
        self.events.append(("error", rid, (code, message, param)))

    def end(self, rid):
        return next(e for e in self.events if e[1] == rid and e[0] in ("done", "error"))

    def tokens(self, rid):
        return sum(e[2][1] for e in self.events if e[0] == "chunk" and e[1] == rid)

    def index(self, kind, rid):
        return next(i for i, e in enumerate(self.events) if e[0] == kind and e[1] == rid)


def _chat(rid, content="hello", **params):
    return Request(
        request_id=rid,
        kind="chat",
        messages=[{"role": "user", "content": content}],
        params=SamplingParams(**params),
    )


def _serve(engine, *requests, sink=None):
    """Queue `requests` then a stop, and serve them all on this thread."""
    sink = sink or Recorder()
    jobs: queue.Queue = queue.Queue()
    for req in requests:
        jobs.put(req)
    jobs.put(None)
    engine.serve(jobs, sink)
    return sink


def test_requests_decode_together_with_exact_counts(engine):
    sink = _serve(engine, *(_chat(f"r{i}", f"question {i}", max_tokens=20 + i) for i in range(4)))
    for i in range(4):
        kind, _, result = sink.end(f"r{i}")
        assert kind == "done"
        assert result.usage.completion_tokens == 20 + i == sink.tokens(f"r{i}")
        assert result.finish_reason == "length"
    # Interleaved, not one after another: every request produced before any finished.
    first_done = min(sink.index("done", f"r{i}") for i in range(4))
    assert all(sink.index("chunk", f"r{i}") < first_done for i in range(4))


def test_a_request_joins_while_another_generates(engine):
    jobs: queue.Queue = queue.Queue()
    sink = Recorder()
    # When the long request has produced, the short one arrives and finishes first.
    sink.on_chunk[("long", 5)] = lambda: (jobs.put(_chat("short", max_tokens=3)), jobs.put(None))
    jobs.put(_chat("long", max_tokens=200))
    engine.serve(jobs, sink)
    assert sink.end("long")[2].usage.completion_tokens == 200
    assert sink.end("short")[2].usage.completion_tokens == 3
    assert sink.index("done", "short") < sink.index("done", "long")


def test_a_joining_prompt_is_decoded_first_in_its_step_and_its_token_sent_at_once(engine):
    """A new request's first token does not wait for the generating slots' decode (one
    row per slot: ~0.1 s at 8 slots on one core of the 2-core box), nor for the step's
    end: its prompt goes first and its chunk is flushed as soon as it is sampled."""
    jobs: queue.Queue = queue.Queue()
    sink = Recorder()
    joiner = _chat("short", "another question", max_tokens=3, temperature=0)
    sink.on_chunk[("long", 5)] = lambda: (jobs.put(joiner), jobs.put(None))
    jobs.put(_chat("long", max_tokens=40, temperature=0))
    engine.serve(jobs, sink)
    admitted, first = sink.index("start", "short"), sink.index("chunk", "short")
    assert [e for e in sink.events[admitted:first] if e[0] == "chunk"] == []
    assert sink.events[first + 1][0] == "flush"
    assert sink.end("long")[2].usage.completion_tokens == 40


def test_cancel_ends_one_request_and_spares_the_others(engine):
    jobs: queue.Queue = queue.Queue()
    sink = Recorder()
    sink.on_chunk[("victim", 3)] = lambda: engine.cancel("victim")
    for req in (_chat("victim", max_tokens=300), _chat("other", "other", max_tokens=40)):
        jobs.put(req)
    jobs.put(None)
    engine.serve(jobs, sink)
    assert sink.end("victim")[0:2] == ("error", "victim")
    assert sink.end("victim")[2][0] == "cancelled"
    assert sink.tokens("victim") < 300
    assert sink.end("other")[2].usage.completion_tokens == 40
    # The slot is usable again and its cache consistent: the same prompt reuses it.
    again = _serve(engine, _chat("again", max_tokens=5)).end("again")[2]
    assert again.usage.completion_tokens == 5


def test_cancel_before_admission_never_starts(engine):
    engine.cancel("early")
    sink = _serve(engine, _chat("early", max_tokens=5), _chat("next", max_tokens=5))
    assert sink.end("early")[2][0] == "cancelled"
    assert sink.tokens("early") == 0
    assert sink.end("next")[2].usage.completion_tokens == 5


def test_cancel_from_another_thread_during_a_long_prompt(engine):
    jobs: queue.Queue = queue.Queue()
    sink = Recorder()
    started = threading.Event()
    sink.start = lambda rid: started.set()
    long_prompt = "words " * 60  # ~360 tokens of a 512 context
    jobs.put(_chat("long", long_prompt, max_tokens=100))
    jobs.put(None)
    cancel_sent = threading.Event()
    # On a slow box the canceller may wake only after the prompt: the first chunk waits for
    # it then, so the request can never run to its end before the cancel.
    sink.on_chunk[("long", 1)] = lambda: cancel_sent.wait(5)

    def cancel() -> None:
        started.wait(5)
        engine.cancel("long")
        cancel_sent.set()

    canceller = threading.Thread(target=cancel)
    canceller.start()
    engine.serve(jobs, sink)
    canceller.join()
    kind, _, detail = sink.end("long")
    # Either the decode was aborted or the cancel landed between steps; never a full run.
    assert kind == "error" and detail[0] == "cancelled"
    follow = _serve(engine, _chat("follow", long_prompt, max_tokens=3)).end("follow")[2]
    assert follow.usage.completion_tokens == 3


def test_each_slot_keeps_its_prefix_for_the_next_turn(engine):
    a = "a long conversation about the sea and its many waves " * 3
    b = "another long conversation about mountains and rivers " * 3
    _serve(engine, _chat("a1", a, max_tokens=2), _chat("b1", b, max_tokens=2))
    sink = _serve(engine, _chat("b2", b, max_tokens=2), _chat("a2", a, max_tokens=2))
    for rid in ("a2", "b2"):
        usage = sink.end(rid)[2].usage
        assert usage.cached_tokens == usage.prompt_tokens - 1


def test_reset_each_request_reuses_nothing(tiny_gguf):
    eng = BatchEngine(_spec(tiny_gguf, reset_each_request=True, n_parallel=2))
    try:
        sink = _serve(eng, _chat("x", "same words", max_tokens=2))
        sink = _serve(eng, _chat("y", "same words", max_tokens=2))
        assert sink.end("y")[2].usage.cached_tokens == 0
    finally:
        eng.close()


def test_bad_requests_fail_alone(engine):
    sink = _serve(
        engine,
        _chat("ok", max_tokens=10),
        _chat("huge", "word " * 600),
        _chat("bias", logit_bias={10**6: 1.0}),
        Request(request_id="emb", kind="embedding", inputs=["x"]),
    )
    assert sink.end("ok")[2].usage.completion_tokens == 10
    # Typed codes: what the wire carries is the ErrorCode's string.
    assert sink.end("huge")[2][0] is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert sink.end("bias")[2][0] is ErrorCode.INVALID_REQUEST
    assert sink.end("emb")[2][0] is ErrorCode.INVALID_REQUEST


def test_same_seed_same_text_when_alone(engine):
    def text(rid):
        sink = _serve(engine, _chat(rid, "seeded", max_tokens=12, seed=7, temperature=1.0))
        return "".join(e[2][0] for e in sink.events if e[0] == "chunk")

    assert text("s1") == text("s2")


class _BrokenSampler:
    def sample(self, ctx, idx):
        raise RuntimeError("sampler exploded")


def test_an_unexpected_failure_ends_only_its_own_request(engine):
    jobs: queue.Queue = queue.Queue()
    sink = Recorder()

    def break_victim():
        (slot,) = [s for s in engine.slots if s.rid == "victim"]
        slot.sampler = _BrokenSampler()

    sink.on_chunk[("victim", 2)] = break_victim
    jobs.put(_chat("victim", max_tokens=50))
    jobs.put(_chat("other", "other", max_tokens=30))
    jobs.put(None)
    engine.serve(jobs, sink)
    code, message, _ = sink.end("victim")[2]
    assert code == "generation_failed" and "sampler exploded" in message
    assert sink.end("other")[2].usage.completion_tokens == 30
    # The engine goes on serving.
    assert _serve(engine, _chat("after", max_tokens=4)).end("after")[2].usage.completion_tokens == 4


def _walks(caplog, rid):
    """The slot transitions the engine logged for request `rid`, in order."""
    return [
        (r.args[1], r.args[2])
        for r in caplog.records
        if r.name == "llamapool.pool.batch" and r.msg.startswith("slot ") and r.args[4] == rid
    ]


def test_a_request_walks_idle_prompt_generating_idle(engine, caplog):
    caplog.set_level(logging.DEBUG, logger="llamapool.pool.batch")
    _serve(
        engine,
        _chat("walk", max_tokens=3),
        _chat("eos", max_tokens=3, logit_bias={IM_END_ID: 100.0}),
    )
    assert _walks(caplog, "walk") == [
        ("IDLE", "PROMPT"),
        ("PROMPT", "GENERATING"),
        ("GENERATING", "IDLE"),
    ]
    # Ended by its first sampled token: never generating.
    assert _walks(caplog, "eos") == [("IDLE", "PROMPT"), ("PROMPT", "IDLE")]
    assert all(slot.state is SlotState.IDLE for slot in engine.slots)


def test_an_illegal_slot_transition_raises(engine):
    slot = engine.slots[0]
    assert slot.state is SlotState.IDLE
    with pytest.raises(SlotStateError, match="from IDLE to GENERATING"):
        engine._set_state(slot, SlotState.GENERATING, "a test")
    assert slot.state is SlotState.IDLE


def test_a_request_waiting_for_a_shared_prefix_can_be_cancelled(engine):
    system = "a system prompt that only this test sends, long enough to share " * 3
    sink = Recorder()
    record_start = sink.start

    def start(rid):
        record_start(rid)
        if rid == "third":  # admitted after "waiting", which waits for "first"'s prompt
            engine.cancel("waiting")

    sink.start = start
    _serve(
        engine,
        _chat("first", system + "one", max_tokens=3),
        _chat("waiting", system + "two", max_tokens=3),
        _chat("third", "unrelated", max_tokens=3),
        sink=sink,
    )
    assert sink.end("waiting")[2][0] == "cancelled"
    assert sink.tokens("waiting") == 0
    assert sink.end("first")[2].usage.completion_tokens == 3
    assert sink.end("third")[2].usage.completion_tokens == 3


def test_a_token_prompt_gives_the_text_of_its_string(engine):
    prompt = "once upon a time"
    tokens = engine.llama.tokenize(prompt.encode(), add_bos=True, special=True)
    greedy = {"max_tokens": 8, "temperature": 0.0}
    text = Request(
        request_id="s", kind="completion", prompt=prompt, params=SamplingParams(**greedy)
    )
    ids = Request(request_id="t", kind="completion", prompt=tokens, params=SamplingParams(**greedy))
    sink = _serve(engine, text, ids)
    chunks = {
        rid: "".join(e[2][0] for e in sink.events if e[0] == "chunk" and e[1] == rid)
        for rid in "st"
    }
    assert chunks["t"] == chunks["s"] and chunks["t"]
    assert sink.end("t")[2].usage.prompt_tokens == len(tokens)


def test_a_token_prompt_outside_the_vocabulary_is_refused_naming_prompt(engine):
    outside = [1, 2, engine.n_vocab]
    sink = _serve(
        engine,
        Request(request_id="big", kind="completion", prompt=outside),
        Request(request_id="empty", kind="completion", prompt=[]),
    )
    for rid in ("big", "empty"):
        kind, _, (code, _, param) = sink.end(rid)
        assert (kind, code, param) == ("error", "invalid_request", "prompt")


def test_samples_of_one_prompt_share_its_evaluation(tiny_gguf):
    # What `n` sends: the same prompt with seeds seed + j, arriving together.
    engine = BatchEngine(_spec(tiny_gguf))
    try:
        prompt = "abc def ghi " * 30
        samples = [
            Request(
                request_id=f"s{j}",
                kind="completion",
                prompt=prompt,
                params=SamplingParams(max_tokens=4, seed=7 + j),
            )
            for j in range(4)
        ]
        sink = together(engine, samples, {})
    finally:
        engine.close()
    shared = sorted(r.timings.cache_shared_n for r in sink.results.values())
    n_prompt = sink.results["s0"].usage.prompt_tokens
    assert shared == [0, n_prompt - 1, n_prompt - 1, n_prompt - 1]  # evaluated once
    assert len(set(sink.text.values())) > 1  # distinct seeds, distinct samples


def test_threads_change_between_steps_and_greedy_text_does_not(engine):
    alone = _serve(engine, _chat("a", "count", max_tokens=12, temperature=0.0))
    assert engine.n_threads == 1
    engine.set_threads(2)
    assert engine.n_threads == 2
    wide = _serve(engine, _chat("b", "count", max_tokens=12, temperature=0.0))
    engine.set_threads(1)
    assert engine.n_threads == 1

    def text(sink, rid):
        return "".join(e[2][0] for e in sink.events if e[0] == "chunk" and e[1] == rid)

    assert text(alone, "a") == text(wide, "b") != ""
