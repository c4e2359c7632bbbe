"""The chat-replay scenario: concurrent multi-turn conversations that share one system prompt.

Every turn sends the whole history back (the system prompt, the earlier user messages and
the answers as the server returned them) plus a new user message, as chat clients and agents
do. A server with prompt caches evaluates only what it has not seen; per turn, the prompt
tokens it evaluated against those it was sent show what its caches saved.
"""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.progress import Progress, TaskID

from benchmarks.client import RequestResult, chat_body
from benchmarks.stats import distribution, errors_by_type
from benchmarks.sweep import LoadSettings, on_each_target
from benchmarks.targets import HttpTarget, TargetSettings

PREAMBLE = (
    "You are the support assistant of Harbour Lights, a company that rents out sailing "
    "boats, kayaks and paddle boards on three lakes. Answer customers briefly and politely. "
    "Follow every guideline below in every answer."
)
_SUBJECTS = (
    "When a customer asks about prices,",
    "If a booking is cancelled less than a day ahead,",
    "When the weather forecast warns of strong wind,",
    "If a child under twelve is on board,",
    "When a customer reports damage to a boat,",
    "If someone asks for a route recommendation,",
    "When a payment fails,",
    "If a customer wants to extend a rental,",
    "When a question is about the opening hours,",
    "If a group of more than eight people books,",
    "When a customer mentions a medical condition,",
    "If a customer asks about lessons,",
    "When a boat comes back late,",
)
_ACTIONS = (
    "quote the current season's rates and mention the weekday discount",
    "explain the refund rules and offer a voucher instead",
    "advise staying close to the shore and wearing a life jacket",
    "remind them that an adult must hold the rental contract",
    "ask for photos and the rental number before anything else",
    "suggest the northern loop past the old lighthouse",
    "ask them to try another card and keep the booking for an hour",
    "check the calendar for the next booking of the same boat",
    "say that every station opens at eight and closes at sunset",
    "offer the group rate and a guide at no extra cost",
    "recommend a calm lake and a stable boat",
    "list the beginner, improver and racing courses",
    "charge the late fee only after the first thirty minutes",
)
QUESTIONS = (
    "How much is a kayak for two hours?",
    "Can I bring my dog on a paddle board?",
    "What should I do if it starts raining?",
    "Is there parking near the north station?",
    "Can we change our booking to Sunday?",
    "Do you rent wetsuits as well?",
    "What is the best route for beginners?",
    "How early should we arrive?",
)

# What a chat template adds around each message (role markers, newlines), for the context
# check. Generous: a server out of context cuts the answer short (the tiny test model, one
# token per character, spends 13 on ChatML's markers).
_TEMPLATE_TOKENS_PER_MESSAGE = 16


def system_prompt(guidelines: int) -> str:
    """The preamble and `guidelines` numbered guidelines: the same text on every machine."""
    lines = [PREAMBLE]
    for i in range(guidelines):
        # 13 subjects and 13 actions in different steps: 169 distinct pairs before a repeat.
        subject = _SUBJECTS[i % len(_SUBJECTS)]
        action = _ACTIONS[(i + i // len(_SUBJECTS)) % len(_ACTIONS)]
        lines.append(f"{i + 1}. {subject} {action}.")
    return "\n".join(lines)


def fit_system_prompt(tokens: int, count: Callable[[str], int]) -> str:
    """The shortest `system_prompt(k)` with at least `tokens` tokens as `count` counts them."""
    high = 1
    while count(system_prompt(high)) < tokens:
        high *= 2
    low = 0
    # Invariant: system_prompt(high) is long enough, system_prompt(low) may not be.
    while low < high:
        middle = (low + high) // 2
        if count(system_prompt(middle)) >= tokens:
            high = middle
        else:
            low = middle + 1
    return system_prompt(high)


def user_message(conversation: int, turn: int) -> str:
    """Turn `turn` (from 0) of conversation `conversation`: short, and unique to both."""
    question = QUESTIONS[(conversation + turn) % len(QUESTIONS)]
    # The numbers make every conversation differ right after the shared system prompt, so
    # no two conversations share more than it whatever their count.
    return f"Customer {conversation + 1}, message {turn + 1}: {question}"


def turn_messages(system: str, conversation: int, answers: Sequence[str]) -> list[dict[str, str]]:
    """The messages of turn `len(answers)`: the history with the server's answers, then a new
    user message."""
    messages = [{"role": "system", "content": system}]
    for turn, answer in enumerate(answers):
        messages.append({"role": "user", "content": user_message(conversation, turn)})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": user_message(conversation, len(answers))})
    return messages


def prompt_estimate(
    system_tokens: int, turns: int, max_tokens: int, count: Callable[[str], int]
) -> int:
    """A generous estimate of the last turn's prompt plus its answer, in tokens."""
    # A seven-digit customer number: longer than any run's, so the estimate stays an upper bound.
    longest_user = max(count(user_message(10**6, turn)) for turn in range(len(QUESTIONS)))
    # The system prompt, a user message and an answer per turn, and the generation prompt.
    messages = 2 + 2 * turns
    return (
        system_tokens
        + turns * longest_user
        + turns * max_tokens
        + messages * _TEMPLATE_TOKENS_PER_MESSAGE
    )


@dataclass(frozen=True)
class ReplaySettings:
    """The conversations every target gets."""

    conversations: int
    turns: int
    system_prompt: str
    # As the model file's tokenizer counts it; a --url server with another model differs.
    system_tokens: int
    # Mean seconds a user reads and types between an answer and their next turn (0: the
    # next turn is sent at once, a closed loop). See `think_time`.
    think_s: float = 0.0
    # Seconds between a conversation's turns on a fixed clock: turn k (from 0) is due at
    # k × turn_interval_s (+ its think time) from the replay's start, or when the previous
    # answer ends if that is later (0: off). Every target that keeps up then gets the same
    # arrivals, so per-turn TTFT compares the servers, not how their earlier turns bunched
    # the later ones.
    turn_interval_s: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The JSON config section: enough to check two runs sent the same bytes."""
        return {
            "conversations": self.conversations,
            "turns": self.turns,
            "think_s": self.think_s,
            "turn_interval_s": self.turn_interval_s,
            "system_prompt_tokens": self.system_tokens,
            "system_prompt_chars": len(self.system_prompt),
            "system_prompt_sha256": hashlib.sha256(self.system_prompt.encode()).hexdigest(),
        }


Send = Callable[[dict[str, Any], int], Awaitable[RequestResult]]


def think_time(mean_s: float, seed: int, conversation: int, turn: int) -> float:
    """How long conversation `conversation` waits before sending turn `turn` (from 1):
    exponential with mean `mean_s`, the same for every target and run with the same seed.

    Without it, conversations that finish a turn together send their next turns together,
    and per-turn TTFT mostly measures that burst queueing for slots; with it, turns arrive
    spread out as people's do.
    """
    if mean_s <= 0:
        return 0.0
    return random.Random(f"think:{seed}:{conversation}:{turn}").expovariate(1.0 / mean_s)


async def replay_conversations(
    send: Send,
    model_name: str,
    load: LoadSettings,
    replay: ReplaySettings,
    on_result: Callable[[RequestResult], None],
) -> tuple[list[list[RequestResult]], float]:
    """All conversations at once, each turn after the previous; (results per conversation,
    wall seconds). A conversation stops at its first failed turn: there is no answer to send
    back."""
    origin = time.perf_counter()

    async def converse(conversation: int) -> list[RequestResult]:
        answers: list[str] = []
        results: list[RequestResult] = []
        for turn in range(replay.turns):
            index = conversation * replay.turns + turn
            late = None
            if turn > 0:
                # The user reading and typing: part of the workload, not a synchronisation.
                pause = think_time(replay.think_s, load.seed, conversation, turn)
                if replay.turn_interval_s > 0:
                    due = origin + turn * replay.turn_interval_s + pause
                    late = max(0.0, time.perf_counter() - due)
                    pause = max(0.0, due - time.perf_counter())
                await asyncio.sleep(pause)
            body = chat_body(
                model_name,
                turn_messages(replay.system_prompt, conversation, answers),
                load.max_tokens,
                load.temperature,
                load.seed + index,
                load.logit_bias,
            )
            result = await send(body, index)
            result.extra.update(conversation=conversation, turn=turn + 1)
            if late is not None:  # behind the schedule: this turn's arrival differs
                result.extra["late_s"] = late
            results.append(result)
            on_result(result)
            if not result.ok:
                break
            answers.append(result.content or "")
        return results

    conversations = await asyncio.gather(*(converse(c) for c in range(replay.conversations)))
    return list(conversations), time.perf_counter() - origin


async def _replay_on(
    target: HttpTarget,
    load: LoadSettings,
    replay: ReplaySettings,
    on_result: Callable[[RequestResult], None],
) -> tuple[list[list[RequestResult]], float]:
    origin = time.perf_counter()

    async def send(body: dict[str, Any], index: int) -> RequestResult:
        return await target.send(body, index, load.request_timeout, origin)

    return await replay_conversations(send, target.model_name, load, replay, on_result)


def _sum_if_all(values: Sequence[int | None]) -> int | None:
    """The sum, or None unless every value is known: a partial sum would look like a saving."""
    if not values or any(not isinstance(v, int) for v in values):
        return None
    return sum(values)  # type: ignore[arg-type]


def prompt_counts(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Prompt tokens sent, evaluated by the server and taken from its cache (successes only)."""
    ok = [r for r in results if r.ok]
    sent = _sum_if_all([r.prompt_tokens for r in ok])
    evaluated = _sum_if_all([r.prompt_evaluated for r in ok])
    return {
        "sent": sent,
        "evaluated": evaluated,
        "cached": _sum_if_all([r.prompt_cached for r in ok]),
        "evaluated_fraction": evaluated / sent if sent and evaluated is not None else None,
    }


def _tokens(results: Sequence[RequestResult], max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    return {
        "completion_tokens": sum(r.completion_tokens for r in ok),
        # Answers that stopped before max_tokens: EOS suppression did not hold.
        "short_completions": sum(1 for r in ok if r.completion_tokens != max_tokens),
    }


def summarize_turn(
    turn: int, results: Sequence[RequestResult], skipped: int, max_tokens: int
) -> dict[str, Any]:
    """Turn `turn` (from 1) of every conversation that got that far, JSON-ready."""
    ok = [r for r in results if r.ok]
    tokens = _tokens(results, max_tokens)
    # Turns of different conversations overlap: this span runs from the first request of
    # the turn to the last one's end, so its tok/s is the turn's share of a busy server.
    starts = [r.start_s for r in results]
    ends = [r.start_s + r.e2e_s for r in results if r.e2e_s is not None]
    span = max(ends) - min(starts) if starts and ends else None
    return {
        "turn": turn,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "skipped": skipped,
        "errors_by_type": errors_by_type(results),
        # With --turn-interval: turns sent after their due time (the previous answer ended
        # later), whose arrivals are not the schedule's.
        "late": sum(1 for r in results if r.extra.get("late_s", 0.0) > 0.0),
        **tokens,
        "span_s": span,
        "aggregate_tok_s": tokens["completion_tokens"] / span if span else None,
        "stream_tok_s": distribution(r.completion_tokens / r.e2e_s for r in ok if r.e2e_s),
        "ttft_s": distribution(r.ttft_s for r in ok),
        # The server's own time to its first token (timings.prompt_ms), free of HTTP.
        "server_prompt_s": distribution(r.server_ttft_s for r in ok),
        "e2e_s": distribution(r.e2e_s for r in ok),
        "prompt_tokens": prompt_counts(results),
    }


def summarize_replay(
    conversations: Sequence[Sequence[RequestResult]], wall_s: float, turns: int, max_tokens: int
) -> dict[str, Any]:
    """The whole scenario and each turn number, JSON-ready."""
    everything = [r for results in conversations for r in results]
    ok = [r for r in everything if r.ok]
    tokens = _tokens(everything, max_tokens)
    per_turn = []
    for turn in range(turns):
        results = [c[turn] for c in conversations if len(c) > turn]
        per_turn.append(
            summarize_turn(turn + 1, results, len(conversations) - len(results), max_tokens)
        )
    return {
        "requests": len(conversations) * turns,
        "ok": len(ok),
        "failed": len(everything) - len(ok),
        "skipped": len(conversations) * turns - len(everything),
        "errors_by_type": errors_by_type(everything),
        "wall_s": wall_s,
        **tokens,
        "tokens_source": sorted({r.tokens_source for r in ok}),
        "aggregate_tok_s": tokens["completion_tokens"] / wall_s if wall_s > 0 else None,
        "ttft_s": distribution(r.ttft_s for r in ok),
        "prompt_tokens": prompt_counts(everything),
        "per_turn": per_turn,
        "requests_detail": [r.as_dict() for r in everything],
    }


async def run_chat_replay(
    targets: list[str],
    settings: TargetSettings,
    load: LoadSettings,
    replay: ReplaySettings,
    workdir: pathlib.Path,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Every target's chat replay by name; a target that could not run has `error` set."""

    async def work(target: Any, task: TaskID) -> dict[str, Any]:
        if not isinstance(target, HttpTarget):
            raise ValueError(f"chat-replay needs an HTTP target, not {target.name}")
        progress.update(
            task,
            description=f"{target.name}: {replay.conversations} conversations",
            total=replay.conversations * replay.turns,
        )
        conversations, wall = await _replay_on(
            target, load, replay, lambda result: progress.advance(task)
        )
        return summarize_replay(conversations, wall, replay.turns, load.max_tokens)

    return await on_each_target(
        targets,
        settings,
        load,
        workdir,
        progress,
        replay.conversations,
        load.request_timeout,
        work,
    )
