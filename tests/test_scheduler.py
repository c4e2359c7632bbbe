"""Scheduler helpers for prompt-cache affinity."""

from __future__ import annotations

import pytest

from llamapool.ipc.protocol import Request
from llamapool.pool.scheduler import common_prefix_len, prefix_key


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
