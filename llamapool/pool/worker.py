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
as JSON in the LLAMAPOOL_WORKER_SPEC environment variable. Without `--data-fd` the
worker dials back over TCP (ipc.remote): its keys and token come in LLAMAPOOL_WORKER_WIRE.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
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
from llamapool.ipc.remote import WIRE_ENV, WireTicket, curve_keys, dial_data
from llamapool.ipc.sockets import dealer_socket
from llamapool.pool.batch import BatchEngine
from llamapool.pool.engine import Engine
from llamapool.pool.engine_io import DataSink, Inbox
from llamapool.pool.faults import FaultInjector
from llamapool.pool.llama_adapter import load_library
from llamapool.pool.prepare import chats_through_handler, is_broken_pipe
from llamapool.pool.widening import LOAD_EVERY, CoreLoad

log = logging.getLogger("llamapool.worker")

# Exit statuses the supervisor tells apart.
EXIT_OK = 0
EXIT_FATAL = 70
EXIT_CANNOT_BOOT = 78
EXIT_ORPHANED = 79

SPEC_ENV = "LLAMAPOOL_WORKER_SPEC"
_EVENTS = "inproc://engine-events"
_DIED = b"died"  # a notice from the engine thread to the I/O thread (see engine_io)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel SIGKILLs us the moment the router dies,
    # even after `kill -9` of the router. Heartbeat expiry is the fallback.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


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
        # Where the engine thread runs now (its cores, or more during a RESIZE's widening),
        # and how busy other work keeps them (read by the I/O thread every LOAD_EVERY).
        self.run_cores = set(self.cores)
        self.core_load = CoreLoad()
        # Read only once a RESIZE came: a pool without elastic threads never pays for it.
        self.reads_load = False
        self.interval = args.heartbeat_interval
        self.liveness = args.heartbeat_liveness
        self.ctx = zmq.Context()
        curve = None
        if args.data_fd is not None:
            self.data = socket.socket(fileno=args.data_fd)  # the engine thread's alone
        else:
            # Before READY can be sent: the router has this connection when READY comes.
            ticket = WireTicket.decode(os.environ.pop(WIRE_ENV))
            self.data = dial_data(ticket)
            curve = curve_keys(ticket)
        self.sock = dealer_socket(self.ctx, args.endpoint, self.worker_id, curve)
        self.events = self.ctx.socket(zmq.PAIR)
        self.events.bind(_EVENTS)
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
        # The threads alive before the engine thread starts (this one, ZeroMQ's) stay
        # unpinned; every later one is the engine's or llama.cpp's (OpenMP) and follows
        # the engine's cores on a RESIZE.
        self.io_tids = _thread_ids()

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
            self.send(P.Fatal(reason=reason, kind=P.FatalKind.CANNOT_BOOT))
            self.close()
            os._exit(EXIT_CANNOT_BOOT)
        self.send(
            P.Ready(
                worker_id=self.worker_id,
                pid=os.getpid(),
                model_id=self.spec.id,
                n_ctx=self.engine.n_ctx,
                capacity=self.engine.capacity,
                resizable=isinstance(self.engine, BatchEngine) and bool(self.cores),
            )
        )

    # -- engine thread ----------------------------------------------------------

    def _engine_main(self, booted: threading.Event) -> None:
        # Only this thread (and the threads llama.cpp starts from it) is pinned: the I/O
        # thread stays free to run on any core, so forwarding a token never waits for the
        # decode that holds this instance's core (measured: ~5 ms of TTFT when it did).
        try:
            # Before pinning: OpenMP sizes its spinning from the loading thread's cores, and
            # a decode widened onto lent cores needs all of them counted (load_library).
            load_library()
            if self.cores:
                os.sched_setaffinity(0, self.cores)
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
        inbox = Inbox(self, self.data)
        try:
            # The batching engine reads its inbox between steps: a step's CHUNKs go together.
            sink = DataSink(self, inbox, hold_chunks=isinstance(self.engine, BatchEngine))
            self.engine.serve(inbox, sink)  # type: ignore[arg-type]
            if not self.stopping:  # the data socket closed or broke under the engine
                raise RuntimeError("the data socket from the router closed")
        except BaseException as exc:  # noqa: BLE001 - reported as FATAL, then the worker exits
            reason = f"engine thread died: {exc!r}"
            if is_broken_pipe(exc):
                reason = f"broken pipe in generation: {exc!r}"
            traceback.print_exc()
            # On the data socket: the router must see it after this engine's last output.
            try:
                inbox.send(P.Fatal(reason=reason, kind=P.FatalKind.ENGINE_DIED))
            except OSError:
                pass
            self.notify(_DIED)
        finally:
            self.notices.close()

    def accept(self, msg: P.Request, inbox: Inbox) -> bool:
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

    def resize(self, msg: P.Resize, inbox: Inbox) -> None:
        """Run on `msg.cores` with `msg.n_threads` threads from the next decode (engine
        thread, between steps); confirm with what the kernel now reports."""
        cores = set(msg.cores)
        self.run_cores = cores
        self.reads_load = True
        for tid in _thread_ids() - self.io_tids:
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:  # a thread that has just ended
                pass
        self.engine.set_threads(msg.n_threads)  # type: ignore[union-attr]
        inbox.send(
            P.Resized(
                seq=msg.seq,
                cores=sorted(os.sched_getaffinity(0)),
                n_threads=self.engine.n_threads,  # type: ignore[union-attr]
            )
        )
        log.debug("worker %s: %d thread(s) on cores %s", self.worker_id, msg.n_threads, msg.cores)

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
        next_beat = next_load = time.monotonic()
        while True:
            now = time.monotonic()
            if self.reads_load and now >= next_load:
                foreign, since = self.core_load.read(self.run_cores)
                self.engine.widening.note_load(foreign, since)  # type: ignore[union-attr]
                next_load = now + LOAD_EVERY
            if now >= next_beat:
                self.seq += 1
                with self.active_lock:
                    busy = next(iter(self.active), None)
                cache = getattr(self.engine, "prompt_cache", None)  # BatchEngine's only
                self.send(
                    P.Heartbeat(
                        seq=self.seq,
                        busy_request=busy,
                        cache_bytes=cache.nbytes if cache is not None else 0,
                        cache_entries=len(cache) if cache is not None else 0,
                        decode_threads=getattr(self.engine, "decode_threads", 0),
                    )
                )
                next_beat = now + self.interval
                if os.getppid() != parent:
                    log.error("worker %s: router process is gone; exiting", self.worker_id)
                    return EXIT_ORPHANED
                stalled = self._engine_stalled(now)
                if stalled is not None:
                    log.error("worker %s: %s; exiting", self.worker_id, stalled)
                    self.send(P.Fatal(reason=stalled, kind=P.FatalKind.STALLED))
                    return EXIT_FATAL
                if now - router_seen > self.interval * self.liveness:
                    log.error(
                        "worker %s: no message from the router for %.1f s; exiting",
                        self.worker_id,
                        now - router_seen,
                    )
                    return EXIT_ORPHANED
            wake = min(next_beat, next_load) if self.reads_load else next_beat
            timeout_ms = max(0, int((wake - time.monotonic()) * 1000))
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


def _thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llamapool-worker")
    p.add_argument("--worker-id", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--data-fd", type=int, default=None)  # none: dial back over TCP
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
    try:
        worker = Worker(args, spec)
    except OSError as exc:  # the router's data listener refused or cannot be reached
        log.error("worker %s: cannot reach the router: %s", args.worker_id, exc)
        return EXIT_CANNOT_BOOT
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
