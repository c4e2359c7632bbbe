"""The lifecycles of the pool: a model's, a worker's, and why a worker ended.

Each lifecycle is one enum with its allowed transitions in one table; the supervisor
and the model runtimes change state only through `check`, which refuses the rest.
Causes are an enum too: the log line, /admin/pool's history and the restart metric's
`reason` label all take `ExitCause.value`.
"""

from __future__ import annotations

import enum
import signal

from llamapool.ipc import protocol as P
from llamapool.pool.transitions import IllegalTransition, check  # noqa: F401 (re-exported)
from llamapool.pool.worker import EXIT_CANNOT_BOOT, EXIT_FATAL, EXIT_ORPHANED


class ModelState(str, enum.Enum):
    """A model as /ready, /v1/models, /admin/pool, /metrics and admission see it."""

    STARTING = "STARTING"  # instances wanted, none ready yet
    READY = "READY"  # an instance has served READY since it (re)started
    STANDBY = "STANDBY"  # no instance wanted or left; the first request starts one
    UNLOADED = "UNLOADED"  # an operator unloaded it: requests refused until a load
    FAILED = "FAILED"  # cannot boot, or crash-looped; refused until retried or loaded
    REMOVED = "REMOVED"  # gone from the config by a reload; its workers drain


class WorkerState(str, enum.Enum):
    """One worker process, from spawn to reap."""

    STARTING = "STARTING"  # spawned, loading its model; no READY yet
    IDLE = "IDLE"  # READY, nothing in flight
    BUSY = "BUSY"  # at least one request in flight
    DRAINING = "DRAINING"  # told to finish its requests and exit; takes no new work
    KILLING = "KILLING"  # SIGKILL sent; takes no new work; awaiting the reap
    EXITED = "EXITED"  # reaped; what it wrote before it went is being read
    STOPPED = "STOPPED"  # ended because the pool asked (see ExitCause.asked)
    DEAD = "DEAD"  # ended any other way


_M = ModelState
MODEL_TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    _M.STARTING: frozenset({_M.READY, _M.STANDBY, _M.UNLOADED, _M.FAILED, _M.REMOVED}),
    _M.READY: frozenset({_M.STARTING, _M.STANDBY, _M.UNLOADED, _M.FAILED, _M.REMOVED}),
    _M.STANDBY: frozenset({_M.STARTING, _M.UNLOADED, _M.FAILED, _M.REMOVED}),
    _M.UNLOADED: frozenset({_M.STARTING, _M.REMOVED}),
    _M.FAILED: frozenset({_M.STARTING, _M.STANDBY, _M.UNLOADED, _M.REMOVED}),
    _M.REMOVED: frozenset(),
}

_W = WorkerState
WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    _W.STARTING: frozenset({_W.IDLE, _W.DRAINING, _W.KILLING, _W.EXITED}),
    _W.IDLE: frozenset({_W.BUSY, _W.DRAINING, _W.KILLING, _W.EXITED}),
    _W.BUSY: frozenset({_W.IDLE, _W.DRAINING, _W.KILLING, _W.EXITED}),
    _W.DRAINING: frozenset({_W.KILLING, _W.EXITED}),
    _W.KILLING: frozenset({_W.EXITED}),
    _W.EXITED: frozenset({_W.STOPPED, _W.DEAD}),
    _W.STOPPED: frozenset(),
    _W.DEAD: frozenset(),
}

# Workers whose process exists (or may): counted for cores, memory and shutdown.
LIVE = frozenset({_W.STARTING, _W.IDLE, _W.BUSY, _W.DRAINING, _W.KILLING})
# Workers that serve: READY and not on their way out.
SERVING = frozenset({_W.IDLE, _W.BUSY})


class ExitCause(str, enum.Enum):
    """Why a worker ended; the value is the log's word and the restart metric's label."""

    # Deaths the supervisor sees and acts on (it sends the SIGKILL).
    HEARTBEAT = "heartbeat"  # no message for heartbeat_interval × heartbeat_liveness
    BOOT_TIMEOUT = "boot_timeout"  # no READY within boot_timeout
    PROTOCOL = "protocol"  # a message out of order or that does not decode
    UNREACHABLE = "unreachable"  # a send to it failed
    MODEL_FAILED = "model_failed"  # its model was marked FAILED (never counted as a restart)
    # Deaths the worker reports itself, by FATAL and exit status.
    CANNOT_BOOT = "cannot_boot"  # exit 78: the model does not load; never respawned in a loop
    FATAL = "fatal"  # exit 70: the engine thread died (FATAL engine_died)
    STALL = "stall"  # exit 70: the stall watchdog gave up on the engine (FATAL stalled)
    ORPHANED = "orphaned"  # exit 79: it lost the router
    # Deaths nobody in the pool asked for.
    SIGNAL = "signal"  # killed by a signal the supervisor did not send
    EXIT_CODE = "exit_code"  # any other exit status
    # Restarts asked for: the worker is drained, then replaced; counted as restarts.
    MEMORY_LIMIT = "memory_limit"  # above max_worker_memory for several readings in a row
    ADMIN = "admin"  # POST /admin/workers/{id}/restart
    # Stops asked for: not restarts.
    SCALED_DOWN = "scaled_down"  # its model's instance count went down
    EVICTED = "evicted"  # idle, least recently used, stopped to make room for another model
    UNLOADED = "unloaded"  # its model was unloaded by an operator
    RELOAD = "reload"  # its model changed or was removed by a config reload
    SHUTDOWN = "shutdown"  # the pool is shutting down

    @property
    def asked(self) -> bool:
        """The pool asked for this end: the worker ends STOPPED, not DEAD."""
        return self in _ASKED


_ASKED = frozenset(
    {
        ExitCause.MEMORY_LIMIT,
        ExitCause.ADMIN,
        ExitCause.SCALED_DOWN,
        ExitCause.EVICTED,
        ExitCause.UNLOADED,
        ExitCause.RELOAD,
        ExitCause.SHUTDOWN,
    }
)


def cause_of_exit(code: int, known: ExitCause | None = None) -> ExitCause:
    """Why a worker exited with `code`, given the cause already `known` (a kill, a FATAL).

    Exit 78 is the worker's own verdict that its model cannot load and wins; otherwise
    what was known before the exit is more precise than the status (a SIGKILL we sent).
    """
    if code == EXIT_CANNOT_BOOT:
        return ExitCause.CANNOT_BOOT
    if known is not None:
        return known
    if code < 0:
        return ExitCause.SIGNAL
    return {
        EXIT_FATAL: ExitCause.FATAL,
        EXIT_ORPHANED: ExitCause.ORPHANED,
    }.get(code, ExitCause.EXIT_CODE)


def fatal_cause(kind: P.FatalKind) -> ExitCause:
    """The cause a worker's FATAL names."""
    return _FATAL_CAUSES[kind]


_FATAL_CAUSES = {
    P.FatalKind.CANNOT_BOOT: ExitCause.CANNOT_BOOT,
    P.FatalKind.ENGINE_DIED: ExitCause.FATAL,
    P.FatalKind.STALLED: ExitCause.STALL,
}


def describe_exit(code: int) -> str:
    """An exit status in words: `killed by SIGKILL`, `exit 78 (cannot boot)`."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {
        EXIT_CANNOT_BOOT: "exit 78 (cannot boot)",
        EXIT_FATAL: "exit 70 (fatal error)",
        EXIT_ORPHANED: "exit 79 (lost the router)",
    }.get(code, f"exit {code}")
