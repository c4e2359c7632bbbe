"""Test-only faults at exact points of a request (LLAMAPOOL_TEST_FAULT); never set in production."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamapool.pool.engine_io import Inbox

FAULT_ENV = "LLAMAPOOL_TEST_FAULT"
FAULT_FILE_ENV = "LLAMAPOOL_TEST_FAULT_FILE"
# How long a fault waits for the router to confirm it has the output before firing.
_ACK_TIMEOUT_MS = 10_000


class FaultInjector:
    """Test-only faults at exact points of a request, counted across respawns in a file.

    LLAMAPOOL_TEST_FAULT="<kind>:<times>" with kind one of `crash_before_output`
    (the process dies as a request starts), `broken_pipe` (EPIPE from the token
    sink after the first chunk), `segfault` (SIGSEGV after the first chunk) or `stall`
    (the engine thread blocks forever after the first chunk, as a wedged decode would).
    """

    def __init__(self) -> None:
        spec = os.environ.get(FAULT_ENV, "")
        kind, _, times = spec.partition(":")
        self.kind = kind or None
        self.times = int(times or 1)
        self.file = os.environ.get(FAULT_FILE_ENV)

    def fire(self, point: str) -> bool:
        """True (and counted) if the configured fault should happen at `point` now."""
        wanted = {
            "crash_before_output": "start",
            "broken_pipe": "chunk",
            "segfault": "chunk",
            "stall": "chunk",
        }.get(self.kind or "")
        if wanted != point or not self.file:
            return False
        with open(self.file, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() >= self.times:
                return False
            fh.write(b"x")
        return True

    def at_start(self) -> None:
        if self.fire("start"):
            os.kill(os.getpid(), signal.SIGKILL)

    def at_chunk(self, inbox: Inbox) -> None:
        """Fire an "after output" fault, once the router confirms it has that output."""
        if not self.fire("chunk"):
            return
        # Without the router's PONG, a crash here could kill the router's reader
        # before it took the CHUNK, and the request would look output-free.
        inbox.ping(_ACK_TIMEOUT_MS / 1000)
        if self.kind == "broken_pipe":
            raise BrokenPipeError(errno.EPIPE, "Broken pipe (injected)")
        if self.kind == "segfault":
            ctypes.string_at(0)
        if self.kind == "stall":
            threading.Event().wait()
