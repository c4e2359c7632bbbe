"""The pool's status views (/ready, /admin/pool, /metrics) over fake processes."""

from __future__ import annotations

from fakepool import fake_pool

from llamapool.pool import status
from llamapool.pool.lifecycle import ExitCause
from llamapool.pool.scheduler import Scheduler


def _scheduled(pool):
    scheduler = Scheduler(pool.sup, lambda w, m: True)
    for runtime in pool.sup.models.values():
        scheduler.add_model(runtime.spec)
    return scheduler


def test_views_show_one_state_per_model(tiny_gguf):
    models = [{"id": "m"}, {"id": "off"}, {"id": "lazy", "min_instances": 0}]
    pool = fake_pool(tiny_gguf, models=models)
    scheduler = _scheduled(pool)
    pool.tick()
    pool.tick()
    for w in pool.workers("m") + pool.workers("off"):
        pool.ready(w)
    pool.sup.unload("off", force=True)
    broken = {"bad": "model 'bad': config.model_path: /x.gguf: file not found"}

    ok, detail = status.ready(pool.sup, scheduler, broken)
    assert not ok  # the broken model holds /ready at 503; the unloaded one does not
    assert {m: d["state"] for m, d in detail.items()} == {
        "m": "READY",
        "off": "UNLOADED",
        "lazy": "STANDBY",
        "bad": "FAILED",
    }
    assert detail["off"]["min_instances"] == 0
    snapshot = status.metrics_snapshot(pool.sup, scheduler)
    assert {s["model"]: s["state"] for s in snapshot} == {
        m: d["state"] for m, d in detail.items() if m != "bad"
    }
    ok, _ = status.ready(pool.sup, scheduler, {})
    assert ok

    (w,) = pool.workers("m")
    pool.sup.kill(w, ExitCause.HEARTBEAT, "missed heartbeats for 6.0 s")
    view = status.pool_status(pool.sup, scheduler, broken)
    (shown,) = [x for x in view["workers"] if x["id"] == w.id]
    assert shown["state"] == "KILLING"
    assert shown["last_transition"]["reason"] == "missed heartbeats for 6.0 s"
    assert [h["state"] for h in shown["history"]] == ["STARTING", "IDLE", "KILLING"]
    assert view["models"][-1] == {"id": "bad", "state": "FAILED", "last_error": broken["bad"]}


def test_workers_on_other_nodes_are_shown_per_node(tiny_gguf):
    pool = fake_pool(tiny_gguf, models=[{"id": "m", "min_instances": 3}])
    scheduler = _scheduled(pool)
    while len(pool.workers("m")) < 3:
        pool.tick()
    assert status.pool_status(pool.sup, scheduler, {})["nodes"] is None  # all on this machine
    a, b, c = pool.workers("m")
    for w, node, available in ((a, "n1", 5 << 30), (b, "n1", 4 << 30), (c, "n2", None)):
        pool.proc(w).node, pool.proc(w).node_available = node, available
        pool.ready(w)
    view = status.pool_status(pool.sup, scheduler, {})
    assert [x["node"] for x in view["workers"]] == ["n1", "n1", "n2"]
    assert view["nodes"] == [
        {"node": "n1", "workers": [a.id, b.id], "used": 2 << 20, "available": 4 << 30},
        {"node": "n2", "workers": [c.id], "used": 1 << 20, "available": None},
    ]
