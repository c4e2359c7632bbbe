"""Prompt-cache affinity: prefix keys and what an instance is taken to hold."""

from __future__ import annotations

import asyncio

import pytest
from fakepool import fake_pool

from llamapool.ipc.protocol import Request
from llamapool.pool.affinity import cached_prefix, common_prefix_len, prefix_key, remember_prefix
from llamapool.pool.handle import WorkerHandle


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


def _worker(capacity: int, cache_entries: int = 0) -> WorkerHandle:
    w = WorkerHandle(id="w", model_id="m", process=None, cores=[], n_threads=1, started_at=0.0)
    w.capacity, w.cache_entries = capacity, cache_entries
    return w


def test_an_instance_remembers_as_many_prefixes_as_its_slots_and_saved_states():
    w = _worker(capacity=2, cache_entries=1)
    for key in ("a1", "b1", "c1", "d1"):
        remember_prefix(w, key)
    assert list(w.recent_prefixes) == ["d1", "c1", "b1"]  # a1's state is the oldest: evicted
    assert cached_prefix(w, "b1 and more") == 2
    assert cached_prefix(w, "a1") == 0


def test_a_conversations_next_turn_replaces_its_earlier_turns():
    w = _worker(capacity=1, cache_entries=5)
    remember_prefix(w, "sys|q1")
    remember_prefix(w, "other")
    remember_prefix(w, "sys|q1|a1|q2")  # the state that holds it holds its first turn too
    assert list(w.recent_prefixes) == ["sys|q1|a1|q2", "other"]
