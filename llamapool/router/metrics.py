"""Prometheus metrics: counters and histograms fed by the router, gauges read from the pool.

Each `Metrics` owns its own `CollectorRegistry`, so several apps in one process (tests) never
share or collide on metric names. Label values for `model` should be configured model ids
only (map unknown ids to one fixed value before calling), or a client could grow the label
set without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import NotRequired, TypedDict

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llamapool.pool.events import PoolObserver
from llamapool.pool.lifecycle import ExitCause, ModelState, WorkerState

log = logging.getLogger("llamapool.metrics")

MODEL_STATES = tuple(s.value for s in ModelState)
WORKER_STATES = tuple(s.value for s in WorkerState)

# Waits span sub-millisecond dispatch to the 60 s default queue timeout.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# From a CPU box with a big model (a few tok/s) to a GPU with a tiny one (thousands).
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class _WorkerBase(TypedDict):
    worker: str
    state: str
    rss: int | None
    pss: int | None
    prompt_cache_bytes: NotRequired[int]


class WorkerSnapshot(_WorkerBase, total=False):
    """One worker as the pool reports it at scrape time (VRAM only where NVML reports it)."""

    gpu: int | None
    vram: dict[int, int] | None


class GpuSnapshot(TypedDict):
    """One GPU at scrape time: NVML's reading, the pool's budget and the pool's share."""

    index: int
    name: str
    total: int
    used: int
    free: int
    budget: int | None
    pool_used: int


class ModelSnapshot(TypedDict):
    """One model and its workers as the pool reports it at scrape time."""

    model: str
    queue_depth: int
    state: str
    workers: list[WorkerSnapshot]


PoolSource = Callable[[], Iterable[ModelSnapshot]]
GpuSource = Callable[[], Iterable[GpuSnapshot]]
GPU_KINDS = ("total", "used", "free", "budget", "pool_used")


class _PoolCollector(Collector):
    """Gauges built at scrape time from a snapshot of the live pool."""

    def __init__(self) -> None:
        self.source: PoolSource | None = None
        self.gpu_source: GpuSource | None = None

    def describe(self) -> Iterable[Metric]:
        # Nothing to declare up front; returning [] also keeps the registry from
        # calling collect() (and the pool) at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            "llamapool_queue_depth", "Requests waiting in the model's queue.", labels=["model"]
        )
        model_state = GaugeMetricFamily(
            "llamapool_model_state",
            "1 for the model's current state, 0 for the others.",
            labels=["model", "state"],
        )
        worker_state = GaugeMetricFamily(
            "llamapool_worker_state",
            "1 for the worker's current state, 0 for the others.",
            labels=["model", "worker", "state"],
        )
        memory = GaugeMetricFamily(
            "llamapool_worker_memory_bytes",
            "Worker memory as last sampled (PSS counts shared mmap'ed weights once).",
            labels=["model", "worker", "kind"],
        )
        vram = GaugeMetricFamily(
            "llamapool_worker_vram_bytes",
            "Worker VRAM per GPU as NVML last reported it for the worker's process.",
            labels=["model", "worker", "gpu"],
        )
        gpu_memory = GaugeMetricFamily(
            "llamapool_gpu_memory_bytes",
            "Per GPU: total, used and free VRAM (NVML), the pool's budget, and what the "
            "pool's workers hold (pool_used).",
            labels=["gpu", "kind"],
        )
        cache = GaugeMetricFamily(
            "llamapool_prompt_cache_bytes",
            "Bytes of saved prompt states in the worker's RAM prompt cache.",
            labels=["model", "worker"],
        )
        try:
            snapshot = list(self.source()) if self.source is not None else []
            gpus = list(self.gpu_source()) if self.gpu_source is not None else []
        except Exception:
            # A broken snapshot must not turn the whole scrape into a 500: the
            # counters and histograms are still worth having.
            log.exception("cannot read the pool for /metrics")
            snapshot, gpus = [], []
        for g in gpus:
            for kind in GPU_KINDS:
                if g.get(kind) is not None:
                    gpu_memory.add_metric([str(g["index"]), kind], g[kind])
        for m in snapshot:
            model = m["model"]
            queue.add_metric([model], m["queue_depth"])
            for state in _states(MODEL_STATES, m["state"]):
                model_state.add_metric([model, state], 1.0 if state == m["state"] else 0.0)
            for w in m["workers"]:
                labels = [model, w["worker"]]
                for state in _states(WORKER_STATES, w["state"]):
                    worker_state.add_metric([*labels, state], 1.0 if state == w["state"] else 0.0)
                for kind in ("rss", "pss"):
                    value = w.get(kind)
                    if value is not None:
                        memory.add_metric([*labels, kind], value)
                for gpu, value in sorted((w.get("vram") or {}).items()):
                    vram.add_metric([*labels, str(gpu)], value)
                cache.add_metric(labels, w.get("prompt_cache_bytes", 0))
        yield from (queue, model_state, worker_state, memory, vram, gpu_memory, cache)


def _states(known: tuple[str, ...], current: str) -> tuple[str, ...]:
    return known if current in known else (*known, current)


class Metrics(PoolObserver):
    """The router's metrics; call the event methods as things happen, scrape `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "llamapool_requests",
            "Finished HTTP requests by model, status and error code ('' on success).",
            ["model", "status", "code"],
            registry=r,
        )
        self._rejected = Counter(
            "llamapool_rejected_requests",
            "Requests refused before reaching a worker, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self._queue_wait = Histogram(
            "llamapool_queue_wait_seconds",
            "Time from admission to dispatch to a worker.",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "llamapool_time_to_first_token_seconds",
            "Time from admission to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self._tokens = Counter(
            "llamapool_generated_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self._rate = Histogram(
            "llamapool_tokens_per_second",
            "Per-request decode rate (completion tokens / generation seconds).",
            ["model"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self._restarts = Counter(
            "llamapool_worker_restarts",
            "Worker restarts by cause: deaths, memory limits, admin requests "
            "(the values of ExitCause).",
            ["model", "reason"],
            registry=r,
        )
        self._evictions = Counter(
            "llamapool_evictions",
            "Idle instances stopped to make room for another model.",
            ["model"],
            registry=r,
        )
        self._reuse = Counter(
            "llamapool_prompt_cache_requests",
            "Finished requests by where their cached prompt tokens came from: slot, ram "
            "(the RAM prompt cache), shared (another slot), none (a miss).",
            ["model", "source"],
            registry=r,
        )
        self._reused_tokens = Counter(
            "llamapool_prompt_cache_tokens",
            "Prompt tokens reused instead of evaluated, by source.",
            ["model", "source"],
            registry=r,
        )
        self._drafted = Counter(
            "llamapool_draft_tokens",
            "Tokens drafted by speculative decoding (acceptance rate: "
            "rate(llamapool_draft_accepted_tokens_total) / rate(this)).",
            ["model"],
            registry=r,
        )
        self._accepted = Counter(
            "llamapool_draft_accepted_tokens",
            "Drafted tokens the model's own sampling produced too (each one a token saved).",
            ["model"],
            registry=r,
        )
        self._pool = _PoolCollector()
        r.register(self._pool)

    def set_pool_source(self, fn: PoolSource | None) -> None:
        """Read gauges from `fn()` at every scrape; it runs on the scraping thread."""
        self._pool.source = fn

    def set_gpu_source(self, fn: GpuSource | None) -> None:
        """Read per-GPU gauges from `fn()` at every scrape."""
        self._pool.gpu_source = fn

    def request_finished(self, model: str, status: int, code: str | None = None) -> None:
        """Count one finished request (`code` is the OpenAI error code, None on success)."""
        self._requests.labels(model, str(status), code or "").inc()

    def rejected(self, model: str, reason: str) -> None:
        """Count a request refused at admission (queue_full, queue_timeout, ...)."""
        self._rejected.labels(model, reason).inc()

    def queue_wait(self, model: str, seconds: float) -> None:
        """Observe how long a request waited in the queue before dispatch."""
        self._queue_wait.labels(model).observe(max(0.0, seconds))

    def time_to_first_token(self, model: str, seconds: float) -> None:
        """Observe the time to a request's first token."""
        self._ttft.labels(model).observe(max(0.0, seconds))

    def tokens_generated(self, model: str, n: int) -> None:
        """Add `n` generated tokens (call per chunk or once per request, not both)."""
        if n > 0:
            self._tokens.labels(model).inc(n)

    def generation_finished(self, model: str, tokens: int, seconds: float) -> None:
        """Observe one request's decode rate; does not add to the token counter."""
        if tokens > 0 and seconds > 0:
            self._rate.labels(model).observe(tokens / seconds)

    def prompt_reused(self, model: str, source: str, tokens: int) -> None:
        """Count a finished request under where its cached prompt came from."""
        self._reuse.labels(model, source).inc()
        if tokens > 0:
            self._reused_tokens.labels(model, source).inc(tokens)

    def speculated(self, model: str, drafted: int, accepted: int) -> None:
        """Count a finished request's drafted and accepted tokens."""
        self._drafted.labels(model).inc(drafted)
        self._accepted.labels(model).inc(accepted)

    def worker_restarted(self, model: str, cause: ExitCause) -> None:
        """Count a worker death or an asked-for restart under its typed cause."""
        self._restarts.labels(model, ExitCause(cause).value).inc()

    def evicted(self, model: str) -> None:
        """Count an instance of `model` evicted to free memory."""
        self._evictions.labels(model).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def metrics_route(metrics: Metrics, path: str = "/metrics") -> Route:
    """`GET /metrics` for `metrics`."""

    # async on purpose: the pool snapshot is then read on the event loop's thread,
    # the only one that mutates the pool, instead of in Starlette's threadpool.
    async def endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route(path, endpoint, methods=["GET"], name="metrics")
