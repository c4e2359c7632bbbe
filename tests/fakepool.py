"""A supervisor over fake processes whose exits the test controls, on a fake clock."""

from __future__ import annotations

import pathlib
import signal
from dataclasses import dataclass, field
from typing import Any

from llamapool.config import parse_config
from llamapool.pool.launcher import NodeRoom, WorkerLaunch
from llamapool.pool.memory import Sample
from llamapool.pool.supervisor import Supervisor, WorkerHandle
from llamapool.router.metrics import Metrics


class FakeProcess:
    """A worker process that exits when the test says, or when signalled like a real one."""

    def __init__(self, launch: WorkerLaunch, pid: int):
        self.launch = launch
        self.pid = pid
        self.node: str | None = None
        self.node_available: int | None = None
        self.reason = None
        self.data = None
        self.code: int | None = None
        self.signals: list[int] = []
        self.sample: Sample | None = Sample(rss=1 << 20, pss=1 << 20)
        self.ignore_sigterm = False
        self.ignore_sigkill = False  # as a process in uninterruptible sleep would, for a while

    def exit(self, code: int) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        ignored = self.ignore_sigterm if sig == signal.SIGTERM else self.ignore_sigkill
        if self.code is None and not ignored:
            # The real worker leaves with exit 0 on SIGTERM.
            self.code = 0 if sig == signal.SIGTERM else -sig

    def wait(self, timeout: float | None = None) -> int:
        if self.code is None:
            raise TimeoutError("still running")
        return self.code

    def memory(self) -> Sample | None:
        return self.sample if self.code is None else None


class FakeLauncher:
    """Starts FakeProcesses and keeps them, in start order."""

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []
        self.rooms: list[NodeRoom] | None = None  # set: machines it places workers on

    def start(self, launch: WorkerLaunch) -> FakeProcess:
        proc = FakeProcess(launch, pid=100_000 + len(self.started))
        proc.node = launch.node
        self.started.append(proc)
        return proc

    def nodes_for(self, spec) -> list[NodeRoom] | None:
        return self.rooms

    def close(self) -> None:
        pass


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class FakePool:
    """A Supervisor wired to fakes, with what its callbacks reported."""

    sup: Supervisor
    launcher: FakeLauncher
    clock: FakeClock
    metrics: Metrics
    lost: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    resizes: list[tuple[str, list[int], int]] = field(
        default_factory=list
    )  # worker, cores, threads
    reclaimed: list[str] = field(default_factory=list)  # workers whose held requests may go

    def tick(self, advance: float = 0.0) -> None:
        self.sup.tick(self.clock.advance(advance))

    def workers(self, model_id: str = "m") -> list[WorkerHandle]:
        return self.sup.workers_of(model_id)

    def only(self, model_id: str = "m") -> WorkerHandle:
        (w,) = self.workers(model_id)
        return w

    def proc(self, w: WorkerHandle) -> FakeProcess:
        assert isinstance(w.process, FakeProcess)
        return w.process

    def ready(self, w: WorkerHandle, capacity: int = 1, resizable: bool = False) -> None:
        self.sup.mark_ready(w, capacity=capacity, n_ctx=256, resizable=resizable)

    def dispatch(self, w: WorkerHandle, request_id: str) -> None:
        """Book a request to `w` as the scheduler does."""
        w.in_flight[request_id] = object()
        self.sup.note_dispatched(w)

    def release(self, w: WorkerHandle, request_id: str) -> None:
        del w.in_flight[request_id]
        self.sup.note_released(w)

    def restarts(self, reason: str, model_id: str = "m") -> float:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics.render().decode()):
            for s in family.samples:
                if s.name == "llamapool_worker_restarts_total" and s.labels == {
                    "model": model_id,
                    "reason": reason,
                }:
                    return s.value
        return 0.0


def fake_pool(
    model_path: pathlib.Path,
    models: list[dict[str, Any]] | None = None,
    *,
    gpu: Any = None,
    **pool: Any,
) -> FakePool:
    """A pool of `models` (default: one model `m`, one instance) on fake processes; with
    `gpu` (a GpuReader, e.g. fakegpu.FakeGpuReader) it accounts VRAM, else there is no GPU."""
    models = models or [{"id": "m"}]
    entries = [
        {**m, "config": {"model_path": str(model_path), **m.get("config", {})}} for m in models
    ]
    config = parse_config({"pool": pool, "models": entries})
    launcher, clock, metrics = FakeLauncher(), FakeClock(), Metrics()
    holder: dict[str, FakePool] = {}
    sup = Supervisor(
        config.pool,
        "ipc:///nonexistent",
        on_worker_lost=lambda w, r: holder["p"].lost.append((w.id, r)),
        on_worker_ready=lambda w: None,
        on_model_failed=lambda m, r: holder["p"].failed.append((m, r)),
        on_drain=lambda w: holder["p"].drained.append(w.id),
        on_resize=lambda w, r: holder["p"].resizes.append((w.id, r.cores, r.n_threads)),
        on_reclaimed=lambda w: holder["p"].reclaimed.append(w.id),
        observer=metrics,
        launcher=launcher,
        clock=clock,
        sample_router=lambda: None,
        gpu_reader=lambda: gpu,
    )
    holder["p"] = FakePool(sup, launcher, clock, metrics)
    sup.cpus = [0, 1]
    for spec in config.models.values():
        sup.add_model(spec)
    return holder["p"]
