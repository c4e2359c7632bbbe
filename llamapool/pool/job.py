"""A client request inside the router: its lifecycle as one state enum with checked moves.

Like llama.cpp's slot states and vLLM's RequestStatus: every state a job can be in, the
moves allowed between them in one table, one setter that checks them, and the views the
scheduler asks for ("is it over?", "can it be retried unseen?") written once, as
functions of the state.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamapool import errors
from llamapool.ipc import protocol as P

if TYPE_CHECKING:
    from llamapool.pool.supervisor import WorkerHandle

Event = P.Chunk | P.Done | errors.LlamapoolError


class JobState(enum.Enum):
    """Where a job is; see TRANSITIONS for the moves between states."""

    QUEUED = "queued"  # in its model's queue (first, or again after a requeue)
    RUNNING = "running"  # on a worker; nothing of it has reached the client
    STREAMING = "streaming"  # on a worker; output went to the client, so it cannot be redone
    # On a worker, told to stop (its client left, or it ran past max_request_time); the
    # slot is free once the worker confirms. Nothing more goes to the client.
    CANCELLING = "cancelling"
    DONE = "done"  # ended with DONE, delivered
    FAILED = "failed"  # ended with an error, delivered
    CANCELLED = "cancelled"  # ended on the router's word: dropped from the queue or confirmed

    def is_finished(self) -> bool:
        """The job is over: no worker holds it and no event will follow."""
        return self in _FINISHED

    def can_cancel(self) -> bool:
        """A worker runs it and nobody has told that worker to stop it yet."""
        return self in _CANCELLABLE

    def can_requeue(self) -> bool:
        """Nothing of it has reached the client, so it can run again from scratch unseen."""
        return self is JobState.RUNNING

    def delivers(self) -> bool:
        """Its events still go to the client."""
        return self in _DELIVERS


_FINISHED = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
_CANCELLABLE = frozenset({JobState.RUNNING, JobState.STREAMING})
_DELIVERS = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.STREAMING})

S = JobState
# Every allowed move; anything else is a bug and raises InvalidTransition.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # dispatched; expired or failed in the queue (queue_timeout, model failed or removed);
    # dropped because its client left
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    # first output to a streaming client; requeued after a crash or a refusal; ended;
    # told to stop (client gone, time limit)
    S.RUNNING: frozenset({S.STREAMING, S.QUEUED, S.DONE, S.FAILED, S.CANCELLING}),
    S.STREAMING: frozenset({S.DONE, S.FAILED, S.CANCELLING}),
    # the worker confirmed (its DONE or its error), or died
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
del S


class InvalidTransition(RuntimeError):
    """A job was moved between states that TRANSITIONS does not connect (a bug)."""


@dataclass(eq=False)
class Job:
    """One client request from admission to its last event."""

    id: str
    model_id: str
    request: P.Request
    # True: output goes to the client as it comes. False (non-streamed): an attempt's
    # output is held until its DONE, so a crash mid-way can be retried unseen.
    stream: bool = True
    enqueued_at: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    attempts: int = 0  # requeues so far
    worker: WorkerHandle | None = None
    dispatched_at: float | None = None
    # The queue_timeout timer while queued, the max_request_time timer while on a worker.
    timer: asyncio.TimerHandle | None = None
    served_by: str | None = None  # "worker-id pid" of the last worker it was sent to
    first_output_at: float | None = None  # of the current attempt
    held: list[P.Chunk] = field(default_factory=list)  # a non-streamed attempt's output
    prefix_key: str = ""  # the request's text in prompt order, for prompt-cache affinity
    _state: JobState = JobState.QUEUED

    @property
    def state(self) -> JobState:
        return self._state

    def move(self, new: JobState) -> None:
        """Change state; raise InvalidTransition for a move TRANSITIONS does not allow."""
        if new not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"job {self.id}: {self._state.name} → {new.name}")
        self._state = new
