"""The RAM prompt cache: LRU by bytes without llama.cpp, then restores in the batching engine."""

from __future__ import annotations

import pytest
from engineutil import alone, together

from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.batch import BatchEngine
from llamapool.pool.prompt_cache import PromptCache, shared_prefix


class _State:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def _tokens(first: int, n: int = 40) -> list[int]:
    return [first] + list(range(100, 100 + n - 1))


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [], 0),
        ([1, 2, 3], [], 0),
        ([1, 2, 3], [1, 2, 4], 2),
        (list(range(200)), list(range(200)), 200),
        (list(range(70)), list(range(130)), 70),  # a block that differs only in length
        (list(range(64)) + [1], list(range(64)) + [2], 64),
        (list(range(130)) + [1], list(range(130)) + [2], 130),
    ],
)
def test_shared_prefix(a, b, n):
    assert shared_prefix(a, b) == n == shared_prefix(b, a)


def test_least_recently_used_states_go_first_by_bytes():
    cache = PromptCache(limit=100, min_tokens=8)
    a, b, c = _tokens(1), _tokens(2), _tokens(3)
    assert cache.put(a, _State(40)) and cache.put(b, _State(40))
    assert cache.best(a + [7])[1] == len(a)  # a is now the most recently used
    assert cache.put(c, _State(40))
    assert [e.tokens for e in cache.entries] == [a, c]  # b went: 120 bytes would not fit
    assert cache.nbytes == 80 and len(cache) == 2
    assert not cache.put(_tokens(4), _State(101))  # larger than the whole cache
    assert cache.nbytes == 80


def test_a_longer_state_replaces_the_ones_it_extends():
    cache = PromptCache(limit=1000, min_tokens=8)
    turn1 = _tokens(1)
    assert cache.put(turn1, _State(10))
    turn2 = turn1 + [5, 6, 7]
    assert cache.put(turn2, _State(12))
    assert [e.tokens for e in cache.entries] == [turn2] and cache.nbytes == 12
    assert not cache.wants(turn1)  # held: turn2's state holds it too
    assert not cache.put(turn1, _State(10))


def test_best_takes_the_longest_shared_prefix_past_the_minimum():
    cache = PromptCache(limit=1000, min_tokens=8)
    short, long = _tokens(1, 20), _tokens(1, 30)
    cache.put([9] + short, _State(1))
    cache.put(long, _State(1))
    found = cache.best(_tokens(1, 25) + [0])
    assert found is not None and found[0].tokens == long and found[1] == 25
    assert cache.best(_tokens(1, 25), beat=25) is None
    assert cache.best(_tokens(1, 7)) is None  # shares fewer than min_tokens


def test_short_prompts_and_a_zero_limit_keep_nothing():
    assert not PromptCache(limit=1000, min_tokens=32).wants(_tokens(1, 31))
    assert not PromptCache(limit=0).put(_tokens(1, 100), _State(1))


# -- in the batching engine, on the tiny model ------------------------------------------

HISTORY = "tell me everything about the harbour, the boats and the weather on the lakes"


def _engine(path, **config) -> BatchEngine:
    cfg = {"model_path": str(path), "n_ctx": 512, "n_threads": 1, "n_parallel": 1, **config}
    return BatchEngine(parse_config({"models": [{"id": "m", "config": cfg}]}).models["m"])


def _ask(rid: str, content: str, kind: str = "chat") -> Request:
    params = SamplingParams(temperature=0, max_tokens=4)
    if kind == "completion":
        return Request(request_id=rid, kind="completion", prompt=content, params=params)
    return Request(
        request_id=rid, kind="chat", messages=[{"role": "user", "content": content}], params=params
    )


def test_a_history_comes_back_from_ram_after_its_slot_was_overwritten(tiny_gguf):
    engine = _engine(tiny_gguf)
    try:
        sink = alone(
            engine, [_ask("a", HISTORY), _ask("b", "something else entirely"), _ask("a2", HISTORY)]
        )
        first, again = sink.results["a"].usage, sink.results["a2"]
        assert len(engine.prompt_cache) == 2  # a's state, then b's when a2 took the slot
        assert again.usage.cached_tokens == first.prompt_tokens - 1
        assert again.timings.cache_ram_n == again.usage.cached_tokens
        assert again.timings.cache_slot_n == again.timings.cache_shared_n == 0
    finally:
        engine.close()


def test_a_prompt_shorter_than_the_minimum_is_not_saved(tiny_gguf):
    engine = _engine(tiny_gguf)
    try:
        alone(
            engine, [_ask("short", "abc", kind="completion"), _ask("b", "xyz", kind="completion")]
        )
        assert len(engine.prompt_cache) == 0
    finally:
        engine.close()


def test_prompt_cache_bytes_0_turns_it_off(tiny_gguf):
    engine = _engine(tiny_gguf, prompt_cache_bytes=0)
    try:
        sink = alone(engine, [_ask("a", HISTORY), _ask("b", "something else"), _ask("a2", HISTORY)])
        assert len(engine.prompt_cache) == 0 and engine.prompt_cache.nbytes == 0
        # Only the chat template's default system prompt, which b shares, is reused.
        assert sink.results["a2"].timings.cache_ram_n == 0
    finally:
        engine.close()


@pytest.mark.parametrize("share", [True, False])
def test_share_prefixes_false_leaves_each_slot_its_own(tiny_gguf, share):
    engine = _engine(tiny_gguf, n_parallel=3, share_prefixes=share)
    asks = [_ask(f"r{i}", HISTORY + f" and question {i}") for i in range(3)]
    try:
        sink = together(engine, asks, {})
        assert sink.text.keys() == {"r0", "r1", "r2"}
        shared = sorted(r.timings.cache_shared_n for r in sink.results.values())
        if share:  # one slot evaluates the history, the others wait and copy it
            assert shared[0] == 0 and all(n >= len(HISTORY) for n in shared[1:]), shared
        else:
            assert shared == [0, 0, 0]
    finally:
        engine.close()
