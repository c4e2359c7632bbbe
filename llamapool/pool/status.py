"""What the pool shows: /ready, /admin/pool, /v1/models and /metrics read these views.

Each is a function of the supervisor's and the scheduler's state, written once; the
broker hands them its parts and the config's broken models.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from llamapool.pool.handle import WorkerHandle
from llamapool.pool.lifecycle import ModelState
from llamapool.pool.scheduler import Scheduler
from llamapool.pool.supervisor import Supervisor


def ready(
    sup: Supervisor, scheduler: Scheduler, broken: Mapping[str, str]
) -> tuple[bool, dict[str, Any]]:
    """Whether every model has its min_instances up, with per-model detail."""
    detail: dict[str, Any] = {}
    ok = True
    for model_id, runtime in sup.models.items():
        workers = sup.workers_of(model_id)
        up = sum(1 for w in workers if w.ready)
        # An operator's unload is not unreadiness: the model asks for no instance then.
        unloaded = runtime.state is ModelState.UNLOADED
        want = 0 if unloaded else runtime.spec.min_instances
        model_ok = unloaded or (runtime.state is not ModelState.FAILED and up >= want)
        ok = ok and model_ok
        detail[model_id] = {
            "state": runtime.state.value,
            "instances_ready": up,
            "min_instances": want,
            "busy_instances": sum(1 for w in workers if w.in_flight),
            "queue_depth": scheduler.queue_depth(model_id),
            "reason": runtime.reason or runtime.memory_blocked,
        }
    for model_id, reason in broken.items():
        ok = False
        detail[model_id] = {"state": ModelState.FAILED.value, "reason": reason}
    return ok, detail


def worker_status(sup: Supervisor, w: WorkerHandle) -> dict[str, Any]:
    """One worker for /admin/pool: its state, load, memory and recent history."""
    at, state, reason = w.history[-1] if w.history else (None, w.state.value, "")
    runtime = sup.models.get(w.model_id) or sup.removed.get(w.model_id)
    return {
        "id": w.id,
        "model": w.model_id,
        "pid": w.pid,
        "state": w.state.value,
        "node": w.process.node,  # a Ray node id; null: the router's machine
        # Picked on its node where it runs elsewhere (the host actor's choice).
        "cores": getattr(w.process, "cores", None) if w.process.node else w.cores,
        "n_threads": w.n_threads,
        # Elastic threads: where it runs now (as it confirmed), lent or borrowing, and why.
        "elastic": _elastic(sup.cores.view(w.id), w),
        "rss": w.memory.rss if w.memory else None,
        "pss": w.memory.pss if w.memory else None,
        "gpu": w.gpu,
        "vram": _by_gpu(w.vram),
        "uptime_s": round(time.monotonic() - w.started_at, 3),
        "served": w.served,
        "capacity": w.capacity,
        "restarts": runtime.restarts if runtime else 0,
        "in_flight": list(w.in_flight),
        "prompt_cache": {"bytes": w.cache_bytes, "entries": w.cache_entries},
        "last_transition": {"state": state, "reason": reason, "at": at},
        "history": [{"at": a, "state": st, "reason": r} for a, st, r in w.history],
    }


def _elastic(view: dict | None, w: WorkerHandle) -> dict | None:
    """The ledger's view of a worker's cores, with the threads its decodes run as its last
    heartbeat said: fewer than `n_threads` when widened decodes were slower than at home."""
    if view is not None and w.decode_threads:
        view["decode_threads"] = w.decode_threads
    return view


def model_status(sup: Supervisor, scheduler: Scheduler, model_id: str) -> dict[str, Any]:
    """One model for /admin/pool and the admin commands' replies."""
    runtime = sup.models[model_id]
    workers = sup.workers_of(model_id)
    serving = sup.serving(model_id)
    queue = scheduler.queues[model_id].jobs
    fp = runtime.footprint
    return {
        "id": model_id,
        "state": runtime.state.value,
        "instances": {
            "wanted": runtime.target,
            "live": len(serving),
            "ready": len([w for w in workers if w.ready]),
            "min": runtime.spec.min_instances,
            "max": runtime.spec.instance_limit,
        },
        "queue_depth": len(queue),
        "oldest_wait_s": round(time.monotonic() - queue[0].enqueued_at, 3) if queue else 0.0,
        "last_error": runtime.reason or runtime.memory_blocked,
        "restarts": runtime.restarts,
        "evictions": runtime.evictions,
        "estimate": (
            {
                "weights": fp.weights,
                "per_instance": fp.per_instance,
                "vram": fp.vram,
                "prompt_cache": fp.prompt_cache,
            }
            if fp
            else None
        ),
    }


def _by_gpu(values: dict[int, int] | None) -> dict[str, int] | None:
    # JSON keys are strings; say so here rather than let the encoder do it silently.
    return {str(d): n for d, n in sorted(values.items())} if values is not None else None


def gpu_status(sup: Supervisor) -> list[dict[str, Any]] | None:
    """Each GPU for /admin/pool and /metrics: NVML's last reading, the budget and the pool's
    share; None without VRAM accounting (no NVIDIA GPU or no nvidia-ml-py)."""
    vram = sup.memory.vram
    if vram is None:
        return None
    used = sup.memory.vram_used()
    return [
        {
            "index": d.index,
            "name": d.name,
            "total": d.total,
            "used": d.used,
            "free": d.free,
            "budget": vram.limits.get(d.index),
            "pool_used": used.get(d.index, 0),
        }
        for d in vram.reading.devices
    ]


def pool_status(sup: Supervisor, scheduler: Scheduler, broken: Mapping[str, str]) -> dict[str, Any]:
    """The whole pool, for GET /admin/pool."""
    models = [model_status(sup, scheduler, m) for m in sup.models]
    models += [{"id": m, "state": "FAILED", "last_error": reason} for m, reason in broken.items()]
    return {
        "models": models,
        "workers": [worker_status(sup, w) for w in sup.live_workers()],
        "memory": {
            "budget": sup.memory.limit,
            "used": sup.memory.used(),
            "router": sup.memory.router.charge if sup.memory.router else None,
        },
        "gpus": gpu_status(sup),
        "nodes": node_status(sup),
    }


def node_status(sup: Supervisor) -> list[dict[str, Any]] | None:
    """Per Ray node: its workers, their memory, its available memory as last sampled there;
    None when every worker runs on this machine."""
    nodes: dict[str, dict[str, Any]] = {}
    for w in sup.live_workers():
        node = w.process.node
        if node is None:
            continue
        view = nodes.setdefault(node, {"node": node, "workers": [], "used": 0, "available": None})
        view["workers"].append(w.id)
        view["used"] += w.memory.charge if w.memory else 0
        if w.process.node_available is not None:
            view["available"] = w.process.node_available
    return list(nodes.values()) or None


def metrics_snapshot(sup: Supervisor, scheduler: Scheduler) -> list[dict[str, Any]]:
    """Gauges for /metrics: per model its queue and state, per worker its state and memory."""
    out = []
    for model_id, runtime in sup.models.items():
        workers = [
            {
                "worker": w.id,
                "state": w.state.value,
                "rss": w.memory.rss if w.memory else None,
                "pss": w.memory.pss if w.memory else None,
                "gpu": w.gpu,
                "vram": w.vram,
                "prompt_cache_bytes": w.cache_bytes,
            }
            for w in sup.workers_of(model_id)
        ]
        out.append(
            {
                "model": model_id,
                "queue_depth": scheduler.queue_depth(model_id),
                "state": runtime.state.value,  # the state /ready shows
                "workers": workers,
            }
        )
    return out
