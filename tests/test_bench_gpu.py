"""The GPU run's parts that need no GPU: the model writer, the commands, the comparisons."""

from __future__ import annotations

import argparse
import pathlib

import pytest

from benchmarks.gpu import run
from benchmarks.gpu.model import Shape, write_model
from llamapool.pool.gguf_header import read_gguf

SMALL = Shape(n_vocab=1000, n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256)


def test_the_random_model_has_the_shape_and_llama_cpp_loads_it(tmp_path):
    path = write_model(tmp_path / "m.gguf", SMALL)
    header = read_gguf(str(path))
    assert header.meta["llama.block_count"] == 2
    assert header.meta["tokenizer.ggml.tokens#count"] == SMALL.n_vocab
    assert "output.weight" not in header.tensors  # tied, as Llama-3.2-1B
    assert header.tensors["token_embd.weight"] == SMALL.n_vocab * SMALL.n_embd * 2  # f16

    import llama_cpp

    llama = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, verbose=False)
    out = llama.create_chat_completion(
        [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert out["usage"]["completion_tokens"] >= 1


def _args(tmp_path: pathlib.Path) -> argparse.Namespace:
    return argparse.Namespace(
        model=tmp_path / "m.gguf",
        llama_server=tmp_path / "llama-server",
        n_ctx=1024,
        n_gpu_layers=-1,
    )


def test_llama_server_gets_the_pools_context_per_slot(tmp_path):
    setup = run.Setup("llama-server-np64", "llama-server", 64)
    cmd = run.llama_server_command(_args(tmp_path), setup, 8123)
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[cmd.index("-np") + 1] == "64" and cmd[cmd.index("-c") + 1] == str(64 * 1024)
    assert cmd[cmd.index("-ngl") + 1] == "999" and "--no-kv-unified" in cmd
    assert flags["--port"] == "8123"
    config = run.pool_config(_args(tmp_path), run.Setup("pool-4x16", "pool", 16, instances=4))
    (model,) = config["models"]
    assert model["min_instances"] == model["max_instances"] == 4
    assert model["config"]["n_parallel"] == 16 and model["config"]["n_gpu_layers"] == -1


def test_comparisons_against_the_targets():
    def levels(**tok_s):
        return {"levels": {int(c[1:]): {"aggregate_tok_s": v} for c, v in tok_s.items()}}

    results = {
        "pool-np16": levels(c1=95.0, c16=1600.0) | {"vram": {"max_abs_error": 0.08}},
        "llama-server-np16": levels(c1=100.0, c16=1000.0),
        "pool-4x16": levels(c64=4000.0) | {"vram": {"max_abs_error": 0.12}},
    }
    out = run.compare(results)
    assert out["c16_vs_llama_server"] == pytest.approx(1.6)
    assert out["targets"]["c16_vs_llama_server"]["met"] is True
    assert out["targets"]["c1_vs_llama_server"]["met"] is True  # 0.95 exactly
    assert out["vram_within"] == pytest.approx(0.12)
    assert out["targets"]["vram_within"]["met"] is False
    assert out["c64_np64_vs_llama_server"] is None  # not measured: no verdict
    assert out["targets"]["vram_within"]["target"] == 0.10


def test_vram_check_falls_back_to_the_devices_growth():
    pool = {
        "models": [{"id": "bench", "estimate": {"vram": 1100}}],
        "workers": [
            {"id": "bench-1", "pid": 10, "gpu": None, "vram": {"0": 1000}},
            {"id": "bench-2", "pid": 11, "gpu": None, "vram": None},
        ],
        "gpus": None,
    }
    idle = {"devices": [{"index": 0, "used": 500}]}
    now = {"devices": [{"index": 0, "used": 2500}]}
    check = run.vram_check(pool, now, idle)
    assert [w["nvml"] for w in check["workers"]] == [1000, 1000]
    assert check["max_abs_error"] == pytest.approx(0.1)
