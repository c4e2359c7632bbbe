"""Logprobs, echo and token prompts in the batching engine, on real llama.cpp."""

from __future__ import annotations

import math

import numpy as np
import psutil
import pytest
from engineutil import alone

from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.batch import SCORED_ROWS, BatchEngine

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}  # the pick is the model's own argmax


def _engine(path, **config) -> BatchEngine:
    cfg = {"model_path": str(path), "n_ctx": 512, "n_threads": 1, "n_parallel": 2, **config}
    return BatchEngine(parse_config({"models": [{"id": "m", "config": cfg}]}).models["m"])


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    eng = _engine(tiny_gguf)
    yield eng
    eng.close()


def _completion(rid: str, prompt, *, logprobs=None, echo=False, **params) -> Request:
    return Request(
        request_id=rid,
        kind="completion",
        prompt=prompt,
        params=SamplingParams(**params),
        logprobs=logprobs,
        echo=echo,
    )


def _direct_prompt_logprobs(path, tokens: list[int]) -> list[float]:
    """log P(token i | tokens before it) for i >= 1, straight from llama-cpp-python.

    With flash attention, as the engine's context (`flash_attn: auto` on CPU): SmolLM2's
    logprobs move by up to 0.2 between flash attention on and off.
    """
    import llama_cpp

    llama = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_threads=1,
        logits_all=True,
        flash_attn=True,
        verbose=False,
    )
    llama.eval(tokens)
    scores = np.asarray(llama.scores[: len(tokens)], dtype=np.float64)
    peak = scores.max(axis=1, keepdims=True)
    logsoftmax = scores - peak - np.log(np.exp(scores - peak).sum(axis=1, keepdims=True))
    return [float(logsoftmax[i - 1, tokens[i]]) for i in range(1, len(tokens))]


def test_greedy_tokens_are_their_own_top_logprob(engine):
    req = Request(
        request_id="g",
        kind="chat",
        messages=[{"role": "user", "content": "hello"}],
        params=SamplingParams(max_tokens=8, **GREEDY),
        logprobs=3,
    )
    sink = alone(engine, [req])
    entries = sink.logprobs["g"]
    assert len(entries) == sink.results["g"].usage.completion_tokens == 8
    for e in entries:
        assert len(e.top) == 3
        assert e.top[0].token == e.token and e.top[0].logprob == pytest.approx(e.logprob)
        assert all(t.logprob <= 0 for t in e.top) and e.logprob <= 0
        assert [t.logprob for t in e.top] == sorted((t.logprob for t in e.top), reverse=True)
    assert b"".join(e.token for e in entries).decode() == sink.text["g"]


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_echoed_prompt_logprobs_match_llama_cpp(request, model):
    path = request.getfixturevalue("tiny_gguf" if model == "tiny" else "smollm2_gguf")
    prompt = "The capital of France is Paris, and the capital of Italy is Rome."
    engine = _engine(path)
    try:
        tokens = engine.llama.tokenize(prompt.encode(), add_bos=True, special=True)
        sink = alone(engine, [_completion("e", prompt, logprobs=2, echo=True, max_tokens=0)])
    finally:
        engine.close()
    entries = sink.logprobs["e"]
    assert sink.text["e"] == prompt
    assert sink.results["e"].usage.completion_tokens == 0
    assert sink.results["e"].finish_reason == "length"
    skip = 1 if tokens[0] == engine.preparer.vocab.bos else 0  # the BOS it added: not echoed
    assert len(entries) == len(tokens) - skip
    assert entries[0].logprob is None and entries[0].top == []  # nothing predicts it
    direct = _direct_prompt_logprobs(path, tokens)[skip:]
    got = [e.logprob for e in entries[1:]]
    assert np.max(np.abs(np.array(got) - np.array(direct))) < 1e-3
    assert [e.offset for e in entries] == sorted(e.offset for e in entries)


def test_a_token_prompt_is_echoed_as_given_bos_included(engine, tiny_gguf):
    tokens = engine.llama.tokenize(b"abc def", add_bos=True, special=True)
    assert tokens[0] == engine.preparer.vocab.bos
    sink = alone(engine, [_completion("i", tokens, logprobs=0, echo=True, max_tokens=0)])
    entries = sink.logprobs["i"]
    assert len(entries) == len(tokens) and entries[0].logprob is None
    direct = _direct_prompt_logprobs(tiny_gguf, tokens)
    assert [e.logprob for e in entries[1:]] == pytest.approx(direct, abs=1e-3)
    assert sink.text["i"] == b"".join(e.token for e in entries).decode()


@pytest.mark.parametrize("prompt", ["abc def", "  abc", ""])
def test_echoed_tokens_spell_the_echoed_text(engine, prompt):
    # The tiny model's tokenizer puts a space before a text prompt (SentencePiece's
    # prefix space), and "" is its BOS alone: neither is the client's text, so the
    # entries' tokens and offsets must not count them.
    req = _completion("t", prompt, logprobs=0, echo=True, max_tokens=2, **GREEDY)
    sink = alone(engine, [req])
    text, entries = sink.text["t"], sink.logprobs["t"]
    assert (
        text.startswith(prompt)
        and len(entries)
        == len(engine.llama.tokenize(prompt.encode(), add_bos=True, special=True)) - 1 + 2
    )
    assert "".join(e.token.decode() for e in entries) == text
    for e in entries:
        assert text[e.offset :].startswith(e.token.decode())


def test_echo_logprobs_of_a_prompt_split_over_steps(tiny_gguf):
    prompt = "abc def ghi jkl mno pqr stu vwx yz"
    scored = []
    for n_batch in (512, 5):  # the whole prompt in one step, or 5 tokens a step
        engine = _engine(tiny_gguf, n_batch=n_batch)
        try:
            sink = alone(engine, [_completion("e", prompt, logprobs=1, echo=True, max_tokens=0)])
        finally:
            engine.close()
        scored.append(sink.logprobs["e"])
    whole, split = scored
    assert [e.token for e in split] == [e.token for e in whole]
    assert split[0].logprob is None
    assert [e.logprob for e in split[1:]] == pytest.approx([e.logprob for e in whole[1:]], abs=1e-3)


def test_echo_scores_the_whole_prompt_even_when_it_is_cached(engine):
    prompt = "abc def ghi jkl mno pqr stu vwx yz " * 3
    fresh = alone(engine, [_completion("a", prompt, logprobs=0, echo=True, max_tokens=0)])
    cached = alone(
        engine,
        [
            _completion("warm", prompt, max_tokens=1),
            _completion("b", prompt, logprobs=0, echo=True, max_tokens=2, **GREEDY),
        ],
    )
    assert cached.results["b"].usage.cached_tokens == 0
    n = len(fresh.logprobs["a"])
    assert [e.logprob for e in cached.logprobs["b"][:n]] == pytest.approx(
        [e.logprob for e in fresh.logprobs["a"]], nan_ok=True
    )
    assert len(cached.logprobs["b"]) == n + 2
    assert cached.text["b"].startswith(prompt) and len(cached.text["b"]) > len(prompt)


def test_echo_without_logprobs_prepends_the_prompt(engine):
    sink = alone(engine, [_completion("e", "abc", echo=True, max_tokens=3, **GREEDY)])
    plain = alone(engine, [_completion("p", "abc", max_tokens=3, **GREEDY)])
    assert sink.text["e"] == "abc" + plain.text["p"]
    assert sink.logprobs["e"] == []


def test_completion_offsets_count_from_the_prompts_end(engine):
    sink = alone(engine, [_completion("c", "abc", logprobs=1, max_tokens=4, **GREEDY)])
    offsets = [e.offset for e in sink.logprobs["c"]]
    assert offsets[0] == len("abc")
    assert offsets == [3 + len(sink.text["c"][:i]) for i in range(4)]


def test_max_tokens_zero_evaluates_the_prompt_only(engine):
    sink = alone(engine, [_completion("z", "abc", max_tokens=0)])
    result = sink.results["z"]
    assert sink.text["z"] == "" and result.usage.completion_tokens == 0
    assert result.usage.prompt_tokens > 0 and result.finish_reason == "length"


def test_a_stop_sequence_drops_the_logprobs_of_what_it_cuts(engine):
    free = alone(engine, [_completion("f", "abc", logprobs=0, max_tokens=6, **GREEDY)])
    stop = free.text["f"][2:4]
    sink = alone(engine, [_completion("s", "abc", logprobs=0, max_tokens=6, stop=[stop], **GREEDY)])
    text = sink.text["s"]
    assert text == free.text["f"][: free.text["f"].find(stop)]
    assert b"".join(e.token for e in sink.logprobs["s"]).decode() == text


def test_logprob_values_are_a_distribution(engine):
    sink = alone(engine, [_completion("d", "abc", logprobs=5, max_tokens=1, **GREEDY)])
    (entry,) = sink.logprobs["d"]
    assert sum(math.exp(t.logprob) for t in entry.top) <= 1.0 + 1e-6


def test_a_scored_prompt_keeps_the_logits_buffer_small(smollm2_gguf):
    """Echo with logprobs needs every prompt row's logits; llama.cpp keeps an output
    buffer for the most rows one decode asked for, for good. Chunks of SCORED_ROWS keep
    it at 12 MiB on SmolLM2, where one 361-row decode grew it by 128 MiB."""
    engine = _engine(smollm2_gguf, n_ctx=1024, n_parallel=1)
    try:
        prompt = "The lighthouse keeper climbed the stairs at dusk. " * 40
        alone(engine, [_completion("warm", prompt, max_tokens=1)])  # the same prompt, plainly
        before = psutil.Process().memory_info().rss
        sink = alone(engine, [_completion("e", prompt, logprobs=1, echo=True, max_tokens=0)])
        grown = psutil.Process().memory_info().rss - before
        n_prompt = sink.results["e"].usage.prompt_tokens
    finally:
        engine.close()
    assert n_prompt > 300 > SCORED_ROWS
    assert len(sink.logprobs["e"]) >= n_prompt - 1
    assert grown < 48 * 2**20, f"grew {grown / 2**20:.0f} MiB"
