"""Spawns, watches and replaces worker processes (after gunicorn's arbiter).

One periodic tick, in a fixed order: reap exited processes → expire silent ones →
check memory → bring instance counts to target. Every state change goes through
`_set_state`, which checks it against the lifecycle's table, logs it once with its
reason and keeps it in a short per-worker history. Per-model decisions and commands
live on each model's `ModelRuntime`; processes come from a `Launcher`.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import IO

import msgspec

from llamapool import errors
from llamapool.config import ModelSpec, PoolSettings
from llamapool.pool import placement
from llamapool.pool.cores import CoreLedger, Moves, Resize, may_lend
from llamapool.pool.events import PoolObserver
from llamapool.pool.gpus import GpuReader, open_reader
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.launcher import Launcher, LocalLauncher, WorkerLaunch
from llamapool.pool.lifecycle import (
    LIVE,
    SERVING,
    WORKER_TRANSITIONS,
    ExitCause,
    ModelState,
    WorkerState,
    cause_of_exit,
    check,
    describe_exit,
)
from llamapool.pool.memory import MemoryBudget, Sample, sample
from llamapool.pool.runtime import FlapPolicy, ModelRuntime

log = logging.getLogger("llamapool.supervisor")


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
        on_resize: Callable[[WorkerHandle, Resize], None] = lambda w, r: None,
        on_reclaimed: Callable[[WorkerHandle], None] = lambda w: None,
        observer: PoolObserver | None = None,
        log_level: str = "INFO",
        worker_log: IO | None = None,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        sample_router: Callable[[], Sample | None] = lambda: sample(os.getpid()),
        gpu_reader: Callable[[], GpuReader | None] = open_reader,
    ):
        self.settings = settings
        self.endpoint = endpoint
        self.on_worker_lost = on_worker_lost
        self.on_worker_ready = on_worker_ready
        self.on_model_failed = on_model_failed
        self.on_drain = on_drain
        self.on_spawned = on_spawned
        self.on_resize = on_resize  # send a worker its new cores and threads
        self.on_reclaimed = on_reclaimed  # its cores are back: its held requests may go
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
        self.memory = MemoryBudget(
            self, settings, sample_router=sample_router, gpu_reader=gpu_reader
        )
        self.stopping = False  # set at shutdown: nothing is respawned any more
        self.cores = CoreLedger()  # elastic threads: who runs on which cores now

    # -- models -----------------------------------------------------------------

    def add_model(self, spec: ModelSpec) -> ModelRuntime:
        """Supervise a new model; it starts at the next reconcile (or waits on STANDBY)."""
        s = self.settings
        runtime = ModelRuntime(
            spec=spec,
            pool=self,
            target=spec.min_instances,
            flap=FlapPolicy(s.restart_attempts, s.restart_window, s.backoff_initial, s.backoff_max),
        )
        runtime.refresh_footprint()
        self.models[spec.id] = runtime
        runtime.settle("no instance wanted (min_instances 0)")
        return runtime

    def refusal(self, model_id: str) -> errors.LlamapoolError | None:
        """Why `model_id` cannot take a request now (unknown, removed, unloaded, failed).

        The one admission check: the scheduler asks it at admission and at every requeue.
        """
        runtime = self.models.get(model_id)
        if runtime is not None:
            return runtime.refusal()
        if model_id in self.removed:
            return self.removed[model_id].refusal()
        known = ", ".join(sorted(self.models)) or "none"
        return errors.ModelNotFound(
            f"model {model_id!r} does not exist; available models: {known}", param="model"
        )

    def workers_of(self, model_id: str, states: frozenset = LIVE) -> list[WorkerHandle]:
        """A model's workers in `states` (default: every live one)."""
        return [w for w in self.workers.values() if w.model_id == model_id and w.state in states]

    def serving(self, model_id: str) -> list[WorkerHandle]:
        """A model's live workers that are not on their way out (drained, scaled down...)."""
        return [w for w in self.workers_of(model_id) if not w.leaving]

    def live_workers(self) -> list[WorkerHandle]:
        """Every worker whose process exists."""
        return [w for w in self.workers.values() if w.state in LIVE]

    def _runtime_of(self, w: WorkerHandle) -> ModelRuntime | None:
        return self.models.get(w.model_id) or self.removed.get(w.model_id)

    # -- commands (admin API, signals and reload call these) ---------------------

    def ensure_capacity(self, model_id: str) -> None:
        """Start a model on demand; raise InsufficientMemory if no instance can ever fit now."""
        self.models[model_id].ensure_capacity()

    def want_instance(self, model_id: str) -> None:
        """Start a model on demand, whatever memory said last (a requeued job waits)."""
        self.models[model_id].want_instance()

    def scale(self, model_id: str, instances: int) -> None:
        """Set a model's instance count (ModelRuntime.scale)."""
        self.models[model_id].scale(instances)

    def load(self, model_id: str) -> None:
        """Start an unloaded, FAILED or on-standby model (ModelRuntime.load)."""
        self.models[model_id].load()

    def unload(self, model_id: str, force: bool) -> list[WorkerHandle]:
        """Stop every instance of a model (ModelRuntime.unload)."""
        return self.models[model_id].unload(force)

    def replace_spec(self, spec: ModelSpec) -> None:
        """A changed model: drain the old instances, start new ones (ModelRuntime.replace_spec)."""
        self.models[spec.id].replace_spec(spec)

    def remove_model(self, model_id: str) -> None:
        """Drain a model's instances; its runtime goes once they are all gone."""
        runtime = self.models.pop(model_id)
        self.removed[model_id] = runtime
        runtime.remove()

    def restart_worker(self, worker_id: str) -> WorkerHandle:
        """Drain a worker; reconcile starts its replacement."""
        w = self.workers.get(worker_id)
        if w is None or w.state not in LIVE:
            raise errors.NotFound(f"no live worker {worker_id!r}")
        if w.leaving:
            return w  # already on its way out, its replacement coming: counted once
        self.observer.worker_restarted(w.model_id, ExitCause.ADMIN)
        self.stop_gracefully(w, ExitCause.ADMIN, "restart requested by admin")
        return w

    # -- processes --------------------------------------------------------------

    def gpu_for(self, model_id: str, planned: Mapping[int, int] | None = None) -> int | None:
        """The GPU the next instance of `model_id` gets (placement.gpu_for)."""
        serving = [w.gpu for w in self.serving(model_id)]
        return placement.gpu_for(self.models[model_id].spec.gpus, serving, planned)

    def _instances_wanted(self) -> int:
        return sum(
            max(1, m.target) for m in self.models.values() if m.state is not ModelState.FAILED
        )

    def spawn(self, model_id: str) -> WorkerHandle:
        """Start one worker of `model_id` through the launcher."""
        spec = self.models[model_id].spec
        wanted = [
            max(1, m.target) for m in self.models.values() if m.state is not ModelState.FAILED
        ]
        n_threads = placement.threads_for(spec, self.cpus, sum(wanted))
        cores = placement.pick_cores(self.cpus, [w.cores for w in self.live_workers()], n_threads)
        gpu = self.gpu_for(model_id)
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
                gpu=gpu,
                node=self.memory.planned.pop(model_id, None),
            )
        )
        now = self.clock()
        w = WorkerHandle(
            id=worker_id,
            model_id=model_id,
            process=process,
            cores=cores,
            n_threads=n_threads,
            started_at=now,
            last_seen=now,
            gpu=gpu,
        )
        self.workers[worker_id] = w
        where = f"cores {cores}" if gpu is None else f"cores {cores} and GPU {gpu}"
        # A launcher for other machines knows the pid and cores once placed, and says so.
        spawned = f"spawned pid {process.pid} on {where}" if process.pid else "spawned"
        self._record(w, WorkerState.STARTING, spawned)
        self.on_spawned(w)
        return w

    def _set_state(self, w: WorkerHandle, state: WorkerState, reason: str) -> None:
        """Change a worker's state if the lifecycle allows it (else IllegalTransition)."""
        check(WORKER_TRANSITIONS, "worker", w.id, w.state, state, reason)
        if w.ended_from is None and state not in SERVING:
            w.ended_from = w.state
        self._record(w, state, reason)
        w.state = state

    def _record(self, w: WorkerHandle, state: WorkerState, reason: str) -> None:
        w.history.append((time.time(), state.value, reason))
        # IDLE ⇄ BUSY happens per request, EXITED just before STOPPED or DEAD: not at INFO.
        if {w.state, state} == {WorkerState.IDLE, WorkerState.BUSY}:
            level = logging.DEBUG
        elif state is WorkerState.EXITED:
            level = logging.DEBUG
        elif state is WorkerState.DEAD or (state is WorkerState.KILLING and not w.leaving):
            level = logging.WARNING
        else:
            level = logging.INFO
        log.log(level, "worker %s (%s) %s: %s", w.id, w.model_id, state.value, reason)

    def mark_ready(
        self, w: WorkerHandle, capacity: int, n_ctx: int, resizable: bool = False
    ) -> None:
        """The worker sent READY: it takes requests now."""
        w.capacity, w.n_ctx = capacity, n_ctx
        w.memory = w.process.memory()  # loaded now: the budget sees real numbers at once
        now = self.clock()
        self._set_state(w, WorkerState.IDLE, f"ready in {now - w.started_at:.2f} s")
        runtime = self.models.get(w.model_id)
        # Cores are lent between this machine's workers only (a Ray node's are its host's).
        if w.cores and runtime is not None and w.process.node is None:
            elastic = may_lend(runtime.spec, self.settings, resizable=resizable, gpu=w.gpu)
            self._apply(self.cores.join(w.id, w.cores, w.n_threads, elastic=elastic, now=now))
        if runtime is not None:
            runtime.worker_ready(w)
        self.on_worker_ready(w)

    def note_dispatched(self, w: WorkerHandle) -> None:
        """A request was booked to the worker: IDLE becomes BUSY; it reclaims its cores
        if lent, else borrows idle ones (before the request is sent)."""
        if w.state is WorkerState.IDLE and w.in_flight:
            self._set_state(w, WorkerState.BUSY, f"serving {next(iter(w.in_flight))}")
            self._apply(self.cores.busy(w.id, self.clock()))

    def note_released(self, w: WorkerHandle) -> None:
        """A request left the worker: BUSY becomes IDLE once nothing is in flight."""
        if w.state is WorkerState.BUSY and not w.in_flight:
            self._set_state(w, WorkerState.IDLE, "request finished")
            self._apply(self.cores.idle(w.id, self.clock()))

    def note_resized(self, w: WorkerHandle, seq: int, cores: list[int], n_threads: int) -> None:
        """The worker runs as its resize `seq` said (its RESIZED)."""
        self._apply(self.cores.resized(w.id, seq, cores, n_threads, self.clock()))

    def _apply(self, moves: Moves) -> None:
        for r in moves.resizes:
            w = self.workers.get(r.worker_id)
            if w is not None:
                self.on_resize(w, r)
        for worker_id in moves.freed:
            w = self.workers.get(worker_id)
            if w is not None:
                self.on_reclaimed(w)

    def note_fatal(self, w: WorkerHandle, cause: ExitCause, reason: str) -> None:
        """The worker's own account of why it is about to exit (its FATAL)."""
        # Its words beat a kill's guess, but not an end the pool asked for.
        if w.cause is None or not w.cause.asked:
            w.cause, w.cause_detail = cause, reason
        log.error("worker %s (%s) FATAL: %s", w.id, w.model_id, reason)

    def kill(self, w: WorkerHandle, cause: ExitCause, reason: str) -> None:
        """SIGKILL the worker's process group; it takes no new work, the next reap records it."""
        self._note_cause(w, cause, reason)
        if w.state in (WorkerState.STARTING, *SERVING, WorkerState.DRAINING):
            self._set_state(w, WorkerState.KILLING, reason)
        w.process.signal_group(signal.SIGKILL)

    def stop_gracefully(self, w: WorkerHandle, cause: ExitCause, reason: str) -> None:
        """Ask a worker to finish its requests and exit; one still booting is killed instead."""
        if w.leaving or w.state not in LIVE:
            return
        if w.state is WorkerState.STARTING or w.state is WorkerState.KILLING:
            self.kill(w, cause, reason)
            return
        self._note_cause(w, cause, reason)
        self._set_state(w, WorkerState.DRAINING, reason)
        self.cores.retire(w.id)
        self.on_drain(w)

    def _note_cause(self, w: WorkerHandle, cause: ExitCause, reason: str) -> None:
        # The first cause wins, except that an end the pool asks for beats a death
        # already under way: the worker then ends STOPPED and is not counted.
        if w.cause is None or (cause.asked and not w.cause.asked):
            w.cause, w.cause_detail = cause, reason

    def heard_from(self, w: WorkerHandle) -> None:
        """Any message from a worker counts as a heartbeat."""
        w.last_seen = self.clock()

    # -- the tick ---------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """One supervision round: reap → expire → memory → reconcile → lend idle cores."""
        now = self.clock() if now is None else now
        self.reap(now)
        self.expire(now)
        self.memory.check(now)
        self.reconcile(now)
        self._apply(self.cores.tick(now))

    def reap(self, now: float) -> None:
        """Record every worker whose process has exited."""
        for w in self.live_workers():
            code = w.process.poll()
            if code is not None:
                self._on_exit(w, code, now)

    def _on_exit(self, w: WorkerHandle, code: int, now: float) -> None:
        was = w.ended_from or w.state
        # EXITED first: nothing may be dispatched to it while its last words are read.
        self._set_state(w, WorkerState.EXITED, describe_exit(code))
        if w.channel is not None:
            # What it wrote before it went (a drained worker's last DONE, the chunks
            # before a crash, a FATAL naming the reason) is still in the socket: take it
            # before judging what was lost.
            w.channel.read(to_the_end=True)
        self.workers.pop(w.id, None)
        self._apply(self.cores.leave(w.id))
        runtime = self._runtime_of(w)
        if w.leaving:
            self._set_state(w, WorkerState.STOPPED, describe_exit(code))
            self.on_worker_lost(w, f"worker {w.id} stopped")
        else:
            cause = cause_of_exit(code, w.cause)
            detail = describe_exit(code)
            if w.cause_detail or w.process.reason:
                detail = f"{detail}: {w.cause_detail or w.process.reason}"
            reason = f"{detail} while {was.value}"
            self._set_state(w, WorkerState.DEAD, reason)
            self.on_worker_lost(w, reason)
            if runtime is not None:
                runtime.worker_died(w, cause, reason, now)
        if runtime is not None:
            runtime.settle(f"no instance wanted or left (worker {w.id} ended)")

    def expire(self, now: float) -> None:
        """Kill workers that did not boot in time or went silent."""
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
        """Bring every model to its target; forget removed models once their workers are gone."""
        if self.stopping:
            return
        for runtime in list(self.models.values()):
            runtime.reconcile(now)
        for model_id in [m for m in self.removed if not self.workers_of(m)]:
            del self.removed[model_id]

    def make_room(self, model_id: str) -> bool:
        """True if one more instance of `model_id` fits now (MemoryBudget.make_room)."""
        return self.memory.make_room(self.models[model_id])

    # -- shutdown ---------------------------------------------------------------

    def stop_all(self, reason: str) -> list[WorkerHandle]:
        """Begin shutdown: READY workers drain (they are returned), booting ones wait for
        terminate_all, nothing is respawned."""
        self.stopping = True
        asked = []
        for w in self.live_workers():
            if w.ready:
                asked.append(w)
                self.stop_gracefully(w, ExitCause.SHUTDOWN, reason)
            elif w.state is WorkerState.STARTING:
                self._note_cause(w, ExitCause.SHUTDOWN, reason)
                self._set_state(w, WorkerState.DRAINING, reason)
            else:
                self._note_cause(w, ExitCause.SHUTDOWN, reason)
        return asked

    def terminate_all(self, timeout: float) -> None:
        """SIGTERM every process group, then SIGKILL whatever is left after `timeout`."""
        workers = self.live_workers()
        for w in workers:
            self._note_cause(w, ExitCause.SHUTDOWN, "pool shut down")
            w.process.signal_group(signal.SIGTERM)
        # A real deadline even under a fake clock: this blocks its thread.
        deadline = time.monotonic() + timeout
        for w in workers:
            try:
                code = w.process.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                w.process.signal_group(signal.SIGKILL)
                code = w.process.wait()
            self._set_state(w, WorkerState.EXITED, describe_exit(code))
            self._set_state(w, WorkerState.STOPPED, "pool shut down")
        self.workers.clear()
