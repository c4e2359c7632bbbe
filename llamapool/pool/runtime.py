"""One model under supervision (circus's Watcher): its lifecycle, its target, its commands.

The Supervisor owns the processes and the shared resources (cores, memory); a
ModelRuntime decides what its model wants and changes the model's state, only through
`set_state`, which checks the transition against `MODEL_TRANSITIONS` and logs it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamapool import errors
from llamapool.config import ModelSpec
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.lifecycle import MODEL_TRANSITIONS, ExitCause, ModelState, check
from llamapool.pool.memory import Footprint, estimate, fmt_bytes

if TYPE_CHECKING:
    from llamapool.pool.supervisor import Supervisor

log = logging.getLogger("llamapool.supervisor")


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
        """Forget past deaths (a fresh start: load, reload, retry)."""
        self.deaths.clear()


@dataclass(eq=False)
class ModelRuntime:
    """One model: its state, how many instances it wants, and the commands that change them."""

    spec: ModelSpec
    pool: Supervisor
    target: int
    flap: FlapPolicy
    state: ModelState = ModelState.STARTING
    reason: str | None = None  # why it FAILED; kept until it starts again
    failed_at: float = 0.0
    next_spawn_at: float = 0.0
    restarts: int = 0
    footprint: Footprint | None = None
    memory_blocked: str | None = None  # why the next instance does not fit, if it does not
    evicting: set = field(default_factory=set)  # worker ids draining to make room for us
    evictions: int = 0  # instances of this model evicted for others

    @property
    def id(self) -> str:
        """The model's id in the config."""
        return self.spec.id

    @property
    def unloaded(self) -> bool:
        """Unloaded by an operator (a view of `state`, for callers written before it)."""
        return self.state is ModelState.UNLOADED

    def set_state(self, state: ModelState, reason: str) -> None:
        """Change state if the lifecycle allows it (else IllegalTransition), and log why."""
        if state is self.state:
            return
        check(MODEL_TRANSITIONS, "model", self.id, self.state, state, reason)
        level = logging.ERROR if state is ModelState.FAILED else logging.INFO
        log.log(level, "model %s %s: %s", self.id, state.value, reason)
        self.state = state
        if state is ModelState.FAILED:
            self.reason, self.failed_at = reason, self.pool.clock()
        elif state is ModelState.STARTING:
            self.reason = None

    def refusal(self) -> errors.LlamapoolError | None:
        """Why this model cannot take a request in its state, or None when it can."""
        if self.state is ModelState.UNLOADED:
            return errors.ModelUnloaded(
                f"model {self.id!r} is unloaded; load it with POST /admin/models/{self.id}/load"
            )
        if self.state is ModelState.FAILED:
            return errors.ModelFailed(
                f"model {self.id!r} is failed: {self.reason}; fix it and reload the config"
            )
        if self.state is ModelState.REMOVED:
            return errors.ModelNotFound(f"model {self.id!r} was removed by a reload", param="model")
        return None

    def serving(self) -> list[WorkerHandle]:
        """Its live workers that are not on their way out."""
        return self.pool.serving(self.id)

    # -- what the supervisor tells it -------------------------------------------

    def worker_ready(self, w: WorkerHandle) -> None:
        """A worker of this model sent READY."""
        if self.state is ModelState.STARTING:
            self.set_state(ModelState.READY, f"worker {w.id} ready")

    def worker_died(self, w: WorkerHandle, cause: ExitCause, reason: str, now: float) -> None:
        """A worker of this model died unasked: count it, back off, or give up."""
        if self.state in (ModelState.FAILED, ModelState.UNLOADED, ModelState.REMOVED):
            return  # nothing is wanted of it: not a restart
        if cause is ExitCause.MODEL_FAILED:
            # Killed for an earlier failure and reaped only after a load or a retry: that
            # failure was counted already; this is no new death.
            return
        self.restarts += 1
        self.pool.observer.worker_restarted(self.id, cause)
        if cause is ExitCause.CANNOT_BOOT:
            self.fail(w.cause_detail or reason)
            return
        if self.flap.record(now):
            window = self.pool.settings.restart_window
            self.fail(f"{len(self.flap.deaths)} worker deaths within {window:g} s; last: {reason}")
            return
        self.next_spawn_at = now + self.flap.backoff()
        if self.state is ModelState.READY and not any(
            x.ready for x in self.pool.workers_of(self.id)
        ):
            self.set_state(ModelState.STARTING, f"no ready instance left ({reason})")

    def settle(self, reason: str) -> None:
        """STANDBY once no instance is wanted and none serves."""
        if self.state in (ModelState.STARTING, ModelState.READY):
            if self.target == 0 and not self.serving():
                self.set_state(ModelState.STANDBY, reason)

    def fail(self, reason: str) -> None:
        """Mark the model FAILED: kill its workers, fail its queue (on_model_failed)."""
        if self.state is ModelState.FAILED:
            return
        self.set_state(ModelState.FAILED, reason)
        for w in self.pool.workers_of(self.id):
            self.pool.kill(w, ExitCause.MODEL_FAILED, f"model {self.id} failed")
        self.pool.on_model_failed(self.id, reason)

    def reconcile(self, now: float) -> None:
        """Retry a FAILED model when its time has come; start an instance if one is missing."""
        retry = self.pool.settings.failed_retry_after
        if self.state is ModelState.FAILED and retry and now - self.failed_at >= retry:
            self.flap.clear()
            self._start(f"retrying after {retry:g} s FAILED ({self.reason})")
        if self.state is ModelState.FAILED or self.pool.stopping:
            return
        if len(self.serving()) < self.target and now >= self.next_spawn_at:
            if self.pool.make_room(self.id):
                self.pool.spawn(self.id)

    def refresh_footprint(self) -> None:
        """The memory estimate of the spec, from its file as it is now."""
        try:
            self.footprint = estimate(self.spec, gpu=self.pool.memory.vram is not None)
        except OSError as exc:
            log.warning("cannot estimate the memory of %s: %s", self.id, exc)

    # -- commands (admin API, signals, reload) ----------------------------------

    def want_instance(self) -> None:
        """Start the model on demand (an instance is wanted whenever a request waits)."""
        if self.target < 1:
            self._want(1, "a request arrived")
            self.reconcile(self.pool.clock())

    def ensure_capacity(self) -> None:
        """Start the model on demand; raise InsufficientMemory if no instance can fit now."""
        self.want_instance()
        if self.memory_blocked and not self.pool.workers_of(self.id):
            raise errors.InsufficientMemory(self.memory_blocked, retry_after=5)

    def scale(self, instances: int) -> None:
        """Set the instance count; down drains idle instances first, never cuts work."""
        spec = self.spec
        if self.state is ModelState.UNLOADED:
            raise errors.InvalidRequest(
                f"model {self.id!r} is unloaded; load it first "
                f"(POST /admin/models/{self.id}/load), then scale it",
                param="model",
            )
        if instances < spec.min_instances or instances > spec.instance_limit:
            raise errors.InvalidRequest(
                f"model {self.id!r} allows {spec.min_instances}..{spec.instance_limit} instances "
                f"(min_instances..max_instances); got {instances}",
                param="instances",
            )
        live = self.serving()
        if instances > len(live) and self.footprint is not None:
            fp = self.footprint
            needed = sum(fp.cost(len(live) + i) for i in range(instances - len(live)))
            budget = self.pool.memory.limit
            free = budget - self.pool.memory.used()
            if needed > free:
                raise errors.InsufficientMemory(
                    f"scaling {self.id} to {instances} needs ~{fmt_bytes(needed)} more but only "
                    f"{fmt_bytes(max(0, free))} of the {fmt_bytes(budget)} budget is free",
                    retry_after=5,
                )
            short = self.pool.memory.vram_shortfall(self, instances - len(live))
            if short is not None:
                raise errors.InsufficientMemory(
                    f"scaling {self.id} to {instances} needs ~{fmt_bytes(short.needed)} more "
                    f"VRAM on GPU {short.device} but only {fmt_bytes(max(0, short.free))} of "
                    f"its {fmt_bytes(short.limit)} gpu_memory_budget is free",
                    retry_after=5,
                )
        self._want(instances, f"scaled to {instances}")
        extra = len(live) - instances
        # Idle ones first (least recently used), then busy ones, which finish before exiting.
        for w in sorted(live, key=lambda w: (bool(w.in_flight), w.last_used))[: max(0, extra)]:
            self.pool.stop_gracefully(
                w, ExitCause.SCALED_DOWN, f"scaled {self.id} down to {instances}"
            )
        self.reconcile(self.pool.clock())
        self.settle(f"scaled to {instances}")

    def load(self) -> None:
        """Start an unloaded, FAILED or on-standby model: its min_instances (at least one).

        A model that is loaded and has instances is left as it is (its scale included).
        """
        if self.state not in (ModelState.UNLOADED, ModelState.FAILED) and self.serving():
            return
        self.restart(max(self.spec.min_instances, 1), "loaded by admin")

    def unload(self, force: bool) -> list[WorkerHandle]:
        """Stop every instance: drain them, or kill them with `force`; refuse requests."""
        self.target = 0
        how = "unloaded by admin (force)" if force else "unloaded by admin"
        self.set_state(ModelState.UNLOADED, how)
        workers = self.pool.workers_of(self.id)
        for w in workers:
            if force:
                self.pool.kill(w, ExitCause.UNLOADED, how)
            else:
                self.pool.stop_gracefully(w, ExitCause.UNLOADED, how)
        return workers

    def restart(self, target: int, reason: str) -> None:
        """A fresh start: clear failure and backoff, re-read the file's size, aim for `target`."""
        self.memory_blocked = None
        self.flap.clear()
        self.next_spawn_at = 0.0
        self.target = target
        self.refresh_footprint()  # the file may have been replaced (a FAILED model's fix)
        self._start(reason)
        self.reason = None
        self.reconcile(self.pool.clock())

    def replace_spec(self, spec: ModelSpec) -> None:
        """A changed model: drain the old instances, start new ones from the new spec.

        The instance count carries over within the new limits; an unloaded model stays
        unloaded (its next load uses the new spec).
        """
        for w in self.pool.workers_of(self.id):
            self.pool.stop_gracefully(w, ExitCause.RELOAD, "config changed (reload)")
        self.spec = spec
        if self.state is ModelState.UNLOADED:
            self.refresh_footprint()
            return
        target = min(max(self.target, spec.min_instances), spec.instance_limit)
        self.restart(target, "config changed (reload)")

    def remove(self) -> None:
        """Drain every instance; the model takes no more requests."""
        for w in self.pool.workers_of(self.id):
            self.pool.stop_gracefully(w, ExitCause.RELOAD, "removed from the config (reload)")
        self.target = 0
        self.set_state(ModelState.REMOVED, "removed from the config (reload)")

    def _want(self, target: int, reason: str) -> None:
        self.target = target
        if target > 0 and self.state is ModelState.STANDBY:
            self.set_state(ModelState.STARTING, reason)

    def _start(self, reason: str) -> None:
        self.set_state(ModelState.STARTING if self.target > 0 else ModelState.STANDBY, reason)
