"""VRAM: the RAM/VRAM split of an estimate, and the per-GPU budget over recorded NVML readings."""

from __future__ import annotations

import os

import pytest
from fakegpu import FakeGpuReader
from fakepool import fake_pool
from prometheus_client.parser import text_string_to_metric_families
from tinymodel import N_CTX_TRAIN, N_LAYER

from llamapool import errors
from llamapool.config import parse_config
from llamapool.pool import status
from llamapool.pool.gguf_header import read_gguf
from llamapool.pool.lifecycle import ExitCause
from llamapool.pool.memory import MiB, estimate
from llamapool.pool.scheduler import Scheduler
from llamapool.pool.vram import CUDA_CONTEXT, device_shares, offload

GiB = 1 << 30


def _spec(path, gpus=None, **config):
    entry = {"id": "m", "config": {"model_path": str(path), **config}}
    if gpus is not None:
        entry["gpus"] = gpus
    return parse_config({"models": [entry]}).models["m"]


# -- the split -------------------------------------------------------------------


def test_the_header_gives_every_tensors_bytes(tiny_gguf):
    header = read_gguf(str(tiny_gguf))
    assert header.meta["llama.context_length"] == N_CTX_TRAIN
    layers = header.layer_bytes()
    assert sorted(layers) == list(range(N_LAYER))
    assert layers[0] == layers[1] > 0
    # Every byte after the header is some tensor's (the sizes come from the offsets).
    data = sum(header.tensors.values())
    assert os.path.getsize(tiny_gguf) - 64 * 1024 < data < os.path.getsize(tiny_gguf)
    assert header.output_bytes() == (
        header.tensors["output.weight"] + header.tensors["output_norm.weight"]
    )


def test_no_gpu_layers_or_no_gpu_leaves_everything_in_ram(tiny_gguf):
    cpu = estimate(_spec(tiny_gguf, n_gpu_layers=-1))
    assert cpu.vram == 0
    assert estimate(_spec(tiny_gguf, n_gpu_layers=0), gpu=True) == estimate(_spec(tiny_gguf))
    assert cpu == estimate(_spec(tiny_gguf))


def test_offloaded_layers_move_their_weights_and_kv_cache_to_vram(tiny_gguf):
    header = read_gguf(str(tiny_gguf))
    layer = header.layer_bytes()[N_LAYER - 1]
    output = header.output_bytes()
    cpu = estimate(_spec(tiny_gguf, n_ctx=1024, n_parallel=2))
    # n_gpu_layers 1 is the output layer alone: llama.cpp offloads from the end.
    first = estimate(_spec(tiny_gguf, n_ctx=1024, n_parallel=2, n_gpu_layers=1), gpu=True)
    assert first.weights == cpu.weights - output
    assert first.kv_cache == cpu.kv_cache
    assert first.overhead == cpu.overhead  # the logits handed back stay in RAM
    compute = first.vram - output - CUDA_CONTEXT
    assert 0 < compute < 16 * MiB  # tiny model: n_batch × (vocab + activations)
    # Then the repeating layers, last first, each with its share of the KV cache.
    two = estimate(_spec(tiny_gguf, n_ctx=1024, n_parallel=2, n_gpu_layers=2), gpu=True)
    assert two.weights == first.weights - layer
    assert two.kv_cache == cpu.kv_cache - cpu.kv_cache // N_LAYER
    assert two.vram == first.vram + layer + cpu.kv_cache // N_LAYER

    every = estimate(_spec(tiny_gguf, n_ctx=1024, n_parallel=2, n_gpu_layers=-1), gpu=True)
    assert every == estimate(
        _spec(tiny_gguf, n_ctx=1024, n_parallel=2, n_gpu_layers=N_LAYER + 5), gpu=True
    )
    assert every == estimate(
        _spec(tiny_gguf, n_ctx=1024, n_parallel=2, n_gpu_layers=N_LAYER + 1), gpu=True
    )
    assert every.kv_cache == 0
    # The token embeddings stay for the input; every layer and the output layer go.
    assert every.weights == cpu.weights - sum(header.layer_bytes().values()) - output
    assert every.vram == first.vram + sum(header.layer_bytes().values()) + cpu.kv_cache


def test_attention_scores_without_flash_attention_cost_vram(tiny_gguf):
    on = estimate(_spec(tiny_gguf, n_gpu_layers=-1, n_ctx=2048), gpu=True)
    off = estimate(_spec(tiny_gguf, n_gpu_layers=-1, n_ctx=2048, flash_attn="off"), gpu=True)
    assert off.vram - on.vram == 512 * 2048 * 4 * 4  # n_batch × n_ctx × heads × f32


def test_offload_without_layer_count_changes_nothing(tiny_gguf):
    header = read_gguf(str(tiny_gguf))
    empty = type(header)(meta={}, tensors={})
    fp = estimate(_spec(tiny_gguf))
    assert offload(fp, _spec(tiny_gguf, n_gpu_layers=-1).config, empty) == fp


def test_device_shares(tiny_gguf):
    cfg = _spec(tiny_gguf).config
    assert device_shares(cfg, 1, [0, 1]) == {1: 1.0}
    assert device_shares(cfg, None, [0, 1]) == {0: 0.5, 1: 0.5}
    assert device_shares(cfg, None, []) == {}
    assert device_shares(_spec(tiny_gguf, tensor_split=[3, 1]).config, None, [0, 1]) == {
        0: 0.75,
        1: 0.25,
    }
    assert device_shares(_spec(tiny_gguf, tensor_split=[0, 1]).config, None, [0, 1]) == {1: 1.0}
    none = _spec(tiny_gguf, split_mode="none", main_gpu=1).config
    assert device_shares(none, None, [0, 1]) == {1: 1.0}


# -- the budget ----------------------------------------------------------------------


def _gpu_pool(tiny_gguf, models, budget="1GiB", reader=None):
    reader = reader or FakeGpuReader()
    entries = [{"min_instances": 0, "config": {"n_gpu_layers": -1}, **m} for m in models]
    pool = fake_pool(tiny_gguf, models=entries, gpu=reader, gpu_memory_budget=budget)
    return pool, reader


def test_estimates_count_until_nvml_reports_the_process(tiny_gguf):
    pool, reader = _gpu_pool(tiny_gguf, [{"id": "m", "gpus": [1]}])
    fp = pool.sup.models["m"].footprint
    assert fp.vram > CUDA_CONTEXT and pool.sup.memory.vram.limits == {0: GiB, 1: GiB}
    pool.sup.ensure_capacity("m")
    w = pool.only()
    assert pool.sup.memory.vram_used() == {0: 0, 1: fp.vram}  # booting: its estimate
    reader.set_process(w.pid, {1: 700 * MiB})
    pool.ready(w)
    pool.tick(advance=5)  # a memory check reads the GPUs
    assert w.vram == {1: 700 * MiB}
    assert pool.sup.memory.vram_used() == {0: 0, 1: 700 * MiB}


def test_an_instance_that_sees_every_gpu_is_charged_on_each(tiny_gguf):
    pool, _ = _gpu_pool(tiny_gguf, [{"id": "m", "config": {"n_gpu_layers": -1}}])
    pool.sup.ensure_capacity("m")
    half = pool.sup.models["m"].footprint.vram // 2
    assert pool.sup.memory.vram_used() == {0: half, 1: half}


def test_vram_refusal_names_the_gpu_and_the_key(tiny_gguf):
    pool, reader = _gpu_pool(tiny_gguf, [{"id": "m", "gpus": [0]}])
    reader.set_free(0, 200 * MiB)  # another process holds the rest of GPU 0
    pool.sup.memory.vram.refresh()
    with pytest.raises(errors.InsufficientMemory) as exc:
        pool.sup.ensure_capacity("m")
    message = str(exc.value)
    assert "of VRAM on GPU 0" in message and "pool.gpu_memory_budget" in message
    assert "n_gpu_layers" in message
    assert pool.workers() == []


def test_a_full_gpu_evicts_an_idle_instance_on_that_gpu_only(tiny_gguf):
    models = [
        {"id": "a", "gpus": [0]},
        {"id": "other-gpu", "gpus": [1]},
        {"id": "b", "gpus": [0]},
    ]
    pool, reader = _gpu_pool(tiny_gguf, models)
    fp = pool.sup.models["a"].footprint
    # Room on GPU 0 for one instance, not two.
    pool.sup.memory.vram.limits = {0: fp.vram + fp.vram // 2, 1: GiB}
    for model_id in ("other-gpu", "a"):
        pool.sup.ensure_capacity(model_id)
        pool.ready(pool.only(model_id))
    pool.clock.advance(1)
    pool.only("a").last_used = pool.clock.now  # other-gpu is less recently used, but elsewhere
    pool.sup.ensure_capacity("b")
    assert pool.workers("b") == []  # waits for the eviction to drain
    (victim,) = [w for w in pool.sup.live_workers() if w.leaving]
    assert victim.model_id == "a" and victim.cause is ExitCause.EVICTED
    assert pool.sup.models["a"].evictions == 1
    pool.proc(victim).exit(0)
    pool.tick()
    assert [w.gpu for w in pool.workers("b")] == [0]
    assert len(pool.workers("other-gpu")) == 1


def test_a_failed_read_keeps_the_last_reading(tiny_gguf, caplog):
    pool, reader = _gpu_pool(tiny_gguf, [{"id": "m"}])
    reader.fail = True
    pool.tick(advance=5)
    pool.tick(advance=5)
    assert caplog.text.count("cannot read the GPUs") == 1
    assert pool.sup.memory.vram.devices == [0, 1]


def test_status_and_metrics_show_vram_per_worker_and_per_gpu(tiny_gguf):
    pool, reader = _gpu_pool(tiny_gguf, [{"id": "m", "gpus": [1]}])
    scheduler = Scheduler(pool.sup, lambda w, m: True)
    scheduler.add_model(pool.sup.models["m"].spec)
    pool.sup.ensure_capacity("m")
    w = pool.only()
    reader.set_process(w.pid, {1: 700 * MiB})
    pool.ready(w)
    pool.tick(advance=5)
    view = status.pool_status(pool.sup, scheduler, {})
    (shown,) = view["workers"]
    assert shown["gpu"] == 1 and shown["vram"] == {"1": 700 * MiB}
    gpu1 = view["gpus"][1]
    assert gpu1["name"] == "NVIDIA H200" and gpu1["budget"] == GiB
    assert gpu1["pool_used"] == 700 * MiB and gpu1["used"] == 512 * MiB + 700 * MiB
    assert view["models"][0]["estimate"]["vram"] == pool.sup.models["m"].footprint.vram

    pool.metrics.set_pool_source(lambda: status.metrics_snapshot(pool.sup, scheduler))
    pool.metrics.set_gpu_source(lambda: status.gpu_status(pool.sup))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(pool.metrics.render().decode())
        for s in family.samples
    }
    worker = (("gpu", "1"), ("model", "m"), ("worker", w.id))
    assert samples["llamapool_worker_vram_bytes", worker] == 700 * MiB
    assert samples["llamapool_gpu_memory_bytes", (("gpu", "1"), ("kind", "pool_used"))] == (
        700 * MiB
    )
    assert samples["llamapool_gpu_memory_bytes", (("gpu", "0"), ("kind", "total"))] == (
        143771 * MiB
    )


def test_without_a_gpu_there_is_no_vram_accounting(tiny_gguf):
    pool = fake_pool(tiny_gguf, models=[{"id": "m", "config": {"n_gpu_layers": -1}}])
    assert pool.sup.memory.vram is None
    assert pool.sup.models["m"].footprint.vram == 0
    scheduler = Scheduler(pool.sup, lambda w, m: True)
    scheduler.add_model(pool.sup.models["m"].spec)
    assert status.pool_status(pool.sup, scheduler, {})["gpus"] is None


def test_a_gpu_nvml_does_not_see_is_named(tiny_gguf):
    pool, _ = _gpu_pool(tiny_gguf, [{"id": "m", "gpus": [3]}])
    with pytest.raises(errors.InsufficientMemory, match=r"on GPU 3 \(gpus\), but NVML sees"):
        pool.sup.ensure_capacity("m")


def test_a_scale_beyond_a_gpus_budget_is_refused_up_front(tiny_gguf):
    pool, _ = _gpu_pool(tiny_gguf, [{"id": "m", "max_instances": 4, "gpus": [0, 1]}])
    fp = pool.sup.models["m"].footprint
    # Room for two instances on each GPU: four fit, placed 0, 1, 0, 1.
    pool.sup.memory.vram.limits = {0: 2 * fp.vram + fp.vram // 2, 1: 2 * fp.vram + fp.vram // 2}
    pool.sup.scale("m", 4)
    for _ in range(4):
        pool.sup.reconcile(pool.clock())
    assert sorted(w.gpu for w in pool.workers()) == [0, 0, 1, 1]
    pool.sup.scale("m", 2)  # the two still booting are killed
    pool.tick()
    assert sorted(w.gpu for w in pool.workers()) == [0, 1]
    # Another process now holds GPU 1 but for one and a half instances.
    pool.sup.memory.vram.limits = {0: 2 * fp.vram + fp.vram // 2, 1: fp.vram + fp.vram // 2}
    with pytest.raises(errors.InsufficientMemory, match=r"more VRAM on GPU 1 .* gpu_memory_budget"):
        pool.sup.scale("m", 4)  # the second one on GPU 1 would not fit
