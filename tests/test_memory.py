"""Memory estimates from GGUF headers, PSS sampling, and the eviction / limit policies."""

from __future__ import annotations

import os

import pytest
from fakepool import fake_pool
from tinymodel import N_CTX_TRAIN, N_EMBD

from llamapool.config import ConfigError, parse_config
from llamapool.pool.batch import SCORED_ROWS
from llamapool.pool.launcher import NodeRoom
from llamapool.pool.lifecycle import ExitCause
from llamapool.pool.memory import (
    PROCESS_BASE,
    Candidate,
    GGUFError,
    MiB,
    OverLimit,
    Sample,
    choose_evictions,
    estimate,
    read_gguf_scalars,
    sample,
)


def _spec(path, **config):
    return parse_config(
        {"models": [{"id": "m", "config": {"model_path": str(path), **config}}]}
    ).models["m"]


def test_reads_the_header_of_the_tiny_model(tiny_gguf):
    meta = read_gguf_scalars(str(tiny_gguf))
    assert meta["general.architecture"] == "llama"
    assert meta["llama.embedding_length"] == N_EMBD
    assert meta["llama.context_length"] == N_CTX_TRAIN
    assert "tokenizer.ggml.tokens" not in meta  # arrays are skipped


def test_smollm2_estimate_matches_its_shape(smollm2_gguf):
    fp = estimate(_spec(smollm2_gguf, n_ctx=4096))
    # 30 layers, 3 KV heads of 64 dims, f16 K and V.
    assert fp.kv_cache == 4096 * 30 * 3 * (64 + 64) * 2
    assert fp.weights == os.path.getsize(smollm2_gguf)
    assert fp.cost(0) == fp.weights + fp.per_instance
    assert fp.cost(1) == fp.per_instance  # mmap'ed weights are shared
    # The compute graph is reserved for a full batch of logits: n_batch × n_vocab floats.
    assert read_gguf_scalars(str(smollm2_gguf))["tokenizer.ggml.tokens#count"] == 49152
    small_batch = estimate(_spec(smollm2_gguf, n_ctx=4096, n_batch=256))
    assert fp.overhead - small_batch.overhead == 256 * 49152 * 4
    # Each parallel request gets its own n_ctx cells.
    assert estimate(_spec(smollm2_gguf, n_ctx=4096, n_parallel=4)).kv_cache == 4 * fp.kv_cache


def test_the_estimate_counts_the_logits_output_buffer(smollm2_gguf):
    """llama.cpp keeps the logits of the most rows one decode asked for: a scored prompt's
    chunk (SCORED_ROWS), or every slot's token and drafts when speculation is on."""
    vocab = 49152 * 4
    plain = estimate(_spec(smollm2_gguf, n_ctx=1024, n_parallel=16))
    weights = os.path.getsize(smollm2_gguf)
    assert plain.overhead == PROCESS_BASE + weights // 20 + 512 * vocab + SCORED_ROWS * vocab
    drafting = {"mode": "ngram", "draft_max": 16}
    spec = estimate(_spec(smollm2_gguf, n_ctx=1024, n_parallel=16, speculative=drafting))
    assert spec.overhead - plain.overhead == (16 * 17 - SCORED_ROWS) * vocab
    capped = estimate(_spec(smollm2_gguf, n_ctx=1024, n_parallel=64, speculative=drafting))
    assert capped.overhead - plain.overhead == (512 - SCORED_ROWS) * vocab  # n_batch at most


def test_a_draft_model_counts_its_weights_cache_and_buffers(smollm2_gguf):
    plain = estimate(_spec(smollm2_gguf, n_ctx=1024, n_parallel=2))
    draft = {"mode": "draft", "draft_model_path": str(smollm2_gguf)}
    both = estimate(_spec(smollm2_gguf, n_ctx=1024, n_parallel=2, speculative=draft))
    # The same file as its own draft: twice the weights, the KV cache and the logits.
    assert both.weights == 2 * plain.weights
    assert both.kv_cache == 2 * plain.kv_cache
    assert both.overhead - plain.overhead == plain.weights // 20 + 512 * 49152 * 4
    ngram = estimate(_spec(smollm2_gguf, n_ctx=1024, n_parallel=2, speculative={"mode": "ngram"}))
    assert ngram == plain


def test_without_mmap_every_instance_pays_for_the_weights(smollm2_gguf):
    fp = estimate(_spec(smollm2_gguf, n_ctx=512, use_mmap=False))
    assert fp.cost(0) == fp.cost(3) == fp.per_instance > fp.weights


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope" * 10)
    with pytest.raises(GGUFError, match="magic"):
        read_gguf_scalars(str(bad))
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_scalars(str(truncated))


def test_sample_of_this_process():
    s = sample(os.getpid())
    assert s.rss > 10 * MiB
    assert s.pss is not None and 0 < s.pss <= s.rss
    assert s.charge == s.pss
    assert sample(2**22 + 12345) is None


def test_evictions_pick_least_recently_used_until_enough():
    cands = [
        Candidate("a", "m1", 100, last_used=5.0),
        Candidate("b", "m2", 100, last_used=1.0),
        Candidate("c", "m3", 100, last_used=3.0),
    ]
    assert [c.worker_id for c in choose_evictions(cands, 150)] == ["b", "c"]
    assert [c.worker_id for c in choose_evictions(cands, 1)] == ["b"]
    assert choose_evictions(cands, 301) is None
    assert choose_evictions([], 0) == []


def test_over_limit_needs_consecutive_readings():
    ol = OverLimit(limit=100, readings=3)
    assert not ol.observe("w", 150)
    assert not ol.observe("w", 150)
    assert not ol.observe("w", 50)  # a good reading resets the count
    assert not ol.observe("w", 150)
    assert not ol.observe("w", 150)
    assert ol.observe("w", 150)
    assert not OverLimit(limit=None).observe("w", 10**12)


def test_bad_budget_is_a_config_error(tiny_gguf):
    with pytest.raises(ConfigError, match="pool.memory_budget"):
        parse_config(
            {
                "pool": {"memory_budget": "lots"},
                "models": [{"id": "m", "config": {"model_path": str(tiny_gguf)}}],
            }
        )


def test_budget_counts_the_router_measured_workers_and_estimates_for_booting_ones(tiny_gguf):
    pool = fake_pool(tiny_gguf, models=[{"id": "m", "min_instances": 2, "max_instances": 2}])
    budget = pool.sup.memory
    fp = pool.sup.models["m"].footprint
    pool.tick()
    pool.tick()  # one spawn per model per tick
    first, second = pool.workers()
    budget.router = Sample(rss=100 * MiB, pss=70 * MiB)
    # Booting: the first pays for the shared weights, the second only for itself.
    assert budget.used() == 70 * MiB + fp.cost(0) + fp.cost(1)
    pool.proc(first).sample = Sample(rss=40 * MiB, pss=30 * MiB)
    pool.ready(first)
    assert budget.used() == 70 * MiB + 30 * MiB + fp.cost(1)
    pool.sup.kill(second, ExitCause.PROTOCOL, "test")
    pool.tick()  # reaped: nothing is charged for it any more (its replacement boots)
    assert budget.used() == 70 * MiB + 30 * MiB + fp.cost(1)
    assert len(pool.launcher.started) == 3


def test_evictions_for_vram_free_only_what_lacks():
    cands = [
        Candidate("gpu1", "m1", 100, last_used=1.0, vram={1: 500}),
        Candidate("gpu0-old", "m2", 100, last_used=2.0, vram={0: 300}),
        Candidate("gpu0-new", "m3", 100, last_used=3.0, vram={0: 300}),
    ]
    # RAM is fine; GPU 0 lacks 400: the instance on GPU 1 is spared, though least recent.
    chosen = choose_evictions(cands, 0, {0: 400})
    assert [c.worker_id for c in chosen] == ["gpu0-old", "gpu0-new"]
    assert choose_evictions(cands, 0, {0: 700}) is None
    assert [c.worker_id for c in choose_evictions(cands, 150, {0: 1})] == ["gpu1", "gpu0-old"]
    assert choose_evictions(cands, -5, {0: 0}) == []


def test_on_several_nodes_each_node_has_its_own_budget(tiny_gguf):
    # A launcher that places workers on several machines offers nodes, best first; the
    # budget (here 50% of what each node offers) takes the first with room, per node.
    models = [{"id": "m", "min_instances": 2, "max_instances": 3}]
    pool = fake_pool(tiny_gguf, models=models, memory_budget="50%")
    fp = pool.sup.models["m"].footprint
    small = 2 * fp.cost(0) - 2  # half of it: a byte short of the first instance
    pool.launcher.rooms = [NodeRoom("n1", small, None), NodeRoom("n2", 4 * fp.cost(0), None)]
    pool.tick()
    pool.tick()
    assert [pool.proc(w).node for w in pool.workers()] == ["n2", "n2"]
    assert pool.sup.memory.node_used("n2") == fp.cost(0) + fp.cost(1)
    assert pool.sup.memory.node_used("n1") == 0

    # A node's own available memory bounds it too.
    pool.launcher.rooms = [NodeRoom("n3", 1 << 40, available=fp.cost(0) - 1)]
    pool.sup.scale("m", 3)
    pool.tick()
    assert len(pool.workers()) == 2
    blocked = pool.sup.models["m"].memory_blocked
    assert "no node has that much of its memory budget free (n3 " in blocked


def test_on_several_nodes_evictions_happen_on_the_node_that_lacks(tiny_gguf):
    models = [{"id": "a", "min_instances": 0}, {"id": "b", "min_instances": 0}]
    pool = fake_pool(tiny_gguf, models=models, memory_budget="50%")
    fp = pool.sup.models["a"].footprint
    pool.launcher.rooms = [NodeRoom("n1", 2 * fp.cost(0), None)]  # room for one instance
    pool.sup.want_instance("a")
    pool.tick()
    (a,) = pool.workers("a")
    pool.proc(a).sample = Sample(rss=fp.cost(0), pss=fp.cost(0))
    pool.ready(a)  # measured: all of n1's budget
    pool.sup.want_instance("b")
    pool.tick()
    assert a.state.value == "DRAINING" and not pool.workers("b")  # evicted on n1 for b
    pool.proc(a).exit(0)
    pool.tick()
    pool.tick()
    (b,) = pool.workers("b")
    assert pool.proc(b).node == "n1"
