"""The engine thread's end of a worker's data socket: requests in, output frames out."""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import socket
import ssl
import time
from typing import TYPE_CHECKING

from llamapool.errors import ErrorCode
from llamapool.ipc import protocol as P
from llamapool.pool.prepare import Result

if TYPE_CHECKING:
    from llamapool.pool.worker import Worker

log = logging.getLogger("llamapool.worker")

# Told to the I/O thread when a request has ended (the router already has its frames).
FINISHED = b"finished"


class Inbox:
    """The engine thread's end of the data socket, read like the queue `serve` expects.

    `get` returns the next accepted REQUEST, or None once the worker is stopping (or the
    router's end is gone). CANCELs are applied as they are read; a REQUEST beyond the
    engine's capacity, or while draining, is refused with a retryable `worker_busy`.

    Frames `hold` queues (a batching step's CHUNKs) leave with the next `send` or `get`:
    the batching engine asks for work between decode steps, so one step's tokens cross
    in one write and wake the router once, not once per slot.
    """

    def __init__(self, worker: Worker, sock: socket.socket):
        self.worker = worker
        self.sock = sock
        self.reader = P.FrameReader()
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.poller.register(worker.wake_r, select.POLLIN)
        self.pending: collections.deque = collections.deque()
        self.pings = 0
        self.closed = False
        self.stop_said = False
        self.held = bytearray()

    def send(self, message: object) -> None:
        """Write `message` now, after the frames held so far."""
        if self.held:
            self.held += P.pack(message)
            self.flush()
        else:
            self.sock.sendall(P.pack(message))

    def hold(self, message: object) -> None:
        """Queue `message` until the next `send`, `get` or `flush`."""
        self.held += P.pack(message)

    def flush(self) -> None:
        """Write the frames held so far."""
        if self.held:
            data, self.held = self.held, bytearray()
            self.sock.sendall(data)

    def _read(self, timeout: float | None) -> bool:
        """Wait up to `timeout` (None: forever) for bytes or a stop; False if none came."""
        # poll, not select: the socket's descriptor number comes from the router's
        # process and may be over select's limit of 1024.
        tls = isinstance(self.sock, ssl.SSLSocket)
        if tls and self.sock.pending():
            ready = {self.sock.fileno()}  # TLS holds decrypted bytes the descriptor hides
        else:
            ready = {fd for fd, _ in self.poller.poll(None if timeout is None else timeout * 1000)}
        if self.worker.wake_r in ready:
            os.read(self.worker.wake_r, 64)
        if self.sock.fileno() not in ready:
            return bool(ready)
        try:
            # A blocking TLS socket (it takes no flags): the router writes whole records, so
            # a readable descriptor means a record is arriving and the wait is short.
            data = self.sock.recv(1 << 16) if tls else self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            self.closed = True  # the router's end is gone; the I/O thread notices too
            return True
        self.pending.extend(self.reader.feed(data))
        if self.reader.error is not None:
            log.error(
                "worker %s: protocol error on the data socket: %s",
                self.worker.worker_id,
                self.reader.error,
            )
            self.closed = True
        return True

    def get(self, block: bool = True) -> P.Request | None:
        self.flush()  # between steps: the last one's output goes before any wait
        while True:
            while self.pending:
                msg = self.pending.popleft()
                if isinstance(msg, P.Request):
                    if self.worker.accept(msg, self):
                        return msg
                elif isinstance(msg, P.Cancel):
                    self.worker.cancel(msg.request_id)
                elif isinstance(msg, P.Resize):
                    self.worker.resize(msg, self)
                elif isinstance(msg, P.Pong):
                    pass  # a PONG that came after its fault gave up waiting
                else:
                    log.error(
                        "worker %s: unexpected %s on the data socket", self.worker.worker_id, msg
                    )
            if self.closed or self.worker.stopping:
                # Like a queue's None sentinel: said once, then the queue is just empty.
                if block or not self.stop_said:
                    self.stop_said = True
                    return None
                raise queue.Empty
            if not self._read(None if block else 0) and not block:
                raise queue.Empty

    def get_nowait(self) -> P.Request | None:
        return self.get(block=False)

    def ping(self, timeout: float) -> None:
        """PING the router and read until its PONG (keeping anything else for `get`)."""
        self.pings += 1
        seq = self.pings
        self.send(P.Ping(seq=seq))
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            pong = next((m for m in self.pending if isinstance(m, P.Pong) and m.seq == seq), None)
            if pong is not None:
                self.pending.remove(pong)
                return
            self._read(max(0.0, deadline - time.monotonic()))


class DataSink:
    """The engine thread's output: every event becomes a frame on the data socket.

    With `hold_chunks` (an engine that reads its inbox between steps) CHUNKs wait for the
    step's end (`Inbox.hold`); DONE, ERROR and FATAL go at once, after them.
    """

    def __init__(self, worker: Worker, inbox: Inbox, *, hold_chunks: bool = False):
        self.worker = worker
        self.inbox = inbox
        self.faults = worker.faults
        self._chunk_out = inbox.hold if hold_chunks else inbox.send

    def start(self, request_id: str) -> None:
        self.faults.at_start()

    def chunk(
        self,
        request_id: str,
        text: str,
        tokens: int,
        logprobs: list[P.TokenLogprob] | None = None,
    ) -> None:
        self._chunk_out(P.Chunk(request_id=request_id, text=text, tokens=tokens, logprobs=logprobs))
        if self.faults.kind:
            self.faults.at_chunk(self.inbox)

    def flush(self) -> None:
        self.inbox.flush()

    def done(self, request_id: str, result: Result) -> None:
        self.worker.finished(request_id)
        done = P.Done(
            request_id=request_id,
            finish_reason=result.finish_reason,
            usage=result.usage,
            timings=result.timings,
            embeddings=result.embeddings,
        )
        try:
            self.inbox.send(done)
        except ValueError as exc:  # over the frame limit (a huge embedding batch); nothing sent
            self.inbox.send(
                P.Error(request_id=request_id, code=ErrorCode.GENERATION_FAILED, message=str(exc))
            )
        self.worker.notify(FINISHED)

    def error(
        self, request_id: str, code: ErrorCode, message: str, param: str | None = None
    ) -> None:
        self.worker.finished(request_id)
        self.inbox.send(P.Error(request_id=request_id, code=code, message=message, param=param))
        self.worker.notify(FINISHED)
