"""Worker subprocess: a control socket, a data socket, one Llama, two threads.

The main (I/O) thread owns the ZeroMQ DEALER control socket: it sends READY and
heartbeats, takes CANCEL (to stop a decode in progress) and SHUTDOWN, and watches for the
router's death, so heartbeats keep flowing during a long prompt evaluation. The engine
thread owns the data socket, one end of a socket pair the supervisor created: it reads
REQUEST and CANCEL from it and writes CHUNK, DONE, ERROR and its own FATAL to it. A
request and its first token each cross one socket and wake one thread; through ZeroMQ
each crossing woke four (both sides' I/O threads, the worker's main thread, the engine).
An inproc PAIR socket tells the I/O thread when a request has finished or the engine
has died.

Run as `python -m llamapool.pool.worker` by the supervisor; the model spec comes
as JSON in the LLAMAPOOL_WORKER_SPEC environment variable.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback

import msgspec
import zmq

from llamapool.config import ModelSpec
from llamapool.errors import ErrorCode
from llamapool.ipc import protocol as P
from llamapool.ipc.sockets import dealer_socket
from llamapool.pool.batch import BatchEngine
from llamapool.pool.engine import Engine
from llamapool.pool.prepare import Result, chats_through_handler, is_broken_pipe

log = logging.getLogger("llamapool.worker")

# Exit statuses the supervisor tells apart.
EXIT_OK = 0
EXIT_FATAL = 70
EXIT_CANNOT_BOOT = 78
EXIT_ORPHANED = 79

SPEC_ENV = "LLAMAPOOL_WORKER_SPEC"
# Test-only fault injection (see FaultInjector); never set in production.
FAULT_ENV = "LLAMAPOOL_TEST_FAULT"
FAULT_FILE_ENV = "LLAMAPOOL_TEST_FAULT_FILE"
_EVENTS = "inproc://engine-events"
# Notices from the engine thread to the I/O thread (the router already has the frames).
_FINISHED = b"finished"
_DIED = b"died"
# How long a fault waits for the router to confirm it has the output before firing.
_ACK_TIMEOUT_MS = 10_000


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel SIGKILLs us the moment the router dies,
    # even after `kill -9` of the router. Heartbeat expiry is the fallback.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


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

    def at_chunk(self, inbox: _Inbox) -> None:
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


class _Inbox:
    """The engine thread's end of the data socket, read like the queue `serve` expects.

    `get` returns the next accepted REQUEST, or None once the worker is stopping (or the
    router's end is gone). CANCELs are applied as they are read; a REQUEST beyond the
    engine's capacity, or while draining, is refused with a retryable `worker_busy`.
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

    def send(self, message: object) -> None:
        self.sock.sendall(P.pack(message))

    def _read(self, timeout: float | None) -> bool:
        """Wait up to `timeout` (None: forever) for bytes or a stop; False if none came."""
        # poll, not select: the socket's descriptor number comes from the router's
        # process and may be over select's limit of 1024.
        ready = {fd for fd, _ in self.poller.poll(None if timeout is None else timeout * 1000)}
        if self.worker.wake_r in ready:
            os.read(self.worker.wake_r, 64)
        if self.sock.fileno() not in ready:
            return bool(ready)
        try:
            data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
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
        while True:
            while self.pending:
                msg = self.pending.popleft()
                if isinstance(msg, P.Request):
                    if self.worker.accept(msg, self):
                        return msg
                elif isinstance(msg, P.Cancel):
                    self.worker.cancel(msg.request_id)
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


class _Sink:
    """The engine thread's output: every event becomes a frame on the data socket."""

    def __init__(self, worker: Worker, inbox: _Inbox):
        self.worker = worker
        self.inbox = inbox
        self.faults = worker.faults

    def start(self, request_id: str) -> None:
        self.faults.at_start()

    def chunk(self, request_id: str, text: str, tokens: int) -> None:
        self.inbox.send(P.Chunk(request_id=request_id, text=text, tokens=tokens))
        if self.faults.kind:
            self.faults.at_chunk(self.inbox)

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
        self.worker.notify(_FINISHED)

    def error(
        self, request_id: str, code: ErrorCode, message: str, param: str | None = None
    ) -> None:
        self.worker.finished(request_id)
        self.inbox.send(P.Error(request_id=request_id, code=code, message=message, param=param))
        self.worker.notify(_FINISHED)


def make_engine(spec: ModelSpec) -> Engine | BatchEngine:
    """A batching engine for text generation; the one-at-a-time engine for the rest."""
    cfg = spec.config
    if cfg.embedding or chats_through_handler(cfg):
        if cfg.n_parallel > 1:
            raise ValueError(
                f"chat_format {cfg.chat_format!r} runs through llama-cpp-python's own handler, "
                "one request at a time; set n_parallel: 1"
            )
        return Engine(spec)
    return BatchEngine(spec)


class Worker:
    """The I/O side of a worker: socket, heartbeats, request bookkeeping."""

    def __init__(self, args: argparse.Namespace, spec: ModelSpec):
        self.args = args
        self.spec = spec
        self.worker_id = args.worker_id
        self.cores = {int(c) for c in args.cores.split(",")} if args.cores else set()
        self.interval = args.heartbeat_interval
        self.liveness = args.heartbeat_liveness
        self.ctx = zmq.Context()
        self.sock = dealer_socket(self.ctx, args.endpoint, self.worker_id)
        self.events = self.ctx.socket(zmq.PAIR)
        self.events.bind(_EVENTS)
        self.data = socket.socket(fileno=args.data_fd)  # the engine thread's alone
        self.wake_r, self.wake_w = os.pipe()  # the I/O thread wakes an idle engine to stop
        self.stopping = False
        # Requests the engine accepted and has not finished: both threads read it (the
        # heartbeat, the stall watchdog, CANCEL), only the engine thread changes it.
        self.active: set[str] = set()
        self.active_lock = threading.Lock()
        self.notices: zmq.Socket | None = None  # the engine thread's end of `events`
        self.busy_since = 0.0  # when `active` last became non-empty
        self.draining = False
        self.seq = 0
        self.faults = FaultInjector()

    def send(self, message: object) -> None:
        self.sock.send_multipart(P.encode(message))

    def boot(self) -> None:
        """Load the model; on failure tell the router why and exit 'cannot boot'."""
        booted = threading.Event()
        self.boot_error: BaseException | None = None
        self.engine_thread = threading.Thread(
            target=self._engine_main, args=(booted,), name="engine", daemon=True
        )
        self.engine_thread.start()
        booted.wait()
        if self.boot_error is not None:
            reason = f"cannot load {self.spec.config.model_path}: {self.boot_error}"
            log.error("worker %s: %s", self.worker_id, reason)
            self.send(P.Fatal(reason=reason, cannot_boot=True))
            self.close()
            os._exit(EXIT_CANNOT_BOOT)
        self.send(
            P.Ready(
                worker_id=self.worker_id,
                pid=os.getpid(),
                model_id=self.spec.id,
                n_ctx=self.engine.n_ctx,
                capacity=self.engine.capacity,
            )
        )

    # -- engine thread ----------------------------------------------------------

    def _engine_main(self, booted: threading.Event) -> None:
        # Only this thread (and the threads llama.cpp starts from it) is pinned: the I/O
        # thread stays free to run on any core, so forwarding a token never waits for the
        # decode that holds this instance's core (measured: ~5 ms of TTFT when it did).
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        try:
            self.engine = make_engine(self.spec)
        except BaseException as exc:  # noqa: BLE001 - any loader failure is a boot failure
            self.boot_error = exc
            return
        finally:
            booted.set()
        self._engine_loop()

    def _engine_loop(self) -> None:
        self.notices = self.ctx.socket(zmq.PAIR)
        self.notices.setsockopt(zmq.LINGER, 0)
        self.notices.connect(_EVENTS)
        inbox = _Inbox(self, self.data)
        try:
            self.engine.serve(inbox, _Sink(self, inbox))  # type: ignore[arg-type]
            if not self.stopping:  # the data socket closed or broke under the engine
                raise RuntimeError("the data socket from the router closed")
        except BaseException as exc:  # noqa: BLE001 - reported as FATAL, then the worker exits
            reason = f"engine thread died: {exc!r}"
            if is_broken_pipe(exc):
                reason = f"broken pipe in generation: {exc!r}"
            traceback.print_exc()
            # On the data socket: the router must see it after this engine's last output.
            try:
                inbox.send(P.Fatal(reason=reason))
            except OSError:
                pass
            self.notify(_DIED)
        finally:
            self.notices.close()

    def accept(self, msg: P.Request, inbox: _Inbox) -> bool:
        """Take a request (engine thread), or refuse it when full or draining."""
        with self.active_lock:
            accepted = len(self.active) < self.engine.capacity and not self.draining
            if accepted:
                if not self.active:
                    self.busy_since = time.monotonic()
                self.active.add(msg.request_id)
            else:
                busy = sorted(self.active)
        if not accepted:
            why = "draining" if self.draining else f"busy with {busy}"
            inbox.send(
                P.Error(
                    request_id=msg.request_id,
                    code=ErrorCode.WORKER_BUSY,
                    message=f"worker {self.worker_id} is {why}",
                    retryable=True,
                )
            )
        return accepted

    def cancel(self, request_id: str) -> None:
        """Stop a request the engine has (either thread); an unknown one has ended."""
        with self.active_lock:
            if request_id in self.active:
                self.engine.cancel(request_id)

    def finished(self, request_id: str) -> None:
        """A request has ended (engine thread): its slot is free from now on."""
        with self.active_lock:
            self.active.discard(request_id)
            self.engine.forget(request_id)

    def stop_accepting(self, drain: bool) -> bool:
        """SHUTDOWN (I/O thread): refuse new work; True when the worker may exit now.

        With `drain` the worker first lets the requests it has run to their end.

        Under the lock that `accept` takes: a request that reached the engine just before
        the SHUTDOWN (they travel on different sockets) is either in `active` already, and
        the worker waits for it, or is refused as `worker_busy` and goes elsewhere.
        """
        with self.active_lock:
            self.draining = True
            return not drain or not self.active

    # The old name, still called by tests/test_channel.py (not this change's file).
    begin_drain = stop_accepting

    def stop_engine(self) -> None:
        """Let the engine thread return once it is idle (I/O thread)."""
        self.stopping = True
        os.write(self.wake_w, b"x")

    def notify(self, notice: bytes) -> None:
        """Wake the I/O thread (engine thread); a no-op once the I/O thread has left."""
        assert self.notices is not None
        try:
            self.notices.send(notice, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # -- I/O thread -------------------------------------------------------------

    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        parent = self.args.parent_pid
        router_seen = time.monotonic()
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self.seq += 1
                with self.active_lock:
                    busy = next(iter(self.active), None)
                self.send(P.Heartbeat(seq=self.seq, busy_request=busy))
                next_beat = now + self.interval
                if os.getppid() != parent:
                    log.error("worker %s: router process is gone; exiting", self.worker_id)
                    return EXIT_ORPHANED
                stalled = self._engine_stalled(now)
                if stalled is not None:
                    log.error("worker %s: %s; exiting", self.worker_id, stalled)
                    self.send(P.Fatal(reason=stalled))
                    return EXIT_FATAL
                if now - router_seen > self.interval * self.liveness:
                    log.error(
                        "worker %s: no message from the router for %.1f s; exiting",
                        self.worker_id,
                        now - router_seen,
                    )
                    return EXIT_ORPHANED
            timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000))
            for sock, _ in poller.poll(timeout_ms):
                if sock is self.sock:
                    router_seen = time.monotonic()
                    code = self._read_control()
                else:
                    code = self._read_notices()
                if code is not None:
                    return code

    def _engine_stalled(self, now: float) -> str | None:
        """Why the engine counts as wedged (busy, and silent past the stall timeout), or None."""
        if not self.active:
            return None
        # An engine that just woke from idle has not stamped its progress yet.
        silent = now - max(self.engine.progress_at, self.busy_since)
        if silent <= self.args.stall_timeout:
            return None
        return (
            f"engine made no progress for {silent:.0f} s with {len(self.active)} request(s) "
            f"(engine_stall_timeout {self.args.stall_timeout:g} s)"
        )

    def _read_control(self) -> int | None:
        """Handle every message waiting on the control socket; an exit status to stop."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                msg = P.decode(frames)
            except P.ProtocolError as exc:
                log.error("worker %s: protocol error from router: %s", self.worker_id, exc)
                continue
            if isinstance(msg, P.Cancel):
                # The engine reads its own copy between steps; this one stops a decode.
                self.cancel(msg.request_id)
            elif isinstance(msg, P.Shutdown):
                if self.stop_accepting(msg.drain):
                    return EXIT_OK
            # RouterHeartbeat needs nothing beyond the liveness bookkeeping.

    def _read_notices(self) -> int | None:
        while True:
            try:
                notice = self.events.recv(zmq.NOBLOCK)
            except zmq.Again:
                return None
            if notice == _DIED:
                return EXIT_FATAL
            if self.draining and not self.active:
                return EXIT_OK

    def close(self) -> None:
        """Close the sockets, giving queued frames (a FATAL, a last DONE) a moment to leave."""
        self.sock.close(linger=1000)
        self.events.close(linger=0)
        # term() waits for the engine thread's socket too; never wait on it for long.
        closer = threading.Thread(target=self.ctx.term, daemon=True)
        closer.start()
        closer.join(1.0)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llamapool-worker")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--data-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--cores", default="")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-liveness", type=int, default=5)
    p.add_argument("--stall-timeout", type=float, default=120.0)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker[{args.worker_id}] %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent()
    if os.getppid() != args.parent_pid:
        return EXIT_ORPHANED
    # SIGTERM from the supervisor: leave at once (no graceful stop here).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_OK))
    spec = msgspec.json.decode(os.environ[SPEC_ENV].encode(), type=ModelSpec)
    worker = Worker(args, spec)
    worker.boot()
    code = worker.run()
    worker.stop_engine()  # lets an idle engine thread close its socket, so close() is quick
    worker.close()
    # os._exit: llama.cpp's destructors and a daemon engine thread mid-decode
    # must not hold the exit up.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
