"""The scheduler: prompt-cache affinity helpers, and requeues on fake processes."""

from __future__ import annotations

import asyncio

import pytest
from fakepool import fake_pool

from llamapool.ipc.protocol import Request
from llamapool.pool.job import Job, JobState
from llamapool.pool.lifecycle import WorkerState
from llamapool.pool.memory import Sample
from llamapool.pool.scheduler import Scheduler, common_prefix_len, prefix_key


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
