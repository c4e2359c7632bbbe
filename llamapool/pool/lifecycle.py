"""Why a worker process ended: one enum, the value of the log line and the metric label."""

from __future__ import annotations

import enum
import signal

from llamapool.pool.worker import EXIT_CANNOT_BOOT, EXIT_FATAL, EXIT_ORPHANED


class ExitCause(str, enum.Enum):
    """Why a worker stopped or died; the value is the `reason` label of the restart metric."""

    # Deaths the supervisor sees and acts on (it sends the SIGKILL).
    HEARTBEAT = "heartbeat"  # no message for heartbeat_interval × heartbeat_liveness
    BOOT_TIMEOUT = "boot_timeout"  # no READY within boot_timeout
    PROTOCOL = "protocol"  # a message out of order or that does not decode
    UNREACHABLE = "unreachable"  # a send to it failed
    MODEL_FAILED = "model_failed"  # its model was marked FAILED (never counted as a restart)
    # Deaths the worker reports itself, by FATAL and exit status.
    CANNOT_BOOT = "cannot_boot"  # exit 78: the model does not load; never respawned in a loop
    FATAL = "fatal"  # exit 70: the engine thread died (its FATAL on the data socket)
    STALL = "stall"  # exit 70 after the stall watchdog's FATAL on the control socket
    ORPHANED = "orphaned"  # exit 79: it lost the router
    # Deaths nobody in the pool asked for.
    SIGNAL = "signal"  # killed by a signal the supervisor did not send
    EXIT_CODE = "exit_code"  # any other exit status
    # Restarts asked for: the worker is drained, then replaced.
    MEMORY_LIMIT = "memory_limit"  # above max_worker_memory for several readings in a row
    ADMIN = "admin"  # POST /admin/workers/{id}/restart


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
