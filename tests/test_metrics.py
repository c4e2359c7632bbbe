from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from llamapool.config import parse_config
from llamapool.ipc import protocol as P
from llamapool.pool.broker import Broker
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.lifecycle import ExitCause, ModelState
from llamapool.router.metrics import (
    MODEL_STATES,
    WORKER_STATES,
    Metrics,
    metrics_route,
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
    m.worker_restarted("tiny", ExitCause.HEARTBEAT)
    m.worker_restarted("tiny", ExitCause.HEARTBEAT)

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
        broker.supervisor.models["gone"].set_state(ModelState.READY, "as if it had served")
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


class _Exited:
    """A worker process that has already exited with `code` (its pid exists nowhere)."""

    pid = 2**22 + 12345
    node = node_available = reason = data = None  # the rest of launcher.ProcessHandle

    def __init__(self, code: int):
        self.code = code

    def poll(self) -> int:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        return self.code

    def signal_group(self, sig: int) -> None:
        pass

    def memory(self) -> None:
        return None


def _engine_fatal(broker, w, reason, kind):
    broker._on_data(w, P.Fatal(reason=reason, kind=kind))


def _control_fatal(broker, w, reason, kind):
    frames = [w.identity, *P.encode(P.Fatal(reason=reason, kind=kind))]
    broker._handle(frames)


@pytest.mark.parametrize(
    ("code", "report", "reason", "label"),
    [
        # A loader's message is not a protocol error...
        (78, "control:cannot_boot", "cannot load /m.gguf: unexpected end of file", "cannot_boot"),
        # ...nor is a model path with "socket" in it a socket error...
        (
            78,
            "control:cannot_boot",
            "cannot load /srv/socket-models/m.gguf: bad magic",
            "cannot_boot",
        ),
        # ...nor is a failed allocation in decode a max_worker_memory restart.
        (70, "data:engine_died", "engine thread died: RuntimeError('failed to allocate')", "fatal"),
        (70, "control:stalled", "engine made no progress for 3 s with 1 request(s)", "stall"),
        # The kind names the cause, whichever socket carried it.
        (70, "data:stalled", "engine made no progress for 3 s with 1 request(s)", "stall"),
        (70, "control:engine_died", "engine thread died: RuntimeError('x')", "fatal"),
        (79, None, "", "orphaned"),
        (-9, None, "", "signal"),
        (3, None, "", "exit_code"),
    ],
)
def test_restart_label_is_the_typed_cause(tiny_gguf, code, report, reason, label):
    config = parse_config({"models": [{"id": "m", "config": {"model_path": str(tiny_gguf)}}]})
    m = Metrics()
    broker = Broker(config, observer=m)
    try:
        w = WorkerHandle(
            id="m-1", model_id="m", process=_Exited(code), cores=[0], n_threads=1, started_at=0.0
        )
        broker.supervisor.workers[w.id] = w
        if report is not None:
            socket, kind = report.split(":")
            send = _engine_fatal if socket == "data" else _control_fatal
            send(broker, w, reason, P.FatalKind(kind))
        broker.supervisor.reap(0.0)
        assert value(m, "llamapool_worker_restarts_total", model="m", reason=label) == 1
    finally:
        asyncio.run(broker.stop(grace=0))


def test_prompt_cache_reuse_and_size():
    m = Metrics()
    m.prompt_reused("tiny", "ram", 120)
    m.prompt_reused("tiny", "ram", 30)
    m.prompt_reused("tiny", "none", 0)
    worker = {"worker": "w1", "state": "IDLE", "rss": 1, "pss": 1, "prompt_cache_bytes": 4096}
    m.set_pool_source(
        lambda: [{"model": "tiny", "queue_depth": 0, "state": "READY", "workers": [worker]}]
    )
    assert value(m, "llamapool_prompt_cache_requests_total", model="tiny", source="ram") == 2
    assert value(m, "llamapool_prompt_cache_requests_total", model="tiny", source="none") == 1
    assert value(m, "llamapool_prompt_cache_tokens_total", model="tiny", source="ram") == 150
    assert value(m, "llamapool_prompt_cache_tokens_total", model="tiny", source="none") is None
    assert value(m, "llamapool_prompt_cache_bytes", model="tiny", worker="w1") == 4096


def test_speculative_acceptance_counters():
    m = Metrics()
    m.speculated("smol", 40, 30)
    m.speculated("smol", 10, 2)
    assert value(m, "llamapool_draft_tokens_total", model="smol") == 50
    assert value(m, "llamapool_draft_accepted_tokens_total", model="smol") == 32
    assert value(m, "llamapool_draft_tokens_total", model="other") is None
