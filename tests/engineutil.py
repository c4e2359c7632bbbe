"""Driving a BatchEngine in the test process: a sink that keeps texts, and feeding it."""

from __future__ import annotations

import queue
from collections.abc import Callable

import pytest

from llamapool.ipc.protocol import Request, SamplingParams, TokenLogprob
from llamapool.pool.batch import BatchEngine


class Texts:
    """A sink that keeps each request's text and end, and runs actions at its events."""

    def __init__(self) -> None:
        self.text: dict[str, str] = {}
        self.results: dict[str, object] = {}
        self.chunks: dict[str, int] = {}
        self.logprobs: dict[str, list[TokenLogprob]] = {}
        self.at: dict[tuple[str, int | str], Callable[[], None]] = {}

    def start(self, rid: str) -> None:
        self.text[rid] = ""
        self.logprobs[rid] = []

    def flush(self) -> None:
        pass

    def chunk(
        self, rid: str, text: str, tokens: int, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        self.text[rid] += text
        self.logprobs[rid] += logprobs or []
        n = self.chunks[rid] = self.chunks.get(rid, 0) + 1
        self._fire(rid, n)

    def done(self, rid: str, result: object) -> None:
        self.results[rid] = result
        self._fire(rid, "done")

    def error(self, rid: str, code: str, message: str, param: str | None = None) -> None:
        pytest.fail(f"request {rid} failed: {code}: {message}")

    def _fire(self, rid: str, when: int | str) -> None:
        action = self.at.pop((rid, when), None)
        if action is not None:
            action()


def alone(engine: BatchEngine, requests: list[Request], sink: Texts | None = None) -> Texts:
    """Serve `requests` one after another, each alone in the engine."""
    sink = sink or Texts()
    for req in requests:
        jobs: queue.Queue = queue.Queue()
        jobs.put(req)
        jobs.put(None)
        engine.serve(jobs, sink)
    return sink


def together(
    engine: BatchEngine,
    first: list[Request],
    joins: dict[tuple[str, int | str], list[Request]],
) -> Texts:
    """Serve `first` at once; at each (request, n-th chunk or "done") the listed ones join.

    The stop comes once every request queued so far has ended, so none is cut short.
    """
    sink = Texts()
    jobs: queue.Queue = queue.Queue()
    queued = [0]

    def put(reqs: list[Request]) -> None:
        for req in reqs:
            queued[0] += 1
            jobs.put(req)

    for when, reqs in joins.items():
        sink.at[when] = lambda reqs=reqs: put(reqs)
    put(first)
    record_done = sink.done

    def done(rid: str, result: object) -> None:
        record_done(rid, result)  # may queue joiners
        if len(sink.results) == queued[0]:
            jobs.put(None)

    sink.done = done  # type: ignore[method-assign]
    engine.serve(jobs, sink)
    assert not sink.at, f"joins that never happened: {list(sink.at)}"
    return sink


# A passage SmolLM2 copies well (rewrites, repeats, drafts).
PASSAGE = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He lit the "
    "great lamp, polished the brass rails, and wrote the weather in a leather book. Ships "
    "passed far out on the grey water, and none of them knew his name."
)


def ask(rid: str, content: str, **params) -> Request:
    """A chat request of one user message."""
    messages = [{"role": "user", "content": content}]
    return Request(request_id=rid, kind="chat", messages=messages, params=SamplingParams(**params))


def copy_requests() -> list[Request]:
    """Four requests SmolLM2 answers by copying PASSAGE: greedy, a greedy rewrite, seeded
    at temperature 0.8, and greedy with a stop sequence that cuts the copy short."""
    repeat = f"Repeat this text exactly:\n\n{PASSAGE}"
    return [
        ask("g0", repeat, temperature=0, max_tokens=80),
        ask("g1", f"Rewrite this in the first person:\n\n{PASSAGE}", temperature=0, max_tokens=80),
        ask("s0", repeat, temperature=0.8, seed=11, max_tokens=80),
        ask("c0", repeat, temperature=0, max_tokens=80, stop=["brass"]),
    ]
