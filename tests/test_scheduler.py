"""Dispatch: least loaded first, then prompt-cache affinity, then least recently used."""

from __future__ import annotations

from llamapool.pool.affinity import remember_prefix
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.lifecycle import WorkerState
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
    # Affinity only breaks ties of load: an instance with fewer requests in flight wins.
    b.in_flight["r-1"] = object()
    assert scheduler._pick_worker("m", next_turn) is c
    # Nothing shared: the least recently used.
    assert scheduler._pick_worker("m", "user\x1fnew\x1e") is c
