"""Memory budgets with real workers: eviction of idle models, refusals, per-worker limits."""

from __future__ import annotations

import re

from serverutil import chat, model_entry

from llamapool.config import parse_config
from llamapool.pool.memory import MiB, estimate


def _entry(model_id, path, **kw):
    # No RAM prompt cache: its limit counts in the estimate but not in a fresh worker's PSS,
    # and these budgets are sized from the estimate as if it were what a worker uses.
    config = {"n_ctx": 8192, "prompt_cache_bytes": 0}
    return model_entry(model_id, path, min_instances=0, config=config, **kw)


def test_second_model_evicts_the_idle_first(serve, smollm2_gguf):
    models = [_entry("a", smollm2_gguf), _entry("b", smollm2_gguf)]
    cost = estimate(parse_config({"models": models}).models["a"]).cost(0)
    # Room for one instance and 150 MiB: B fits beside the router (~50 MiB) once A is
    # gone, never beside A, whose KV cache and buffers alone take ~240 MiB. A's weights
    # do not count on it: their pages are shared with every process that maps the same
    # GGUF (another pool on this host), which splits A's PSS.
    budget = cost + 150 * MiB
    server = serve(models, pool={"memory_budget": budget})
    assert server.workers() == []  # min_instances 0: nothing runs until asked

    r = chat(server.url, "a")
    assert r.status_code == 200
    (worker_a,) = server.workers()
    r = chat(server.url, "b")
    assert r.status_code == 200, r.text
    assert "b-" in r.headers["x-llamapool-worker"]
    workers = server.workers()
    assert [w.pid for w in workers] != [worker_a.pid] and len(workers) == 1
    log = server.log_text()
    assert "evicted (idle, least recently used) to make room for b" in log
    assert server.model_ready("a")["instances_ready"] == 0
    assert server.model_ready("b")["instances_ready"] == 1


def test_budget_too_small_for_any_model_is_503(serve, smollm2_gguf):
    server = serve([_entry("a", smollm2_gguf)], pool={"memory_budget": "64MiB"})
    r = chat(server.url, "a")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory"
    assert "MiB" in err["message"] and "memory_budget" in err["message"]
    assert r.headers["retry-after"]
    assert server.workers() == []


def test_worker_over_its_limit_is_restarted(serve, tiny_gguf):
    server = serve(
        [model_entry("m", tiny_gguf)],
        pool={"max_worker_memory": "8MiB", "memory_check_interval": 0.1},
    )
    # The first worker's pid from the log: by the time the test looks, the over-limit
    # worker may already be draining next to its replacement.
    first = int(re.search(r"spawned pid (\d+)", server.log_text()).group(1))
    server.wait_for(
        lambda: [w for w in server.workers() if w.pid != first], what="a replacement worker"
    )
    assert "above max_worker_memory 8 MiB for 3 readings in a row" in server.log_text()
    server.ready()
    assert chat(server.url, "m").status_code == 200
