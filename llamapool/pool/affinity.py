"""Prompt-cache affinity: which instance most likely holds a request's prompt in its caches.

The router does not tokenize, so it reasons about text: a request's prefix key is its
messages (roles and contents) in the order the model sees them, and an instance is taken to
hold the prefix keys of the requests it served lately, as many as it has slots plus states
in its RAM prompt cache (its heartbeat says how many). Both caches drop the least recently
used first, so the most recent keys are the ones still held.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from llamapool.ipc import protocol as P

if TYPE_CHECKING:
    from llamapool.pool.handle import WorkerHandle


def prefix_key(request: P.Request) -> str:
    """The request's text in the order the model sees it (roles and contents, or the prompt).

    A prompt of token ids becomes one character per token, so keys share a prefix exactly
    when the prompts do."""
    if request.messages is not None:
        return "".join(f"{m.get('role')}\x1f{m.get('content')}\x1e" for m in request.messages)
    if isinstance(request.prompt, list):
        return "\x1d" + "".join(chr(min(t, 0x10FFFF)) for t in request.prompt)
    return request.prompt or ""


# The most prefix keys remembered per instance: bounds the cost of a dispatch.
MAX_REMEMBERED_PREFIXES = 64
# Dispatch sends a request to an instance with up to this many more requests in flight
# than the least loaded one when it holds at least AFFINITY_MIN_GAIN more characters of
# the request's prefix (~16 tokens of English: ~0.2 s of prompt evaluation on one core of
# the 2-core box, where the extra request costs its neighbours one row per step).
AFFINITY_SLACK = 1
AFFINITY_MIN_GAIN = 64


def remember_prefix(worker: WorkerHandle, key: str) -> None:
    """Note that `worker` serves a request with prefix key `key` (it will cache its prompt).

    Keys it contains are dropped (its state holds them too, as the engine's RAM cache drops
    a state the newer one extends); as many are kept as the worker's slots and saved states.
    """
    kept = deque(k for k in worker.recent_prefixes if not key.startswith(k))
    kept.appendleft(key)
    room = min(MAX_REMEMBERED_PREFIXES, max(1, worker.capacity + worker.cache_entries))
    while len(kept) > room:
        kept.pop()
    worker.recent_prefixes = kept


def cached_prefix(worker: WorkerHandle, key: str) -> int:
    """The longest prefix of `key` that `worker` most likely holds in its caches."""
    return max((common_prefix_len(k, key) for k in worker.recent_prefixes), default=0)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, by bisection over C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
