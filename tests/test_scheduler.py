"""Dispatch: least loaded first, then prompt-cache affinity (pool/affinity.py), then least
recently used; a long cached prefix is worth one request more in flight."""

from __future__ import annotations

import asyncio

import pytest
from fakepool import fake_pool

from llamapool.ipc.protocol import Request
from llamapool.pool.affinity import (
    AFFINITY_MIN_GAIN,
    AFFINITY_SLACK,
    cached_prefix,
    common_prefix_len,
    prefix_key,
    remember_prefix,
)
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.job import Job, JobState
from llamapool.pool.lifecycle import WorkerState
from llamapool.pool.memory import Sample
from llamapool.pool.scheduler import Scheduler


class _Supervisor:
    def __init__(self, workers: list[WorkerHandle]):
        self.workers = workers

    def workers_of(self, model_id: str) -> list[WorkerHandle]:
        return self.workers


def _worker(name: str, served: list[str], *, cache_entries: int, last_used: float) -> WorkerHandle:
    w = WorkerHandle(id=name, model_id="m", process=None, cores=[], n_threads=1, started_at=0.0)
    w.state, w.capacity, w.cache_entries = WorkerState.IDLE, 2, cache_entries
    for key in served:
        remember_prefix(w, key)
    w.last_used = last_used
    return w


def test_pick_worker_prefers_the_instance_that_cached_the_longest_prefix():
    system = "system\x1fYou are the support assistant of Harbour Lights.\x1e"
    chat = f"{system}user\x1fHow much is a kayak?\x1e"
    # a served the chat's first turn, then three others: its slots have moved on, but its
    # RAM prompt cache (3 states) still holds the chat. b served the system prompt alone.
    a = _worker("a", [chat, "x", "y", "z"], cache_entries=3, last_used=2.0)
    b = _worker("b", [system + "user\x1fhi\x1e"], cache_entries=0, last_used=1.0)
    c = _worker("c", [], cache_entries=0, last_used=0.0)
    scheduler = Scheduler(_Supervisor([c, b, a]), lambda w, m: True)  # type: ignore[arg-type]
    next_turn = f"{chat}assistant\x1fTen euros.\x1euser\x1fAnd for a day?\x1e"
    assert scheduler._pick_worker("m", next_turn) is a
    # Without the RAM cache, a would hold only its last two prompts: b shares more.
    a.cache_entries = 0
    remember_prefix(a, "w")
    assert scheduler._pick_worker("m", next_turn) is b
    # An instance with fewer requests in flight wins over a few shared characters...
    b.in_flight["r-1"] = object()
    assert cached_prefix(b, next_turn) < AFFINITY_MIN_GAIN
    assert scheduler._pick_worker("m", next_turn) is c
    # ... but not over a prefix worth evaluating, up to AFFINITY_SLACK requests more.
    remember_prefix(a, chat)  # a serves the chat's first turn again
    a.in_flight["r-2"] = object()
    assert scheduler._pick_worker("m", next_turn) is a
    a.in_flight["r-3"] = object()
    assert len(a.in_flight) > AFFINITY_SLACK
    assert scheduler._pick_worker("m", next_turn) is c
    # Nothing shared: the least recently used.
    assert scheduler._pick_worker("m", "user\x1fnew\x1e") is c


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ("", "", 0),
        ("abc", "", 0),
        ("abc", "abd", 2),
        ("abc", "abc", 3),
        ("abc", "abcdef", 3),
        ("x" * 10_000 + "a", "x" * 10_000 + "b", 10_000),
    ],
)
def test_common_prefix_len(a, b, n):
    assert common_prefix_len(a, b) == n == common_prefix_len(b, a)


def test_prefix_key_grows_with_the_conversation():
    turn1 = [{"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    k1 = prefix_key(Request(request_id="", kind="chat", messages=turn1))
    k2 = prefix_key(Request(request_id="", kind="chat", messages=turn2))
    assert k2.startswith(k1)
    assert prefix_key(Request(request_id="", kind="completion", prompt="abc")) == "abc"
    tokens = [
        prefix_key(Request(request_id="", kind="completion", prompt=p)) for p in ([5, 6], [5, 7])
    ]
    assert tokens[0][:2] == tokens[1][:2] and tokens[0] != tokens[1]


def _handle(capacity: int, cache_entries: int = 0) -> WorkerHandle:
    w = WorkerHandle(id="w", model_id="m", process=None, cores=[], n_threads=1, started_at=0.0)
    w.capacity, w.cache_entries = capacity, cache_entries
    return w


def test_an_instance_remembers_as_many_prefixes_as_its_slots_and_saved_states():
    w = _handle(capacity=2, cache_entries=1)
    for key in ("a1", "b1", "c1", "d1"):
        remember_prefix(w, key)
    assert list(w.recent_prefixes) == ["d1", "c1", "b1"]  # a1's state is the oldest: evicted
    assert cached_prefix(w, "b1 and more") == 2
    assert cached_prefix(w, "a1") == 0


def test_a_conversations_next_turn_replaces_its_earlier_turns():
    w = _handle(capacity=1, cache_entries=5)
    remember_prefix(w, "sys|q1")
    remember_prefix(w, "other")
    remember_prefix(w, "sys|q1|a1|q2")  # the state that holds it holds its first turn too
    assert list(w.recent_prefixes) == ["sys|q1|a1|q2", "other"]


def test_a_requeue_waits_for_the_replacement_whatever_memory_said(tiny_gguf):
    # Room for one instance of two wanted: the model's memory verdict says "blocked". When
    # the one worker dies, its request must wait for the replacement, not fail with
    # insufficient_memory (the dead worker is out of the table by then).
    probe = fake_pool(tiny_gguf)
    fp = probe.sup.models["m"].footprint
    pool = fake_pool(
        tiny_gguf,
        models=[{"id": "m", "min_instances": 2, "max_instances": 2}],
        memory_budget=fp.cost(0) + fp.per_instance // 2,
    )
    sup = pool.sup

    async def scenario() -> Job:
        scheduler = Scheduler(sup, lambda w, m: True, max_requeues=2)
        scheduler.add_model(sup.models["m"].spec)
        sup.on_worker_lost = scheduler.on_worker_lost
        pool.tick()
        (w,) = pool.workers()
        pool.proc(w).sample = Sample(rss=fp.cost(0), pss=fp.cost(0))
        pool.ready(w)
        pool.tick(1)
        assert sup.models["m"].memory_blocked
        job = scheduler.submit("m", Request(request_id="", kind="completion", prompt="x"))
        assert job.state is JobState.RUNNING
        pool.proc(w).exit(-9)
        pool.tick()
        return job

    job = asyncio.run(scenario())
    assert job.state is JobState.QUEUED, job.events.get_nowait() if job.events.qsize() else None
    assert [x.state for x in pool.workers()] == [WorkerState.STARTING]
