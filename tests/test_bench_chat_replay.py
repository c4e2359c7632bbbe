"""The chat-replay scenario's conversations and summaries (benchmarks/chat_replay.py).

No server here: a fake `send` stands in for one. The real run against a pool is in
tests/test_bench.py with the harness's other short runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from benchmarks.chat_replay import (
    PREAMBLE,
    ReplaySettings,
    fit_system_prompt,
    prompt_counts,
    replay_conversations,
    summarize_replay,
    system_prompt,
    think_time,
    turn_messages,
    user_message,
)
from benchmarks.client import RequestResult
from benchmarks.sweep import LoadSettings


def _words(text: str) -> int:
    return len(text.split())


def test_system_prompt_is_the_same_text_every_time() -> None:
    assert system_prompt(40) == system_prompt(40)
    assert system_prompt(0) == PREAMBLE
    lines = system_prompt(200).splitlines()
    assert len(lines) == 201
    # Numbered guidelines, none repeated: the text is long without being one line copied.
    assert len(set(lines)) == 201
    assert system_prompt(200).startswith(system_prompt(10))


@pytest.mark.parametrize("tokens", [1, 50, 333, 1000])
def test_fit_system_prompt_is_the_shortest_long_enough(tokens: int) -> None:
    text = fit_system_prompt(tokens, _words)
    assert _words(text) >= tokens
    guidelines = len(text.splitlines()) - 1
    if guidelines:
        assert _words(system_prompt(guidelines - 1)) < tokens
    assert fit_system_prompt(tokens, _words) == text


def test_turn_messages_carry_the_history_with_the_servers_answers() -> None:
    system = system_prompt(3)
    first = turn_messages(system, 2, [])
    assert first == [
        {"role": "system", "content": system},
        {"role": "user", "content": user_message(2, 0)},
    ]
    third = turn_messages(system, 2, ["answer one", "answer two"])
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert third[:2] == first
    assert [m["content"] for m in third if m["role"] == "assistant"] == ["answer one", "answer two"]
    assert third[-1]["content"] == user_message(2, 2)
    assert turn_messages(system, 2, ["answer one", "answer two"]) == third


def test_conversations_part_right_after_the_system_prompt() -> None:
    firsts = {user_message(c, 0) for c in range(64)}
    assert len(firsts) == 64
    assert user_message(0, 1) != user_message(1, 0)


LOAD = LoadSettings(
    levels=[1], requests=1, warmup=0, max_tokens=3, temperature=0.0, seed=10,
    logit_bias={2: -100.0}, request_timeout=5.0,
)  # fmt: skip


def _replay(conversations: int, turns: int) -> ReplaySettings:
    return ReplaySettings(conversations, turns, system_prompt(2), 99)


def _fake_server(fail: frozenset[int] = frozenset()) -> tuple[Any, list[dict[str, Any]]]:
    """A `send` that answers "reply <index>" and records every body; fails the given indexes."""
    bodies: list[dict[str, Any]] = []

    async def send(body: dict[str, Any], index: int) -> RequestResult:
        bodies.append(body)
        sent = sum(len(m["content"]) for m in body["messages"])
        if index in fail:
            return RequestResult(index=index, error="http_503:queue_full", e2e_s=0.01)
        return RequestResult(
            index=index, ok=True, ttft_s=0.01, e2e_s=0.02, completion_tokens=3,
            prompt_tokens=sent, prompt_evaluated=sent // 2, prompt_cached=sent - sent // 2,
            tokens_source="usage", content=f"reply {index}",
        )  # fmt: skip

    return send, bodies


def test_each_turn_sends_the_answers_back() -> None:
    send, bodies = _fake_server()
    conversations, wall = asyncio.run(
        replay_conversations(send, "m", LOAD, _replay(2, 3), lambda result: None)
    )
    assert wall >= 0
    assert [[r.index for r in c] for c in conversations] == [[0, 1, 2], [3, 4, 5]]
    assert conversations[1][2].extra == {"conversation": 1, "turn": 3}
    last = next(b for b in bodies if b["seed"] == LOAD.seed + 5)
    assert [m["content"] for m in last["messages"] if m["role"] == "assistant"] == [
        "reply 3",
        "reply 4",
    ]
    assert last["messages"] == turn_messages(system_prompt(2), 1, ["reply 3", "reply 4"])
    assert last["max_tokens"] == 3 and last["temperature"] == 0.0 and last["stream"]
    assert last["logit_bias"] == {"2": -100.0}


def test_a_failed_turn_ends_its_conversation() -> None:
    send, bodies = _fake_server(fail={1})
    conversations, wall = asyncio.run(
        replay_conversations(send, "m", LOAD, _replay(2, 3), lambda result: None)
    )
    assert len(bodies) == 5
    summary = summarize_replay(conversations, wall, 3, LOAD.max_tokens)
    counts = [summary[key] for key in ("requests", "ok", "failed", "skipped")]
    assert counts == [6, 4, 1, 1]
    assert summary["errors_by_type"] == {"http_503:queue_full": 1}
    turns = summary["per_turn"]
    per_turn = [(t["ok"], t["failed"], t["skipped"]) for t in turns]
    assert per_turn == [(2, 0, 0), (1, 1, 0), (1, 0, 1)]
    assert summary["completion_tokens"] == 12 and summary["short_completions"] == 0
    # The counts cover successes only: one conversation's turns 2 and 3, whose prompt grew.
    sent = [t["prompt_tokens"]["sent"] for t in turns]
    assert sent[1] < sent[2]
    assert summary["prompt_tokens"]["sent"] == sum(sent)
    assert turns[0]["prompt_tokens"]["evaluated_fraction"] == pytest.approx(0.5, abs=0.01)
    assert len(summary["requests_detail"]) == 5


def test_think_times_are_one_schedule_for_every_target() -> None:
    assert think_time(0.0, 10, 3, 1) == 0.0
    times = [think_time(5.0, 10, c, t) for c in range(16) for t in range(1, 4)]
    assert times == [think_time(5.0, 10, c, t) for c in range(16) for t in range(1, 4)]
    assert len(set(times)) == len(times) and min(times) > 0
    assert 2.5 < sum(times) / len(times) < 10  # exponential, mean 5: 48 draws
    assert think_time(5.0, 11, 3, 1) != think_time(5.0, 10, 3, 1)


def test_think_time_comes_between_turns_only(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, float]] = []
    waited: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # record the pause instead of taking it
        waited.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    send, bodies = _fake_server()

    async def record(body: dict[str, Any], index: int) -> RequestResult:
        sent.append((index, sum(waited)))
        return await send(body, index)

    replay = ReplaySettings(1, 3, system_prompt(2), 99, think_s=4.0)
    asyncio.run(replay_conversations(record, "m", LOAD, replay, lambda result: None))
    pauses = [think_time(4.0, LOAD.seed, 0, turn) for turn in (1, 2)]
    assert waited == pauses
    assert sent == [(0, 0.0), (1, pauses[0]), (2, pauses[0] + pauses[1])]
    assert replay.describe()["think_s"] == 4.0


def test_turns_on_a_fixed_clock_are_due_at_their_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """With turn_interval_s, turn k is sent k intervals (plus its think time) after the
    start whatever the answers took, or late (and marked) when an answer ends after that."""
    clock = [100.0]
    sent: list[tuple[int, float]] = []

    async def sleep(seconds: float) -> None:  # the clock moves by the pause, no real wait
        clock[0] += seconds

    monkeypatch.setattr(asyncio, "sleep", sleep)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    send, _ = _fake_server()
    answer_s = [2.0, 100.0, 1.0]  # the second answer ends after the third turn is due

    async def record(body: dict[str, Any], index: int) -> RequestResult:
        sent.append((index, clock[0] - 100.0))
        result = await send(body, index)
        clock[0] += answer_s[index]
        return result

    replay = ReplaySettings(1, 3, system_prompt(2), 99, think_s=4.0, turn_interval_s=30.0)
    conversations, _ = asyncio.run(
        replay_conversations(record, "m", LOAD, replay, lambda result: None)
    )
    pauses = [think_time(4.0, LOAD.seed, 0, turn) for turn in (1, 2)]
    assert sent[0] == (0, 0.0)
    assert sent[1] == (1, pytest.approx(30.0 + pauses[0]))
    due = 60.0 + pauses[1]
    arrived = 30.0 + pauses[0] + 100.0
    assert arrived > due
    assert sent[2] == (2, pytest.approx(arrived))
    turns = conversations[0]
    assert turns[1].extra["late_s"] == 0.0
    assert turns[2].extra["late_s"] == pytest.approx(arrived - due)
    assert "late_s" not in turns[0].extra
    assert replay.describe()["turn_interval_s"] == 30.0


def test_prompt_counts_are_null_unless_every_answer_has_them() -> None:
    known = RequestResult(index=0, ok=True, prompt_tokens=10, prompt_evaluated=4, prompt_cached=6)
    unknown = RequestResult(index=1, ok=True, prompt_tokens=12)
    failed = RequestResult(index=2, error="timeout")
    assert prompt_counts([known, failed]) == {
        "sent": 10, "evaluated": 4, "cached": 6, "evaluated_fraction": 0.4,
    }  # fmt: skip
    # A partial sum would look like a cache saving.
    assert prompt_counts([known, unknown]) == {
        "sent": 22, "evaluated": None, "cached": None, "evaluated_fraction": None,
    }  # fmt: skip
    assert prompt_counts([])["sent"] is None
