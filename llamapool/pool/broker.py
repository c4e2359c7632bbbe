"""The router's side of the pool: one ROUTER socket, the supervisor and the scheduler.

Runs inside the router's asyncio loop: a reader callback on the socket's file descriptor
routes worker messages as they arrive, and a tick task drives supervision and
router → worker heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import IO, Any

import zmq

from llamapool import errors
from llamapool.config import Config, ModelSpec
from llamapool.ipc import protocol as P
from llamapool.ipc.channel import DataChannel
from llamapool.ipc.remote import RemoteWire
from llamapool.ipc.sockets import broker_endpoint, make_ipc_dir, remove_ipc_dir, router_socket
from llamapool.pool import status as views
from llamapool.pool.events import PoolObserver
from llamapool.pool.handle import WorkerHandle
from llamapool.pool.launcher import Launcher, LocalLauncher
from llamapool.pool.lifecycle import ExitCause, WorkerState, fatal_cause
from llamapool.pool.reload import apply_reload, read_config
from llamapool.pool.scheduler import Job, Scheduler
from llamapool.pool.supervisor import Supervisor

log = logging.getLogger("llamapool.broker")

TICK = 0.1
# Messages handled per wake-up before the loop gets a turn.
_READ_BATCH = 256


class Broker:
    """Everything the HTTP layer needs from the pool: submit, release, status."""

    def __init__(
        self,
        config: Config,
        *,
        log_level: str = "INFO",
        worker_log: IO | None = None,
        observer: PoolObserver | None = None,
        launcher: Launcher | None = None,
    ):
        self.config = config
        self.ipc_dir = make_ipc_dir()
        self.endpoint = broker_endpoint(self.ipc_dir)
        # A plain socket read from a loop reader: with zmq.asyncio's future per receive
        # the router's routing overhead at concurrency 1 was ~0.7 ms higher (bench p50).
        self.ctx = zmq.Context()
        self.wire: RemoteWire | None = None
        self.launcher: Launcher | None = None  # one this broker made, closed at stop
        if config.placement.transport == "tcp":
            self._open_wire()
            launcher = launcher or self._own_launcher(worker_log)
        else:
            self.sock = router_socket(self.ctx, self.endpoint)
        self.supervisor = Supervisor(
            config.pool,
            self.endpoint,
            on_worker_lost=self._on_worker_lost,
            on_worker_ready=self._on_worker_ready,
            on_model_failed=self._on_model_failed,
            on_drain=lambda w: self.send(w, P.Shutdown(drain=True)),
            on_spawned=self._attach,
            on_resize=self._send_resize,
            on_reclaimed=self._release_held,
            observer=observer,
            log_level=log_level,
            worker_log=worker_log,
            launcher=launcher,
        )
        self.scheduler = Scheduler(
            self.supervisor, self.send, max_requeues=config.pool.max_requeues, observer=observer
        )
        self.protocol_errors = 0
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_scheduled = False
        self._closed = False
        self._hb_seq = 0
        self._next_hb = 0.0
        # Requests and cancels for a worker reclaiming its cores, in order, until the
        # borrower has given them back (supervisor.cores).
        self._held: dict[str, list[Any]] = {}
        for spec in config.models.values():
            self._add_model(spec)
        for model_id, reason in config.broken.items():
            log.error("model %s is not served: %s", model_id, reason)

    def _open_wire(self) -> None:
        """Workers dial back over TCP: a CURVE ROUTER socket and a TLS data listener."""
        p = self.config.placement
        host = p.advertise_host or "127.0.0.1"
        if p.backend == "ray" and p.advertise_host is None:
            from llamapool.pool.ray_launcher import node_address  # only with ray

            host = node_address()
        self.wire = RemoteWire(self.ctx, self.ipc_dir, host, p.data_port)
        port = p.port or "*"
        self.sock = router_socket(self.ctx, f"tcp://{host}:{port}", self.wire.server_secret)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info(
            "workers dial back over TCP: control %s (CURVE, server key %s), data %s:%d (TLS)",
            self.endpoint,
            self.wire.server_public.decode(),
            host,
            self.wire.data_port,
        )

    def _own_launcher(self, worker_log: IO | None) -> Launcher:
        """The launcher the placement block names, for workers that dial back."""
        assert self.wire is not None
        if self.config.placement.backend == "ray":
            from llamapool.pool.ray_launcher import RayLauncher  # ray is an optional extra

            self.launcher = RayLauncher(self.config.placement, self.wire)
        else:
            self.launcher = LocalLauncher(worker_log, wire=self.wire)
        return self.launcher

    def _add_model(self, spec: ModelSpec) -> None:
        self.supervisor.add_model(spec)
        self.scheduler.add_model(spec)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.supervisor.tick()
        self._loop.add_reader(self.sock.getsockopt(zmq.FD), self._read_control)
        if self.wire is not None:
            self.wire.start(self._loop, self._on_dialed)
        self._tasks = [asyncio.create_task(self._tick_loop(), name="broker-tick")]

    async def stop(self, grace: float | None = None) -> None:
        """Drain workers politely, then SIGTERM, then SIGKILL; close the socket."""
        self.scheduler.accepting = False
        grace = self.config.pool.grace if grace is None else grace
        asked = self.supervisor.stop_all("pool shutting down")
        # Only workers that were told to drain get the grace; booting ones are terminated.
        deadline = time.monotonic() + grace
        while any(w.process.poll() is None for w in asked) and time.monotonic() < deadline:
            await asyncio.sleep(TICK)
        self.supervisor.reap(time.monotonic())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Stop reading before the workers are terminated in a thread: a message handled
        # now would dispatch over the worker table that thread is changing.
        if self._loop is not None:
            self._loop.remove_reader(self.sock.getsockopt(zmq.FD))
        for w in self.supervisor.workers.values():
            if w.channel is not None:
                w.channel.close()
        await asyncio.to_thread(self.supervisor.terminate_all, 3.0)
        if self.launcher is not None:
            self.launcher.close()
        self._closed = True
        if self.wire is not None:
            self.wire.close()
        self.sock.close(linger=0)
        self.ctx.term()
        remove_ipc_dir(self.ipc_dir)

    async def _tick_loop(self) -> None:
        interval = self.config.pool.heartbeat_interval
        while True:
            try:
                now = time.monotonic()
                self.supervisor.tick(now)
                if now >= self._next_hb:
                    self._next_hb = now + interval
                    self._hb_seq += 1
                    for w in self.supervisor.live_workers():
                        # Not to one booting (it waits for nothing) or being killed.
                        if w.ready or w.state is WorkerState.DRAINING:
                            self.send(w, P.RouterHeartbeat(seq=self._hb_seq))
                # Belt and braces for the edge-triggered descriptor: never let a message wait.
                self._read_control()
            except Exception:
                log.exception("supervisor tick failed")
            await asyncio.sleep(TICK)

    # -- messages ---------------------------------------------------------------

    def send(self, worker: WorkerHandle, message: Any) -> bool:
        """Send to one worker; False when it is unreachable.

        Requests travel on the data socket, straight to the engine thread. A CANCEL goes
        on both: the engine reads its copy in order with the requests, the I/O thread's
        copy stops a decode in progress. The rest is control traffic on ZeroMQ.
        """
        if self._closed:
            return False
        if isinstance(message, P.Request | P.Cancel):
            if self.supervisor.cores.holds(worker.id):
                self._held.setdefault(worker.id, []).append(message)
                return True
            if worker.channel is None or not worker.channel.send(message):
                return False
            if isinstance(message, P.Request):
                return True
        try:
            self.sock.send_multipart([worker.identity, *P.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # Expected for a worker that is exiting and not yet reaped.
            level = logging.DEBUG if not worker.ready else logging.WARNING
            log.log(level, "send to worker %s failed: %s", worker.id, exc)
            return False
        finally:
            # ZMQ_FD is edge-triggered and any operation on the socket may consume its
            # edge: look for input that arrived meanwhile, or it would wait for the next.
            if not self._read_scheduled and self._loop is not None:
                if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._read_scheduled = True
                    self._loop.call_soon(self._read_control)
        return True

    def _send_resize(self, worker: WorkerHandle, resize: Any) -> None:
        """New cores and threads, on the data socket: applied at the worker's next step."""
        if worker.channel is not None:
            msg = P.Resize(seq=resize.seq, cores=resize.cores, n_threads=resize.n_threads)
            worker.channel.send(msg)  # a worker gone by now is reaped; nothing to undo

    def _release_held(self, worker: WorkerHandle) -> None:
        """The worker's cores are its own again: what waited for them goes, in order."""
        for message in self._held.pop(worker.id, []):
            if not self.send(worker, message):
                self.supervisor.kill(worker, ExitCause.UNREACHABLE, "unreachable on its socket")
                return

    def _read_control(self) -> None:
        """Handle every message waiting on the socket (the loop's reader callback)."""
        self._read_scheduled = False
        for _ in range(_READ_BATCH):
            try:
                if self.wire is None:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                else:
                    frames = self._read_authenticated()
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed during shutdown
            if frames is None:
                continue
            try:
                self._handle(frames)
            except Exception:
                log.exception("failed to handle a worker message")
        # More is waiting: let HTTP handlers run first, then come back for it.
        if self._loop is not None:
            self._read_scheduled = True
            self._loop.call_soon(self._read_control)

    def _read_authenticated(self) -> list[bytes] | None:
        """A control message over CURVE, or None when its key is not its identity's.

        A worker holding a valid key must not speak for another worker: the ZAP User-Id
        of each message (the sender's CURVE key) must be the one issued to the worker its
        ZeroMQ identity names. Costs ~20 µs a message, and only control travels here.
        """
        assert self.wire is not None
        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        user_id = frames[0].get("User-Id")
        identity = frames[0].bytes.decode(errors="replace")
        if self.wire.owner_of(user_id) != identity:
            self.wire.refused += 1
            log.warning(
                "refused a control message: identity %s sent with the CURVE key of %s",
                identity,
                self.wire.owner_of(user_id) or "no live worker",
            )
            return None
        return [f.bytes for f in frames]

    def _handle(self, frames: list[bytes]) -> None:
        """A control message from a worker's ZeroMQ socket."""
        identity, body = frames[0].decode(errors="replace"), frames[1:]
        worker = self.supervisor.workers.get(identity)
        if worker is None:
            self.scheduler.dropped_replies += 1
            return
        self.supervisor.heard_from(worker)
        try:
            msg = P.decode(body)
        except P.ProtocolError as exc:
            self._protocol_violation(worker, str(exc))
            return
        if isinstance(msg, P.Chunk | P.Done | P.Error | P.Ping):
            self._protocol_violation(worker, f"{type(msg).__name__} on the control socket")
        else:
            self._on_message(worker, msg)

    def _attach(self, worker: WorkerHandle) -> None:
        """Read a newly spawned worker's data socket from the loop."""
        if worker.data is not None:  # else it dials back: _on_dialed
            self._open_channel(worker, worker.data)

    def _on_dialed(self, worker_id: str, tls: ssl.SSLSocket) -> None:
        """A worker's data connection, its token checked by the wire."""
        worker = self.supervisor.workers.get(worker_id)
        if worker is None or worker.channel is not None or worker.process.poll() is not None:
            log.warning("data connection of worker %s closed: the worker is gone", worker_id)
            tls.close()
            return
        self._open_channel(worker, tls)

    def _open_channel(self, worker: WorkerHandle, sock: socket.socket) -> None:
        assert self._loop is not None
        worker.channel = DataChannel(
            self._loop,
            sock,
            lambda msg: self._on_data(worker, msg),
            lambda why: self._protocol_violation(worker, why),
        )

    def _on_data(self, worker: WorkerHandle, msg: Any) -> None:
        """A message from a worker's data socket: its engine's output."""
        self.supervisor.heard_from(worker)
        if isinstance(msg, P.Ping):
            # Everything the engine sent before its PING has been handled: say so.
            worker.channel.send(P.Pong(seq=msg.seq))
        elif isinstance(msg, P.Resized):
            self.supervisor.note_resized(worker, msg.seq, msg.cores, msg.n_threads)
        elif isinstance(msg, P.Chunk | P.Done | P.Error | P.Fatal):
            self._on_message(worker, msg)
        else:
            self._protocol_violation(worker, f"{type(msg).__name__} on the data socket")

    def _on_message(self, worker: WorkerHandle, msg: Any) -> None:
        if isinstance(msg, P.Ready):
            if worker.state in (WorkerState.DRAINING, WorkerState.KILLING):
                return  # stopped or killed while booting; its end is under way
            if worker.state is not WorkerState.STARTING or msg.worker_id != worker.id:
                self._protocol_violation(worker, "READY out of order")
                return
            self.supervisor.mark_ready(worker, msg.capacity, msg.n_ctx, msg.resizable)
        elif worker.state is WorkerState.STARTING and not isinstance(msg, P.Fatal):
            self._protocol_violation(worker, f"{type(msg).__name__} before READY")
        elif isinstance(msg, P.Chunk):
            self.scheduler.on_chunk(worker, msg)
        elif isinstance(msg, P.Done):
            self.scheduler.on_done(worker, msg)
        elif isinstance(msg, P.Error):
            self.scheduler.on_error(worker, msg)
        elif isinstance(msg, P.Fatal):
            cause = fatal_cause(msg.kind)
            self.supervisor.note_fatal(worker, cause, msg.reason)
        elif isinstance(msg, P.Heartbeat):
            worker.cache_bytes, worker.cache_entries = msg.cache_bytes, msg.cache_entries
            worker.decode_threads = msg.decode_threads
        else:
            self._protocol_violation(worker, f"unexpected {type(msg).__name__}")

    def _protocol_violation(self, worker: WorkerHandle, what: str) -> None:
        self.protocol_errors += 1
        log.error("worker %s: protocol error (%s); restarting it", worker.id, what)
        self.supervisor.kill(worker, ExitCause.PROTOCOL, f"protocol error: {what}")

    # -- supervisor callbacks ---------------------------------------------------

    def _on_worker_ready(self, worker: WorkerHandle) -> None:
        self.scheduler.dispatch(worker.model_id)

    def _on_worker_lost(self, worker: WorkerHandle, reason: str) -> None:
        self._held.pop(worker.id, None)  # its jobs are requeued or failed below
        if worker.channel is not None:
            # The supervisor has read what the worker wrote before it went.
            worker.channel.close()
        if self.wire is not None:
            self.wire.revoke(worker.id)
        self.scheduler.on_worker_lost(worker, reason)

    def _on_model_failed(self, model_id: str, reason: str) -> None:
        self.scheduler.on_model_failed(model_id, reason)

    # -- what the HTTP layer uses -----------------------------------------------

    def check_model(self, model_id: str) -> ModelSpec:
        """The spec of a servable model, or the error naming why it cannot serve."""
        runtime = self.supervisor.models.get(model_id)
        if runtime is not None:
            return runtime.spec
        if model_id in self.config.broken:
            raise errors.ModelFailed(
                f"model {model_id!r} is not served: {self.config.broken[model_id]}"
            )
        refusal = self.supervisor.refusal(model_id)
        assert refusal is not None  # an unknown model is always refused
        raise refusal

    def submit(
        self, model_id: str, request: P.Request, *, stream: bool = True, expires: bool = True
    ) -> Job:
        self.check_model(model_id)
        return self.scheduler.submit(model_id, request, stream=stream, expires=expires)

    def release(self, job: Job) -> None:
        self.scheduler.release(job)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether every model has its min_instances up, with per-model detail (status.ready)."""
        return views.ready(self.supervisor, self.scheduler, self.config.broken)

    # -- operations (admin API, signals and CLI use the same functions) ---------

    def _runtime(self, model_id: str):
        runtime = self.supervisor.models.get(model_id)
        if runtime is None:
            self.check_model(model_id)  # raises the right error
        return runtime

    def scale(self, model_id: str, instances: int) -> dict[str, Any]:
        self._runtime(model_id)
        self.supervisor.scale(model_id, instances)
        return self.model_status(model_id)

    def load(self, model_id: str) -> dict[str, Any]:
        self._runtime(model_id)
        self.supervisor.load(model_id)
        return self.model_status(model_id)

    async def unload(self, model_id: str, *, force: bool = False) -> dict[str, Any]:
        """Stop a model's instances; without `force`, wait for running requests to finish."""
        self._runtime(model_id)
        workers = self.supervisor.unload(model_id, force)
        self.scheduler.fail_queued(
            model_id, errors.ModelUnloaded(f"model {model_id!r} was unloaded by an operator")
        )
        deadline = time.monotonic() + self.config.pool.grace + 5
        while any(w.process.poll() is None for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(TICK)
        self.supervisor.reap(time.monotonic())
        if model_id not in self.supervisor.models:  # a reload removed it meanwhile
            raise errors.ModelNotFound(
                f"model {model_id!r} was removed by a reload while it unloaded", param="model"
            )
        return self.model_status(model_id)

    def restart_worker(self, worker_id: str) -> dict[str, Any]:
        w = self.supervisor.restart_worker(worker_id)
        return self.worker_status(w)

    def reload(self, path: str | None = None) -> dict[str, Any]:
        """The one reload (POST /admin/reload, `llamapool reload`, SIGHUP): re-read
        models.yaml and apply it; models and API keys take effect at once.

        Unchanged models keep their workers, changed ones are replaced, removed ones
        drained, added ones started. A file with any error is rejected whole and changes
        nothing.
        """
        new = read_config(path or self.config.path)
        plan = apply_reload(new, self.config, self.supervisor, self.scheduler)
        # The API keys come with `new`; the restart-only blocks stay as they started.
        new.pool, new.server, new.admin = self.config.pool, self.config.server, self.config.admin
        new.placement = self.config.placement
        self.config = new
        result = plan.summary()
        log.info("config reloaded: %s", result)
        return result

    # -- status views (pool/status.py) --------------------------------------------

    def worker_status(self, w: WorkerHandle) -> dict[str, Any]:
        """One worker for /admin/pool."""
        return views.worker_status(self.supervisor, w)

    def model_status(self, model_id: str) -> dict[str, Any]:
        """One model for /admin/pool and the admin commands' replies."""
        return views.model_status(self.supervisor, self.scheduler, model_id)

    def status(self) -> dict[str, Any]:
        """The whole pool, for GET /admin/pool."""
        return views.pool_status(self.supervisor, self.scheduler, self.config.broken)

    def metrics_snapshot(self) -> list[dict[str, Any]]:
        """Gauges for /metrics."""
        return views.metrics_snapshot(self.supervisor, self.scheduler)

    def gpu_snapshot(self) -> list[dict[str, Any]]:
        """Per-GPU gauges for /metrics; none without VRAM accounting."""
        return views.gpu_status(self.supervisor) or []
