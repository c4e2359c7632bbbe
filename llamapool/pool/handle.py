"""The router's view of one worker process (circus's Process): its state, load and history."""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llamapool.pool.launcher import ProcessHandle
from llamapool.pool.lifecycle import SERVING, ExitCause, WorkerState
from llamapool.pool.memory import Sample


@dataclass(eq=False)
class WorkerHandle:
    """One worker: its process, its state (changed only by the Supervisor), its requests."""

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
    # Prefix keys of the requests it served, most recent first, as many as its slots and its
    # RAM prompt cache hold states: what it most likely has cached (the scheduler's affinity).
    recent_prefixes: deque = field(default_factory=deque)
    cache_bytes: int = 0  # its RAM prompt cache, as its last heartbeat said
    cache_entries: int = 0
    decode_threads: int = 0  # from its last heartbeat (elastic threads; 0: unknown)
    # Why it is ending, once known (a kill, a drain, its own FATAL), and in words.
    cause: ExitCause | None = None
    cause_detail: str | None = None
    ended_from: WorkerState | None = None  # the state it was in when its end began
    history: deque = field(default_factory=lambda: deque(maxlen=20))  # (time, state, reason)
    memory: Sample | None = None
    gpu: int | None = None  # the one GPU it sees (the model's `gpus`); None: it sees them all
    vram: dict[int, int] | None = None  # bytes on each GPU as NVML last reported its process
    channel: Any = None  # the DataChannel the broker wraps around `data`

    @property
    def pid(self) -> int:
        """The process id its launcher reports."""
        return self.process.pid

    @property
    def data(self) -> socket.socket | None:
        """The router's end of the worker's data socket (requests in, tokens out)."""
        return self.process.data

    @property
    def identity(self) -> bytes:
        """Its ZeroMQ identity on the router's control socket."""
        return self.id.encode()

    @property
    def ready(self) -> bool:
        """READY and not on its way out: it takes requests."""
        return self.state in SERVING

    @property
    def leaving(self) -> bool:
        """The pool asked it to go (drained, scaled down, evicted...): it is not replaced."""
        return self.cause is not None and self.cause.asked

    @property
    def free_slots(self) -> int:
        """How many more requests it takes now."""
        return self.capacity - len(self.in_flight) if self.ready else 0
