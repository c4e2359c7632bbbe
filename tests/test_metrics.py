from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llamapool.config import parse_config
from llamapool.pool.broker import Broker
from llamapool.pool.supervisor import ModelState
from llamapool.router.metrics import (
    MODEL_STATES,
    WORKER_STATES,
    Metrics,
    metrics_route,
    restart_reason_category,
)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, parsed back with prometheus-client's own parser."""
    text = metrics.render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_counters_move_as_events_happen():
    m = Metrics()
    m.request_finished("tiny", 200, None)
    m.request_finished("tiny", 200, None)
    m.request_finished("tiny", 503, "queue_full")
    m.rejected("tiny", "queue_full")
    m.rejected("tiny", "queue_timeout")
    m.rejected("tiny", "queue_timeout")
    m.tokens_generated("tiny", 5)
    m.tokens_generated("tiny", 7)
    m.tokens_generated("tiny", 0)
    m.evicted("big")
    m.worker_restarted("tiny", "killed by SIGKILL: missed heartbeats for 6.0 s while BUSY")
    m.worker_restarted("tiny", "heartbeat")

    assert value(m, "llamapool_requests_total", model="tiny", status="200", code="") == 2
    assert value(m, "llamapool_requests_total", model="tiny", status="503", code="queue_full") == 1
    assert value(m, "llamapool_rejected_requests_total", model="tiny", reason="queue_full") == 1
    assert value(m, "llamapool_rejected_requests_total", model="tiny", reason="queue_timeout") == 2
    assert value(m, "llamapool_generated_tokens_total", model="tiny") == 12
    assert value(m, "llamapool_evictions_total", model="big") == 1
    assert value(m, "llamapool_worker_restarts_total", model="tiny", reason="heartbeat") == 2


def test_histograms_observe():
    m = Metrics()
    m.queue_wait("tiny", 0.02)
    m.queue_wait("tiny", 3.0)
    m.time_to_first_token("tiny", 0.3)
    m.generation_finished("tiny", tokens=100, seconds=2.0)  # 50 tok/s
    m.generation_finished("tiny", tokens=0, seconds=1.0)  # nothing generated: no rate
    m.generation_finished("tiny", tokens=5, seconds=0.0)  # no duration: no rate

    assert value(m, "llamapool_queue_wait_seconds_count", model="tiny") == 2
    assert value(m, "llamapool_queue_wait_seconds_sum", model="tiny") == pytest.approx(3.02)
    assert value(m, "llamapool_queue_wait_seconds_bucket", model="tiny", le="0.025") == 1
    assert value(m, "llamapool_queue_wait_seconds_bucket", model="tiny", le="+Inf") == 2
    assert value(m, "llamapool_time_to_first_token_seconds_count", model="tiny") == 1
    assert value(m, "llamapool_tokens_per_second_count", model="tiny") == 1
    assert value(m, "llamapool_tokens_per_second_sum", model="tiny") == 50
    assert value(m, "llamapool_tokens_per_second_bucket", model="tiny", le="20.0") == 0
    assert value(m, "llamapool_tokens_per_second_bucket", model="tiny", le="50.0") == 1
    # generation_finished leaves the token counter to tokens_generated.
    assert value(m, "llamapool_generated_tokens_total", model="tiny") is None


def test_instances_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.evicted("tiny")
    assert value(a, "llamapool_evictions_total", model="tiny") == 1
    assert value(b, "llamapool_evictions_total", model="tiny") is None


def test_collector_reflects_the_pool_snapshot():
    pool = [
        {
            "model": "tiny",
            "queue_depth": 3,
            "state": "READY",
            "workers": [
                {"worker": "w1", "state": "BUSY", "rss": 1000, "pss": 600},
                {"worker": "w2", "state": "STARTING", "rss": None, "pss": None},
            ],
        },
        {"model": "broken", "queue_depth": 0, "state": "FAILED", "workers": []},
    ]
    m = Metrics()
    m.set_pool_source(lambda: pool)
    s = samples(m)

    assert s[("llamapool_queue_depth", frozenset({"model": "tiny"}.items()))] == 3
    assert s[("llamapool_queue_depth", frozenset({"model": "broken"}.items()))] == 0
    for state in MODEL_STATES:
        labels = frozenset({"model": "broken", "state": state}.items())
        assert s[("llamapool_model_state", labels)] == (state == "FAILED")
    for state in WORKER_STATES:
        labels = frozenset({"model": "tiny", "worker": "w1", "state": state}.items())
        assert s[("llamapool_worker_state", labels)] == (state == "BUSY")
    assert value(m, "llamapool_worker_memory_bytes", model="tiny", worker="w1", kind="rss") == 1000
    assert value(m, "llamapool_worker_memory_bytes", model="tiny", worker="w1", kind="pss") == 600
    # Unknown memory is left out rather than reported as 0.
    assert value(m, "llamapool_worker_memory_bytes", model="tiny", worker="w2", kind="rss") is None

    # Read at every scrape: a change in the pool shows in the next one.
    pool[0]["queue_depth"] = 0
    pool[0]["workers"].pop()
    s = samples(m)
    assert s[("llamapool_queue_depth", frozenset({"model": "tiny"}.items()))] == 0
    assert not any(dict(labels).get("worker") == "w2" for _, labels in s)


def test_collector_without_source_or_with_a_broken_one_still_scrapes(caplog):
    m = Metrics()
    m.request_finished("tiny", 200, None)
    assert value(m, "llamapool_requests_total", model="tiny", status="200", code="") == 1

    def broken():
        raise RuntimeError("pool went away")

    m.set_pool_source(broken)
    assert value(m, "llamapool_requests_total", model="tiny", status="200", code="") == 1
    assert "cannot read the pool" in caplog.text


def test_unknown_state_is_reported_too():
    m = Metrics()
    m.set_pool_source(
        lambda: [{"model": "tiny", "queue_depth": 0, "state": "LOADING", "workers": []}]
    )
    assert value(m, "llamapool_model_state", model="tiny", state="LOADING") == 1
    assert value(m, "llamapool_model_state", model="tiny", state="READY") == 0


def test_metrics_route_serves_the_text_format():
    m = Metrics()
    m.request_finished("tiny", 404, "model_not_found")
    app = Starlette(routes=[metrics_route(m)])
    with TestClient(app) as client:
        r = client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"llamapool_requests", "llamapool_queue_wait_seconds"} <= names
        assert 'code="model_not_found"' in r.text
        assert client.post("/metrics").status_code == 405


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("killed by SIGKILL while BUSY", "killed"),
        ("killed by signal 99 while IDLE", "killed"),
        ("missed heartbeats for 1.2 s", "heartbeat"),
        ("killed by SIGKILL: missed heartbeats for 6.0 s while BUSY", "heartbeat"),
        ("exit 70 (fatal error): engine thread died: RuntimeError('x') while BUSY", "fatal"),
        ("exit 70 (fatal error): broken pipe in generation while BUSY", "fatal"),
        ("exit 3 while IDLE", "exit"),
        ("exit 78 (cannot boot): cannot load /m.gguf: bad magic", "boot"),
        ("killed by SIGKILL: did not boot within 120 s while STARTING", "boot"),
        ("killed by SIGKILL: protocol error: READY out of order while IDLE", "protocol"),
        ("killed by SIGKILL: protocol error: Chunk before READY while STARTING", "protocol"),
        ("killed by SIGKILL: unreachable on its socket while BUSY", "socket"),
        ("killed by SIGKILL: memory 3.1 GiB above max_worker_memory 2 GiB", "memory"),
        (
            "restart: memory 2.1 GiB above max_worker_memory 2.0 GiB for 3 readings in a row",
            "memory",
        ),
        ("exit 79 (lost the router) while IDLE", "orphaned"),
        ("something nobody foresaw", "other"),
        ("memory", "memory"),
        ("boot", "boot"),
        ("admin", "admin"),
    ],
)
def test_restart_reason_category(text, category):
    assert restart_reason_category(text) == category


def test_model_state_gauge_agrees_with_ready(tiny_gguf):
    # /metrics used the raw runtime state: READY (or STARTING) for a model /ready showed
    # as UNLOADED or STANDBY, and it knew neither state.
    config = parse_config(
        {
            "models": [
                {"id": "gone", "config": {"model_path": str(tiny_gguf)}},
                {"id": "lazy", "min_instances": 0, "config": {"model_path": str(tiny_gguf)}},
            ]
        }
    )
    broker = Broker(config)
    try:
        broker.supervisor.models["gone"].state = ModelState.READY  # as if it had served
        broker.supervisor.unload("gone", force=False)
        m = Metrics()
        m.set_pool_source(broker.metrics_snapshot)
        _, ready = broker.ready()
        assert ready["gone"]["state"] == "UNLOADED" and ready["lazy"]["state"] == "STANDBY"
        for model, shown in (("gone", "UNLOADED"), ("lazy", "STANDBY")):
            for state in MODEL_STATES:
                assert value(m, "llamapool_model_state", model=model, state=state) == (
                    state == shown
                ), (model, state)
    finally:
        asyncio.run(broker.stop(grace=0))
