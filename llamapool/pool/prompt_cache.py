"""A RAM cache of sequence states: what a slot held before a request overwrote it.

llama-server's `--cache-ram` in the batching engine's terms. When a slot must take a
request that does not share its prefix, the engine saves the slot's KV cells
(`llama_state_seq_get_data`) here, keyed by the tokens they hold; a later request whose
prompt shares a long enough prefix with a saved state gets it back into its slot
(`llama_state_seq_set_data`) and evaluates only the rest. Entries are evicted least
recently used first, by bytes. Restoring copies the cells byte for byte, so a request's
text does not depend on whether its prefix came from here (tests/test_batch_determinism.py).

Pure Python over opaque states (anything with `nbytes`): testable without llama.cpp.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Prompts shorter than this are neither saved nor restored: a chat template's markers and a
# short question are evaluated in a few milliseconds, less than a save costs in copying
# and in room taken from longer histories.
MIN_TOKENS = 32
# A copy of cells (from another slot, or a saved state) is made when it adds at least this
# many prompt tokens to what the slot holds, and at least 1/COPY_RATIO of the tokens copied:
# the state API copies the source's whole sequence. Measured with SmolLM2 on the 2-core box
# (n_ctx 2048): get+set of a state took 0.1 ms for 16 tokens and 31 ms for 1024 (~0.03 ms a
# token), against 1-8 ms a token to evaluate; llama_memory_seq_cp between split streams
# copies all n_ctx cells of the stream at the next decode (~200 ms however short the prefix).
COPY_MIN_TOKENS = 16
COPY_RATIO = 32
# How far shared_prefix compares with one C-level slice comparison before it walks.
_BLOCK = 64


class CacheSource(enum.Enum):
    """Where a request's reused prompt tokens came from (timings' cache_<source>_n)."""

    SLOT = "slot"  # the slot's own sequence (a chat's next turn on the same slot)
    RAM = "ram"  # a state this cache restored
    SHARED = "shared"  # copied from another slot of the same instance


class State(Protocol):
    """A saved sequence state, as far as the cache is concerned: its size."""

    @property
    def nbytes(self) -> int: ...


@dataclass(eq=False)
class Entry:
    """One saved state and the tokens its cells hold, in order."""

    tokens: list[int]
    state: Any


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share (blocks compared in C, then one walked)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i : i + _BLOCK] == b[i : i + _BLOCK]:
        i += _BLOCK
    if i >= n:
        return n
    # The block may differ only past the shorter sequence's end.
    while i < n and a[i] == b[i]:
        i += 1
    return i


def worth_copying(gain: int, source: list[int]) -> bool:
    """Whether copying a sequence of `source` tokens in, to evaluate `gain` fewer, pays."""
    return gain >= max(COPY_MIN_TOKENS, len(source) // COPY_RATIO)


class PromptCache:
    """Saved sequence states, least recently used first, at most `limit` bytes in all."""

    def __init__(self, limit: int, min_tokens: int = MIN_TOKENS):
        self.limit = limit
        self.min_tokens = min_tokens
        self.entries: list[Entry] = []  # least recently used first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def wants(self, tokens: Sequence[int]) -> bool:
        """Whether a state holding `tokens` would be kept: long enough and not held yet.

        Asked before saving, so that no state is copied out of llama.cpp for nothing.
        """
        if self.limit <= 0 or len(tokens) < self.min_tokens:
            return False
        for entry in self.entries:
            if len(entry.tokens) >= len(tokens) and shared_prefix(entry.tokens, tokens) == len(
                tokens
            ):
                self._touch(entry)
                return False
        return True

    def put(self, tokens: list[int], state: State) -> bool:
        """Keep `state` (holding `tokens`); False if it is larger than the whole cache.

        Entries whose tokens are a prefix of `tokens` go: the new state holds them too.
        """
        size = state.nbytes
        if not self.wants(tokens) or size > self.limit:
            return False
        for entry in [e for e in self.entries if len(e.tokens) <= len(tokens)]:
            if shared_prefix(entry.tokens, tokens) == len(entry.tokens):
                self._drop(entry)
        while self.entries and self.nbytes + size > self.limit:
            self._drop(self.entries[0])
        self.entries.append(Entry(tokens, state))
        self.nbytes += size
        return True

    def best(self, tokens: Sequence[int], beat: int = 0) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with `tokens`, and how long it is, if that is
        at least `min_tokens` and more than `beat`; it becomes the most recently used."""
        found: tuple[Entry, int] | None = None
        for entry in self.entries:
            n = shared_prefix(entry.tokens, tokens)
            if n >= self.min_tokens and n > beat and (found is None or n > found[1]):
                found = (entry, n)
        if found is not None:
            self._touch(found[0])
        return found

    def _touch(self, entry: Entry) -> None:
        self.entries.remove(entry)
        self.entries.append(entry)

    def _drop(self, entry: Entry) -> None:
        self.entries.remove(entry)
        self.nbytes -= entry.state.nbytes
