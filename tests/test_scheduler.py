"""Dispatch: least loaded first, then prompt-cache affinity (pool/affinity.py), then least
recently used."""

from __future__ import annotations

import pytest

from llamapool.ipc.protocol import Request
from llamapool.pool.affinity import cached_prefix, common_prefix_len, prefix_key, remember_prefix
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
