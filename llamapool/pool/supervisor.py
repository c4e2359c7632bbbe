"""Spawns, watches and replaces worker processes (after gunicorn's arbiter).

One periodic tick, in a fixed order: reap exited processes → expire silent ones →
bring instance counts to target. Every state change is logged once with its reason
and kept in a short per-worker history.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import msgspec
import psutil

from llamapool import errors
from llamapool.config import ModelSpec, PoolSettings
from llamapool.pool.events import PoolObserver
from llamapool.pool.launcher import Launcher, LocalLauncher, ProcessHandle, WorkerLaunch
from llamapool.pool.lifecycle import ExitCause, cause_of_exit, describe_exit
from llamapool.pool.memory import (
    Candidate,
    Footprint,
    OverLimit,
    Sample,
    budget_bytes,
    choose_evictions,
    estimate,
    fmt_bytes,
    sample,
)

log = logging.getLogger("llamapool.supervisor")


class WorkerState(str, enum.Enum):
    STARTING = "STARTING"
    IDLE = "IDLE"
    BUSY = "BUSY"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
    DEAD = "DEAD"


class ModelState(str, enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    FAILED = "FAILED"


LIVE = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING)


@dataclass(eq=False)
class WorkerHandle:
    """The router's view of one worker process."""

    id: str
    model_id: str
    process: ProcessHandle
    cores: list[int]
    n_threads: int
    started_at: float
    state: WorkerState = WorkerState.STARTING
    last_seen: float = 0.0
    capacity: int = 0
    n_ctx: int = 0
    in_flight: dict = field(default_factory=dict)  # request id → Job
    served: int = 0
    last_used: float = 0.0
    last_prefix: str = ""  # prefix key of the last request it served (its KV cache holds it)
    stop_requested: bool = False
    killed: bool = False  # SIGKILL sent, or exited: takes no new work until it is reaped
    fatal_reason: str | None = None
    cause: ExitCause | None = None  # why it is ending, once known (a kill, its own FATAL)
    history: deque = field(default_factory=lambda: deque(maxlen=20))
    memory: Sample | None = None
    channel: Any = None  # the DataChannel the broker wraps around `data`

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def data(self) -> socket.socket | None:
        """The router's end of the worker's data socket (requests in, tokens out)."""
        return self.process.data

    @property
    def identity(self) -> bytes:
        return self.id.encode()

    @property
    def ready(self) -> bool:
        return self.state in (WorkerState.IDLE, WorkerState.BUSY)

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.in_flight) if self.ready and not self.killed else 0


class FlapPolicy:
    """More than `attempts` deaths within `window` seconds means the model is failing."""

    def __init__(self, attempts: int, window: float, initial: float, cap: float):
        self.attempts, self.window = attempts, window
        self.initial, self.cap = initial, cap
        self.deaths: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Count a death; True when the model should be marked FAILED."""
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > self.window:
            self.deaths.popleft()
        return len(self.deaths) > self.attempts

    def backoff(self) -> float:
        """Delay before the next spawn: none after a lone death, then initial, doubling."""
        if len(self.deaths) < 2:
            return 0.0  # one crash is an accident; respawn at once, as gunicorn does
        return min(self.cap, self.initial * 2 ** (len(self.deaths) - 2))

    def clear(self) -> None:
        self.deaths.clear()


@dataclass(eq=False)
class ModelRuntime:
    """Per-model supervision state."""

    spec: ModelSpec
    target: int
    flap: FlapPolicy
    state: ModelState = ModelState.STARTING
    reason: str | None = None
    failed_at: float = 0.0
    next_spawn_at: float = 0.0
    restarts: int = 0
    footprint: Footprint | None = None
    memory_blocked: str | None = None  # why the next instance does not fit, if it does not
    evicting: set = field(default_factory=set)  # worker ids draining to make room for us
    evictions: int = 0  # instances of this model evicted for others
    unloaded: bool = False  # by the admin API: refuse requests until loaded again


class Supervisor:
    """Owns the worker processes of every model."""

    def __init__(
        self,
        settings: PoolSettings,
        endpoint: str,
        *,
        on_worker_lost: Callable[[WorkerHandle, str], None],
        on_worker_ready: Callable[[WorkerHandle], None],
        on_model_failed: Callable[[str, str], None],
        on_drain: Callable[[WorkerHandle], None] = lambda w: None,
        on_spawned: Callable[[WorkerHandle], None] = lambda w: None,
        observer: PoolObserver | None = None,
        log_level: str = "INFO",
        worker_log: IO | None = None,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_router: Callable[[], Sample | None] = lambda: sample(os.getpid()),
    ):
        self.settings = settings
        self.endpoint = endpoint
        self.on_worker_lost = on_worker_lost
        self.on_worker_ready = on_worker_ready
        self.on_model_failed = on_model_failed
        self.on_drain = on_drain
        self.on_spawned = on_spawned
        self.observer = observer or PoolObserver()
        self.log_level = log_level
        self.launcher: Launcher = launcher or LocalLauncher(worker_log)
        self.clock = clock
        self.sample_router = sample_router
        self.models: dict[str, ModelRuntime] = {}
        self.removed: dict[str, ModelRuntime] = {}  # removed by reload, workers still draining
        self.workers: dict[str, WorkerHandle] = {}
        self._ids = itertools.count(1)
        self.cpus = sorted(os.sched_getaffinity(0))
        self.budget = budget_bytes(settings.memory_budget)
        limit = settings.max_worker_memory
        self.over_limit = OverLimit(budget_bytes(limit) if limit is not None else None)
        self.router_memory: Sample | None = sample_router()
        self._next_memory_check = 0.0
        self.stopping = False  # set at shutdown: nothing is respawned any more

    # -- models -----------------------------------------------------------------

    def add_model(self, spec: ModelSpec) -> ModelRuntime:
        s = self.settings
        runtime = ModelRuntime(
            spec=spec,
            target=spec.min_instances,
            flap=FlapPolicy(s.restart_attempts, s.restart_window, s.backoff_initial, s.backoff_max),
        )
        _refresh_footprint(runtime)
        self.models[spec.id] = runtime
        return runtime

    def fail_model(self, model_id: str, reason: str) -> None:
        runtime = self.models[model_id]
        if runtime.state is ModelState.FAILED:
            return
        runtime.state, runtime.reason = ModelState.FAILED, reason
        runtime.failed_at = self.clock()
        log.error("model %s FAILED: %s", model_id, reason)
        for w in self.workers_of(model_id):
            self.kill(w, ExitCause.MODEL_FAILED, f"model {model_id} failed")
        self.on_model_failed(model_id, reason)

    def workers_of(self, model_id: str, states: tuple = LIVE) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.model_id == model_id and w.state in states]

    def serving(self, model_id: str) -> list[WorkerHandle]:
        """A model's live workers that are not on their way out (draining, stopping)."""
        return [w for w in self.workers_of(model_id) if not w.stop_requested]

    def ensure_capacity(self, model_id: str) -> None:
        """Start a model on demand; raise InsufficientMemory if no instance can ever fit now."""
        runtime = self.models[model_id]
        if runtime.target < 1:
            runtime.target = 1
            self._reconcile_model(model_id, runtime, self.clock())
        if runtime.memory_blocked and not self.workers_of(model_id):
            raise errors.InsufficientMemory(runtime.memory_blocked, retry_after=5)

    # -- processes --------------------------------------------------------------

    def _threads_for(self, spec: ModelSpec) -> int:
        if spec.config.n_threads is not None:
            return spec.config.n_threads
        wanted = sum(
            max(1, m.target) for m in self.models.values() if m.state is not ModelState.FAILED
        )
        return max(1, len(self.cpus) // max(1, wanted))

    def _pick_cores(self, n: int) -> list[int]:
        # Least-loaded cores first, so instances never share a core while cores are free.
        load = dict.fromkeys(self.cpus, 0)
        for w in self.workers.values():
            if w.state in LIVE:
                for c in w.cores:
                    if c in load:
                        load[c] += 1
        ranked = sorted(self.cpus, key=lambda c: (load[c], c))
        return sorted(ranked[: min(n, len(ranked))])

    def spawn(self, model_id: str) -> WorkerHandle:
        runtime = self.models[model_id]
        spec = runtime.spec
        n_threads = self._threads_for(spec)
        cores = self._pick_cores(n_threads)
        worker_spec = msgspec.structs.replace(
            spec, config=msgspec.structs.replace(spec.config, n_threads=n_threads)
        )
        worker_id = f"{model_id}-{next(self._ids)}"
        s = self.settings
        process = self.launcher.start(
            WorkerLaunch(
                worker_id=worker_id,
                spec=worker_spec,
                endpoint=self.endpoint,
                cores=cores,
                heartbeat_interval=s.heartbeat_interval,
                heartbeat_liveness=s.heartbeat_liveness,
                stall_timeout=s.engine_stall_timeout,
                log_level=self.log_level,
            )
        )
        now = self.clock()
        handle = WorkerHandle(
            id=worker_id,
            model_id=model_id,
            process=process,
            cores=cores,
            n_threads=n_threads,
            started_at=now,
            last_seen=now,
        )
        self.workers[worker_id] = handle
        self._transition(
            handle, WorkerState.STARTING, f"spawned pid {process.pid} on cores {cores}"
        )
        self.on_spawned(handle)
        return handle

    def _transition(self, w: WorkerHandle, state: WorkerState, reason: str) -> None:
        w.history.append((time.time(), state.value, reason))
        if w.state is not state or state is WorkerState.STARTING:
            # IDLE ⇄ BUSY happens per request; keep it out of the INFO log.
            busy_flip = {w.state, state} == {WorkerState.IDLE, WorkerState.BUSY}
            level = logging.WARNING if state is WorkerState.DEAD else logging.INFO
            level = logging.DEBUG if busy_flip else level
            log.log(level, "worker %s (%s) %s: %s", w.id, w.model_id, state.value, reason)
        w.state = state

    def mark_ready(self, w: WorkerHandle, capacity: int, n_ctx: int) -> None:
        w.capacity, w.n_ctx = capacity, n_ctx
        w.memory = w.process.memory()  # loaded now: the budget sees real numbers at once
        self._transition(w, WorkerState.IDLE, f"ready in {self.clock() - w.started_at:.2f} s")
        runtime = self.models.get(w.model_id)
        if runtime is not None and runtime.state is ModelState.STARTING:
            runtime.state = ModelState.READY
        self.on_worker_ready(w)

    def note_busy(self, w: WorkerHandle) -> None:
        if w.state is WorkerState.IDLE and w.in_flight:
            self._transition(w, WorkerState.BUSY, f"serving {next(iter(w.in_flight))}")
        elif w.state is WorkerState.BUSY and not w.in_flight:
            self._transition(w, WorkerState.IDLE, "request finished")

    def note_fatal(self, w: WorkerHandle, cause: ExitCause, reason: str) -> None:
        """The worker's own account of why it is about to exit (its FATAL)."""
        w.fatal_reason, w.cause = reason, cause
        log.error("worker %s (%s) FATAL: %s", w.id, w.model_id, reason)

    def kill(self, w: WorkerHandle, cause: ExitCause, reason: str) -> None:
        """SIGKILL the worker's whole process group; the next reap records the death."""
        if w.fatal_reason is None:
            w.fatal_reason, w.cause = reason, cause
        w.killed = True
        w.process.signal_group(signal.SIGKILL)

    def request_stop(self, w: WorkerHandle, reason: str) -> None:
        w.stop_requested = True
        self._transition(w, WorkerState.DRAINING, reason)

    # -- the tick ---------------------------------------------------------------

    def heard_from(self, w: WorkerHandle) -> None:
        """Any message from a worker counts as a heartbeat."""
        w.last_seen = self.clock()

    def tick(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.reap(now)
        self.expire(now)
        self.check_memory(now)
        self.reconcile(now)

    def reap(self, now: float) -> None:
        for w in list(self.workers.values()):
            if w.state not in LIVE:
                continue
            code = w.process.poll()
            if code is None:
                continue
            self._on_exit(w, code, now)

    def _on_exit(self, w: WorkerHandle, code: int, now: float) -> None:
        was = w.state
        w.killed = True  # gone: nothing may be dispatched to it while its last words are read
        if w.channel is not None:
            # What it wrote before it went (a drained worker's last DONE, the chunks
            # before a crash, a FATAL naming the reason) is still in the socket: take it
            # before judging what was lost.
            w.channel.read(to_the_end=True)
        if w.stop_requested:
            self._transition(w, WorkerState.STOPPED, describe_exit(code))
            self.workers.pop(w.id, None)
            self.on_worker_lost(w, f"worker {w.id} stopped")
            return
        detail = describe_exit(code)
        if w.fatal_reason:
            detail = f"{detail}: {w.fatal_reason}"
        reason = f"{detail} while {was.value}"
        self._transition(w, WorkerState.DEAD, reason)
        self.workers.pop(w.id, None)
        self.on_worker_lost(w, reason)
        runtime = self.models.get(w.model_id)
        if runtime is None or runtime.state is ModelState.FAILED:
            return
        runtime.restarts += 1
        cause = cause_of_exit(code, w.cause)
        self.observer.worker_restarted(w.model_id, cause)
        if cause is ExitCause.CANNOT_BOOT:
            self.fail_model(w.model_id, w.fatal_reason or detail)
            return
        if runtime.flap.record(now):
            self.fail_model(
                w.model_id,
                f"{len(runtime.flap.deaths)} worker deaths within "
                f"{self.settings.restart_window:g} s; last: {reason}",
            )
            return
        runtime.next_spawn_at = now + runtime.flap.backoff()
        if not any(x.ready for x in self.workers_of(w.model_id)):
            runtime.state = ModelState.STARTING

    def expire(self, now: float) -> None:
        s = self.settings
        limit = s.heartbeat_interval * s.heartbeat_liveness
        for w in list(self.workers.values()):
            if w.state is WorkerState.STARTING and now - w.started_at > s.boot_timeout:
                self.kill(w, ExitCause.BOOT_TIMEOUT, f"did not boot within {s.boot_timeout:g} s")
            elif w.state in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING):
                if now - w.last_seen > limit:
                    reason = f"missed heartbeats for {now - w.last_seen:.1f} s"
                    self.kill(w, ExitCause.HEARTBEAT, reason)

    def reconcile(self, now: float) -> None:
        if self.stopping:
            return
        for model_id, runtime in self.models.items():
            self._reconcile_model(model_id, runtime, now)
        for model_id in [m for m in self.removed if not self.workers_of(m)]:
            del self.removed[model_id]

    def _reconcile_model(self, model_id: str, runtime: ModelRuntime, now: float) -> None:
        retry = self.settings.failed_retry_after
        if runtime.state is ModelState.FAILED and retry and now - runtime.failed_at >= retry:
            log.info("model %s: retrying after %g s FAILED (%s)", model_id, retry, runtime.reason)
            runtime.state, runtime.reason = ModelState.STARTING, None
            runtime.flap.clear()
        if runtime.state is ModelState.FAILED or self.stopping:
            return
        if len(self.serving(model_id)) < runtime.target and now >= runtime.next_spawn_at:
            if self.make_room(model_id):
                self.spawn(model_id)

    # -- memory -----------------------------------------------------------------

    def memory_used(self) -> int:
        """The pool's use: the router plus every live worker (its estimate until measured)."""
        used = self.router_memory.charge if self.router_memory else 0
        counted: dict[str, int] = {}
        for w in self.workers.values():
            if w.state not in LIVE:
                continue
            runtime = self.models.get(w.model_id)
            if w.memory is not None and w.state is not WorkerState.STARTING:
                used += w.memory.charge
            elif runtime is not None and runtime.footprint is not None:
                used += runtime.footprint.cost(counted.get(w.model_id, 0))
            counted[w.model_id] = counted.get(w.model_id, 0) + 1
        return used

    def make_room(self, model_id: str) -> bool:
        """True if one more instance fits; else evict idle instances of others, or say why not."""
        runtime = self.models[model_id]
        if runtime.footprint is None:
            return True
        if any(wid in self.workers for wid in runtime.evicting):
            return False  # evictions for us are still draining
        runtime.evicting.clear()
        needed = runtime.footprint.cost(len(self.workers_of(model_id)))
        free = min(self.budget - self.memory_used(), psutil.virtual_memory().available)
        if needed <= free:
            runtime.memory_blocked = None
            return True
        victims = choose_evictions(self._eviction_candidates(model_id), needed - free)
        if victims is None:
            reason = (
                f"model {model_id!r} needs ~{fmt_bytes(needed)} for another instance but only "
                f"{fmt_bytes(max(0, free))} of the {fmt_bytes(self.budget)} memory budget is free, "
                "and no idle instance of another model can be evicted; raise pool.memory_budget "
                "or unload a model"
            )
            if reason != runtime.memory_blocked:
                log.error("%s", reason)
            runtime.memory_blocked = reason
            return False
        for victim in victims:
            w = self.workers[victim.worker_id]
            other = self.models[w.model_id]
            other.target = max(other.spec.min_instances, len(self.workers_of(w.model_id)) - 1)
            other.evictions += 1
            self.observer.evicted(w.model_id)
            runtime.evicting.add(w.id)
            self.drain(w, f"evicted (idle, least recently used) to make room for {model_id}")
        return False

    def _eviction_candidates(self, model_id: str) -> list[Candidate]:
        # Never a busy instance, never below a model's min_instances.
        spare = {
            mid: len(self.serving(mid)) - rt.spec.min_instances for mid, rt in self.models.items()
        }
        idle = sorted(
            (
                w
                for w in self.workers.values()
                if w.model_id != model_id
                and w.state is WorkerState.IDLE
                and not w.in_flight
                and not w.stop_requested
            ),
            key=lambda w: w.last_used,
        )
        out = []
        for w in idle:
            if spare.get(w.model_id, 0) > 0:
                spare[w.model_id] -= 1
                charge = w.memory.charge if w.memory else self._estimate_of(w)
                out.append(Candidate(w.id, w.model_id, charge, w.last_used))
        return out

    def _estimate_of(self, w: WorkerHandle) -> int:
        runtime = self.models.get(w.model_id) or self.removed.get(w.model_id)
        return runtime.footprint.per_instance if runtime and runtime.footprint else 0

    def check_memory(self, now: float) -> None:
        """Sample every live worker; drain and restart one that stays above its limit."""
        if now < self._next_memory_check:
            return
        self._next_memory_check = now + self.settings.memory_check_interval
        self.router_memory = self.sample_router()
        for w in list(self.workers.values()):
            if w.state not in LIVE or w.state is WorkerState.STARTING:
                continue
            w.memory = w.process.memory()
            if w.memory is None or w.stop_requested:
                continue
            if self.over_limit.observe(w.id, w.memory.charge):
                self.over_limit.forget(w.id)
                if w.model_id in self.models:
                    self.models[w.model_id].restarts += 1
                limit = fmt_bytes(self.over_limit.limit or 0)
                self.observer.worker_restarted(w.model_id, ExitCause.MEMORY_LIMIT)
                self.drain(
                    w,
                    f"restart: memory {fmt_bytes(w.memory.charge)} above max_worker_memory "
                    f"{limit} for {self.over_limit.readings} readings in a row",
                )

    def drain(self, w: WorkerHandle, reason: str) -> None:
        """Stop a worker politely: it finishes its request, then exits; reconcile replaces it."""
        if w.stop_requested:
            return
        booting = w.state is WorkerState.STARTING
        self.request_stop(w, reason)
        if booting:
            self.kill(w, ExitCause.ADMIN, reason)  # nothing to finish yet
        else:
            self.on_drain(w)

    # -- commands (admin API) --------------------------------------------------

    def scale(self, model_id: str, instances: int) -> None:
        """Set a model's instance count; down drains idle instances first, never cuts work."""
        runtime = self.models[model_id]
        spec = runtime.spec
        if runtime.unloaded:
            raise errors.InvalidRequest(
                f"model {model_id!r} is unloaded; load it first "
                f"(POST /admin/models/{model_id}/load), then scale it",
                param="model",
            )
        if instances < spec.min_instances or instances > spec.instance_limit:
            raise errors.InvalidRequest(
                f"model {model_id!r} allows {spec.min_instances}..{spec.instance_limit} instances "
                f"(min_instances..max_instances); got {instances}",
                param="instances",
            )
        live = self.serving(model_id)
        if instances > len(live) and runtime.footprint is not None:
            needed = sum(
                runtime.footprint.cost(len(live) + i) for i in range(instances - len(live))
            )
            free = self.budget - self.memory_used()
            if needed > free:
                raise errors.InsufficientMemory(
                    f"scaling {model_id} to {instances} needs ~{fmt_bytes(needed)} more but only "
                    f"{fmt_bytes(max(0, free))} of the {fmt_bytes(self.budget)} budget is free",
                    retry_after=5,
                )
        runtime.target = instances
        extra = len(live) - instances
        # Idle ones first (least recently used), then busy ones, which finish before exiting.
        for w in sorted(live, key=lambda w: (bool(w.in_flight), w.last_used))[: max(0, extra)]:
            self.drain(w, f"scaled {model_id} down to {instances}")
        self._reconcile_model(model_id, runtime, self.clock())

    def restart_worker(self, worker_id: str) -> WorkerHandle:
        """Drain a worker; reconcile starts its replacement."""
        w = self.workers.get(worker_id)
        if w is None or w.state not in LIVE:
            raise errors.NotFound(f"no live worker {worker_id!r}")
        if w.stop_requested:
            return w  # already on its way out, its replacement coming: counted once
        self.observer.worker_restarted(w.model_id, ExitCause.ADMIN)
        self.drain(w, "restart requested by admin")
        return w

    def unload(self, model_id: str, force: bool) -> list[WorkerHandle]:
        """Stop every instance of a model: drain them, or kill them with `force`."""
        runtime = self.models[model_id]
        runtime.target = 0
        runtime.unloaded = True
        workers = self.workers_of(model_id)
        for w in workers:
            if force:
                w.stop_requested = True
                self.kill(w, ExitCause.ADMIN, "unloaded by admin (force)")
            else:
                self.drain(w, "unloaded by admin")
        return workers

    def load(self, model_id: str) -> None:
        """Start an unloaded, FAILED or on-standby model: its min_instances (at least one).

        A model that is loaded and has instances is left as it is (its scale included).
        """
        runtime = self.models[model_id]
        serving = self.serving(model_id)
        if not runtime.unloaded and runtime.state is not ModelState.FAILED and serving:
            return
        self._restart_model(runtime, max(runtime.spec.min_instances, 1))

    def _restart_model(self, runtime: ModelRuntime, target: int) -> None:
        """Clear a model's failure and unload, re-read its file's size, aim for `target`."""
        runtime.state, runtime.reason = ModelState.STARTING, None
        runtime.memory_blocked = None
        runtime.unloaded = False
        runtime.flap.clear()
        runtime.next_spawn_at = 0.0
        runtime.target = target
        _refresh_footprint(runtime)  # the file may have been replaced (a FAILED model's fix)
        self._reconcile_model(runtime.spec.id, runtime, self.clock())

    def replace_spec(self, spec: ModelSpec) -> None:
        """A changed model: drain the old instances, start new ones from the new spec.

        The instance count carries over within the new limits; an unloaded model stays
        unloaded (its next load uses the new spec).
        """
        runtime = self.models[spec.id]
        for w in self.workers_of(spec.id):
            self.drain(w, "config changed (reload)")
        runtime.spec = spec
        if runtime.unloaded:
            _refresh_footprint(runtime)
            return
        self._restart_model(
            runtime, min(max(runtime.target, spec.min_instances), spec.instance_limit)
        )

    def remove_model(self, model_id: str) -> None:
        """Drain a model's instances; its runtime goes once they are all gone."""
        for w in self.workers_of(model_id):
            self.drain(w, "removed from the config (reload)")
        runtime = self.models.pop(model_id)
        runtime.target = 0
        self.removed[model_id] = runtime

    # -- shutdown ---------------------------------------------------------------

    def live_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state in LIVE]

    def terminate_all(self, timeout: float) -> None:
        """SIGTERM every process group, then SIGKILL whatever is left after `timeout`."""
        workers = self.live_workers()
        for w in workers:
            w.stop_requested = True
            w.process.signal_group(signal.SIGTERM)
        # A real deadline even under a fake clock: this blocks its thread.
        deadline = time.monotonic() + timeout
        for w in workers:
            try:
                w.process.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                w.process.signal_group(signal.SIGKILL)
                w.process.wait()
            self._transition(w, WorkerState.STOPPED, "pool shut down")
        self.workers.clear()


def _refresh_footprint(runtime: ModelRuntime) -> None:
    """The memory estimate of the model's spec, from its file as it is now."""
    try:
        runtime.footprint = estimate(runtime.spec)
    except OSError as exc:
        log.warning("cannot estimate the memory of %s: %s", runtime.spec.id, exc)
