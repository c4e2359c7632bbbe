"""Speculative decoding (pool/speculative.py): drafts verified in the shared decode.

The engine cases serve the same requests with speculation off and on, on real llama.cpp,
and compare texts byte for byte: greedy, seeded at temperature 0.8, alone and together,
with max_tokens and stop sequences landing inside accepted drafts.
"""

from __future__ import annotations

import numpy as np
import pytest
from engineutil import alone, ask, copy_requests, together
from tinymodel import write_tiny_llama

from llamapool.config import ConfigError, SpeculativeSettings, parse_config, parse_model
from llamapool.ipc.protocol import Request
from llamapool.pool.batch import BatchEngine
from llamapool.pool.speculative import (
    Ask,
    NgramDrafter,
    Speculator,
    StepCost,
    accept_run,
    fair_shares,
    ubatches,
)


def _engine(path, speculative=None, **config) -> BatchEngine:
    cfg = {"model_path": str(path), "n_ctx": 512, "n_threads": 1, "n_parallel": 4, **config}
    if speculative is not None:
        cfg["speculative"] = speculative
    return BatchEngine(parse_config({"models": [{"id": "m", "config": cfg}]}).models["m"])


def _served(path, requests, speculative=None, *, concurrent=False, **config):
    engine = _engine(path, speculative, **config)
    try:
        if concurrent:  # four at once, the rest as the first ends
            first, rest = requests[:4], requests[4:]
            return together(engine, first, {(first[0].request_id, "done"): rest} if rest else {})
        return alone(engine, requests)
    finally:
        engine.close()


def _counts(sink) -> tuple[int, int]:
    usage = [r.usage for r in sink.results.values()]
    return sum(u.drafted_tokens for u in usage), sum(u.accepted_tokens for u in usage)


# -- the pieces ------------------------------------------------------------------


def test_accept_run_keeps_sampling_while_the_draft_is_right():
    sampled = {10: 5, 11: 6, 12: 9, 13: 7}
    got: list[int] = []

    def push(row: int, token: int) -> bool:
        got.append(token)
        return False

    # run = [sampled token 4, drafts 5, 6, 7, 8]: rows 10, 11 match, row 12 gives 9.
    assert accept_run(sampled.__getitem__, push, 10, [4, 5, 6, 7, 8]) == (3, 9)
    assert got == [5, 6, 9]
    got.clear()
    assert accept_run(sampled.__getitem__, push, 10, [4, 5, 6]) == (3, 9)  # all accepted
    got.clear()
    # The request ends at the second sampled token: nothing after it counts.
    assert accept_run(
        sampled.__getitem__, lambda row, t: got.append(t) or t == 6, 10, [4, 5, 6, 7]
    ) == (
        2,
        None,
    )


def test_fair_shares_split_the_room_one_slot_cannot_take_it_all():
    assert fair_shares({0: 4, 1: 8}, 100) == {0: 4, 1: 8}
    assert fair_shares({0: 16, 1: 16, 2: 2}, 12) == {0: 5, 1: 5, 2: 2}
    shares = fair_shares({0: 16, 1: 16, 2: 16}, 7)
    assert sum(shares.values()) == 7 and max(shares.values()) - min(shares.values()) <= 1


def test_ngram_lookup_takes_the_latest_longest_match():
    drafter = NgramDrafter(SpeculativeSettings(mode="ngram", ngram_min=2, ngram_max=3), 1, 64)
    # ... 1 2 3 [7 8] ... 2 3 [9] ... 1 2 | next 3: "1 2 3" matched at the first place
    # (longest), although "2 3" occurs later.
    text = [1, 2, 3, 7, 8, 5, 2, 3, 9, 6, 1, 2]
    assert drafter.draft([(Ask(0, text, 3, limit=8), 2)]) == {0: [7, 8]}
    # Nothing earlier matches the last two tokens: no draft.
    drafter.begin(0)
    assert drafter.draft([(Ask(0, [1, 2, 3, 4], 5, limit=8), 4)]) == {}
    # The buffer follows the sequence as it grows, and a new request starts over.
    drafter.begin(0)
    assert drafter.draft([(Ask(0, [4, 5, 6, 4], 5, limit=8), 4)]) == {0: [6, 4, 5]}
    assert drafter.draft([(Ask(0, [4, 5, 6, 4, 5, 6, 4], 5, limit=8), 8)]) == {0: [6, 4, 5]}


def test_ngram_lookup_of_a_long_text_is_cheap():
    drafter = NgramDrafter(SpeculativeSettings(mode="ngram"), 1, 4096)
    rng = np.random.default_rng(0)
    text = rng.integers(0, 50_000, 4000).tolist()
    assert drafter.draft([(Ask(0, text, text[100], limit=16), 16)]) in ({}, {0: text[101:117]})


class _Repeat:
    """A drafter that proposes token 7, as many as asked."""

    probes = True

    def begin(self, seq: int) -> None:
        pass

    def draft(self, asks):
        return {ask.seq: [7] * n for ask, n in asks}

    def close(self) -> None:
        pass


def test_ubatches_follow_llama_cpps_equal_split():
    assert ubatches([(s, 1) for s in range(8)], 512) == 1
    assert ubatches([(0, 5), (1, 1), (2, 1)], 512) == 2  # seq 0's drafts: one more
    assert ubatches([(0, 5), (1, 3)], 512) == 2  # 3 rows of each, then seq 0's 2
    assert ubatches([(0, 1), (2, 1)], 512) == 2  # not consecutive: one ubatch each
    assert ubatches([(0, 600)], 512) == 2


def test_step_cost_is_fitted_from_decodes_of_different_shapes():
    cost = StepCost()
    for _ in range(5):
        cost.observe(1, 1, 0.012)
    assert cost.fit() is None  # all alike: the share of a row is unknown
    for u, rows in [(1, 9), (2, 9), (1, 17), (3, 8), (1, 4)]:
        cost.observe(u, rows, 0.01 * u + 0.002 * rows)
    per_ubatch, per_row = cost.fit()
    assert per_ubatch == pytest.approx(0.01, rel=0.05)
    assert per_row == pytest.approx(0.002, rel=0.05)
    for _ in range(200):  # all alike again: no new information, the last fit holds
        cost.observe(1, 8, 0.026)
    assert cost.fit() == pytest.approx((0.01, 0.002), rel=0.05)


def _speculator(per_ubatch: float, per_row: float, **settings) -> Speculator:
    spec = Speculator(SpeculativeSettings(mode="ngram", **settings), _Repeat(), 2)
    for rows in [1, 4, 2, 8, 1, 16]:
        spec.observe(1, rows, per_ubatch + per_row * rows)
    return spec


def test_drafts_run_long_where_rows_are_cheap_and_stop_where_they_cost_a_step():
    ask = [Ask(0, [1, 2, 3], 4, limit=64)]
    # A GPU-like decode: a row costs 1/40 of a step: 3 in 4 drafts right earns 12 tokens.
    assert len(_speculator(0.02, 0.0005).plan(ask, 512, 512)[0]) == 12
    # A CPU-like one: a row costs 95% of a step; no draft pays, until p is above 0.95.
    cpu = _speculator(0.001, 0.02)
    assert cpu.plan(ask, 512, 512) == {}
    for _ in range(15):  # then one token every 16 steps, to see whether the text repeats
        assert cpu.plan(ask, 512, 512) == {}
    assert cpu.plan(ask, 512, 512) == {0: [7]}
    for _ in range(20):
        cpu.verified(0, 4, 4)  # a passage being copied: every draft right
    assert len(cpu.plan(ask, 512, 512)[0]) == 16
    # Not adaptive: draft_max every step, whatever it costs.
    assert len(_speculator(0.001, 0.02, adaptive=False).plan(ask, 512, 512)[0]) == 16
    assert cpu.counts(0) == (80, 80)


# -- configuration -----------------------------------------------------------------


def _model(path, **speculative) -> dict:
    return {"id": "m", "config": {"model_path": str(path), "speculative": speculative}}


@pytest.mark.parametrize(
    ("speculative", "message"),
    [
        ({"mode": "ngram", "draft_maxx": 4}, "draft_maxx"),
        ({"mode": "lookahead"}, "speculative.mode"),
        ({"mode": "ngram", "draft_max": 0}, "speculative.draft_max"),
        ({"mode": "ngram", "draft_min": 9, "draft_max": 4}, "draft_min (9) is above draft_max"),
        ({"mode": "ngram", "ngram_min": 5, "ngram_max": 3}, "ngram_min (5) is above ngram_max"),
        ({"mode": "draft"}, "draft_model_path: mode draft needs"),
    ],
)
def test_bad_speculative_settings_are_refused_by_name(tiny_gguf, speculative, message):
    with pytest.raises(ConfigError, match="model 'm'") as err:
        parse_model(_model(tiny_gguf, **speculative), 0, None)
    assert message in str(err.value)


def test_ngram_mode_refuses_a_draft_model(tiny_gguf):
    with pytest.raises(ConfigError, match="mode ngram drafts without a model"):
        parse_model(_model(tiny_gguf, mode="ngram", draft_model_path=str(tiny_gguf)), 0, None)


def test_a_draft_with_another_vocabulary_is_refused_at_load(tiny_gguf, smollm2_gguf):
    raw = _model(smollm2_gguf, mode="draft", draft_model_path=str(tiny_gguf))
    with pytest.raises(ConfigError, match="cannot draft for this model") as err:
        parse_model(raw, 0, None)
    assert "config.speculative.draft_model_path" in str(err.value)
    # In a whole file the model is broken, by name, and the others still serve.
    config = parse_config({"models": [raw, {"id": "ok", "config": {"model_path": str(tiny_gguf)}}]})
    assert "cannot draft" in config.broken["m"] and "ok" in config.models


def test_the_worker_refuses_a_draft_with_another_vocabulary_too(tiny_gguf, smollm2_gguf):
    # Files unchecked at load (or changed since): the engine compares the loaded vocabularies.
    raw = _model(tiny_gguf, mode="draft", draft_model_path=str(smollm2_gguf))
    spec = parse_config({"models": [raw]}, check_files=False).models["m"]
    with pytest.raises(ValueError, match="cannot draft for .*the tokenizer types differ"):
        BatchEngine(spec)


def test_a_draft_with_the_same_vocabulary_is_taken(tiny_gguf, tmp_path):
    other = write_tiny_llama(tmp_path / "other.gguf", seed=7)  # same tokens, other weights
    spec = parse_model(_model(tiny_gguf, mode="draft", draft_model_path=str(other)), 0, None)
    assert spec.config.speculative.draft_model_path == str(other)


# -- the engine: same text with and without drafts ------------------------------------


def _tiny_requests() -> list[Request]:
    prompts = ["hello there", "tell me a story about a dragon", "abc abc abc abc", "2 + 2"]
    greedy = [ask(f"g{i}", p, temperature=0, max_tokens=60) for i, p in enumerate(prompts)]
    seeded = [ask("s0", prompts[1], temperature=0.8, seed=3, max_tokens=60)]
    return greedy + seeded


def test_tiny_text_is_the_same_with_ngram_drafts_alone_and_together(tiny_gguf):
    requests = _tiny_requests()
    reference = _served(tiny_gguf, requests)
    ngram = {"mode": "ngram", "draft_max": 8, "adaptive": False}
    drafted = _served(tiny_gguf, requests, ngram)
    assert drafted.text == reference.text
    assert _counts(drafted)[1] > 0, "the tiny model repeats itself: some drafts must pass"
    assert _served(tiny_gguf, requests, ngram, concurrent=True).text == reference.text


def test_tiny_max_tokens_and_stops_inside_accepted_drafts(tiny_gguf):
    ngram = {"mode": "ngram", "draft_max": 8, "adaptive": False}
    full = _served(tiny_gguf, [ask("r", "abc abc abc abc", temperature=0, max_tokens=60)])
    text = full.text["r"]
    # Every length, so some end inside a run of accepted drafts.
    cut = [ask(f"n{n}", "abc abc abc abc", temperature=0, max_tokens=n) for n in range(1, 30)]
    # Stops taken from the text's middle, where drafts are accepted.
    stops = [text[i : i + 3] for i in range(20, 50, 7) if text[i : i + 3].strip()]
    cut += [
        ask(f"s{i}", "abc abc abc abc", temperature=0, max_tokens=60, stop=[stop])
        for i, stop in enumerate(stops)
    ]
    reference = _served(tiny_gguf, cut)
    drafted = _served(tiny_gguf, cut, ngram)
    assert drafted.text == reference.text
    for rid, result in drafted.results.items():
        assert result.finish_reason == reference.results[rid].finish_reason, rid
        assert result.usage.completion_tokens == reference.results[rid].usage.completion_tokens
    assert _counts(drafted)[1] > 0
    # The slots' sequences hold exactly their tokens: a request reusing a cut one's prefix
    # still gets the reference text.
    again = _served(tiny_gguf, cut[:3] + cut[:3], ngram)
    assert list(again.text.values()) == [reference.text[r.request_id] for r in cut[:3]]


def test_tiny_logprobs_of_accepted_drafts_are_those_without_drafts(tiny_gguf):
    requests = [
        ask("g", "abc abc abc abc", temperature=0, max_tokens=40),
        ask("s", "abc abc abc abc", temperature=0.8, seed=5, max_tokens=40),
    ]
    requests[0].logprobs, requests[1].logprobs = 3, 0
    reference = _served(tiny_gguf, requests)
    drafted = _served(tiny_gguf, requests, {"mode": "ngram", "adaptive": False})
    assert _counts(drafted)[1] > 0
    assert drafted.text == reference.text
    # A row decoded among a draft's rows rounds a little differently (~1e-8) from one
    # decoded alone; the tokens are the same.
    for rid, entries in reference.logprobs.items():
        assert len(drafted.logprobs[rid]) == len(entries) == 40
        for got, want in zip(drafted.logprobs[rid], entries, strict=True):
            assert (got.token, got.offset) == (want.token, want.offset)
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
            assert [t.token for t in got.top] == [t.token for t in want.top]


def test_tiny_grammar_penalties_and_bias_keep_the_text_with_drafts(tiny_gguf):
    # The grammar's repeats give n-gram drafts to accept; every drafted row is sampled
    # through the slot's whole chain, the grammar's check included.
    grammar = 'root ::= ("ab" [a-z] " ")+'
    params = [
        {"temperature": 0},
        {"temperature": 0.8, "seed": 9},
        {"temperature": 0.8, "seed": 4, "repeat_penalty": 1.3, "logit_bias": {300: 3.0}},
    ]
    requests = [
        ask(f"r{i}", "abc abc abc abc", max_tokens=48, grammar=grammar, **p)
        for i, p in enumerate(params)
    ]
    reference = _served(tiny_gguf, requests)
    drafted = _served(tiny_gguf, requests, {"mode": "ngram", "adaptive": False})
    assert drafted.text == reference.text
    assert all(t.startswith("ab") for t in drafted.text.values())
    assert _counts(drafted)[1] > 0


def test_tiny_draft_model_same_file_accepts_nearly_all(tiny_gguf):
    requests = _tiny_requests()
    reference = _served(tiny_gguf, requests)
    same = {"mode": "draft", "draft_model_path": str(tiny_gguf), "draft_max": 6, "draft_p_min": 0}
    same["adaptive"] = False  # the mechanics: draft every step
    drafted = _served(tiny_gguf, requests, same, concurrent=True)
    assert drafted.text == reference.text
    greedy = [r.usage for rid, r in drafted.results.items() if rid.startswith("g")]
    n_drafted = sum(u.drafted_tokens for u in greedy)
    n_accepted = sum(u.accepted_tokens for u in greedy)
    assert n_drafted > 50 and n_accepted >= 0.9 * n_drafted


def test_tiny_draft_model_with_other_weights_keeps_the_text(tiny_gguf, tmp_path):
    other = write_tiny_llama(tmp_path / "other.gguf", seed=7)
    requests = _tiny_requests()
    reference = _served(tiny_gguf, requests)
    draft = {"mode": "draft", "draft_model_path": str(other), "draft_max": 4, "draft_p_min": 0}
    drafted = _served(tiny_gguf, requests, draft, concurrent=True)
    assert drafted.text == reference.text
    assert _counts(drafted)[0] > 0


def test_smollm2_copy_is_the_same_with_ngram_drafts(smollm2_gguf):
    requests = copy_requests()
    reference = _served(smollm2_gguf, requests, n_ctx=1024, reset_each_request=True)
    ngram = {"mode": "ngram", "adaptive": False}
    alone_ = _served(smollm2_gguf, requests, ngram, n_ctx=1024)
    assert alone_.text == reference.text
    assert reference.text["c0"].endswith("polished the ")
    drafted, accepted = _counts(alone_)
    assert accepted >= 0.6 * drafted and accepted > 100
    # Together from empty sequences: with prefixes copied between slots, one of these
    # texts already differs without drafts (on main too), a determinism issue of its own.
    together_ = _served(
        smollm2_gguf, requests, ngram, n_ctx=1024, concurrent=True, reset_each_request=True
    )
    assert together_.text == reference.text


def test_smollm2_as_its_own_draft_accepts_nearly_all(smollm2_gguf):
    requests = [ask("g0", "Tell me about the sea.", temperature=0, max_tokens=48)]
    reference = _served(smollm2_gguf, requests, n_ctx=1024)
    same = {"mode": "draft", "draft_model_path": str(smollm2_gguf), "draft_max": 6}
    same["adaptive"] = False  # the mechanics: draft every step
    drafted = _served(smollm2_gguf, requests, same, n_ctx=1024)
    assert drafted.text == reference.text
    usage = drafted.results["g0"].usage
    assert usage.drafted_tokens > 20 and usage.accepted_tokens >= 0.9 * usage.drafted_tokens
