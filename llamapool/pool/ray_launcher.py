"""Workers on a Ray cluster: Ray places and hosts today's worker process; tokens never
pass through Ray.

`RayLauncher` joins the cluster (`placement.address`) and starts, per worker, a small
actor (`pool/ray_host.py`: `num_cpus` = the worker's threads, the model's resources and
label selector, not detached, `max_restarts=0`). The actor makes the worker's secrets on
its node and hands back only its public key and its token's hash, which the router's
wire admits; then it starts the worker, which dials the router over TCP (CURVE control,
TLS data) exactly as a local `transport: tcp` worker does. `RayProcess` is that worker
as the supervisor sees it: its pid and node once known, its exit status once the actor
reports it, and a SIGKILL that also kills the actor.

Heartbeats stay the death detector (interval × liveness), long before Ray declares a
node dead (15-50 s): a SIGKILL that no node confirms within `KILL_CONFIRM` seconds counts
as done, so a lost node's workers are reaped, their requests requeued and their
replacements placed at once. Imported only with `placement.backend: ray`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import threading
import time
import warnings
from typing import Any

import msgspec
import ray
from ray.exceptions import RayActorError, RayTaskError

from llamapool.config import ModelPlacement, PlacementSettings
from llamapool.ipc.remote import RemoteWire
from llamapool.pool.launcher import WorkerLaunch, worker_args, worker_env
from llamapool.pool.lifecycle import check
from llamapool.pool.memory import Sample
from llamapool.pool.ray_host import WorkerHost, versions
from llamapool.pool.worker import EXIT_CANNOT_BOOT

log = logging.getLogger("llamapool.ray")

# Seconds a SIGKILL may go unconfirmed before the worker counts as gone (its node lost or
# frozen). A healthy node confirms in well under this.
KILL_CONFIRM = 1.0
# Test hooks (fault injection, the tag that finds leftover processes) reach workers on
# Ray nodes as they reach local ones; nothing else of the router's environment does.
_FORWARDED_PREFIX = "LLAMAPOOL_TEST_"


def node_address() -> str:
    """This machine's address as Ray's nodes see it: where workers dial back by default."""
    return ray.util.get_node_ip_address()


class HostState(str, enum.Enum):
    """A worker's host actor, from creation to the worker's exit."""

    PLACING = "PLACING"  # actor asked for: waiting for a node with room, then its secrets
    STARTING = "STARTING"  # its key admitted; the worker process is being started
    RUNNING = "RUNNING"  # the worker process runs (pid and cores known)
    KILLED = "KILLED"  # SIGKILL sent to the worker and ray.kill to the actor
    EXITED = "EXITED"  # exit status known, or presumed after KILL_CONFIRM


_H = HostState
HOST_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    _H.PLACING: frozenset({_H.STARTING, _H.KILLED, _H.EXITED}),
    _H.STARTING: frozenset({_H.RUNNING, _H.KILLED, _H.EXITED}),
    _H.RUNNING: frozenset({_H.KILLED, _H.EXITED}),
    _H.KILLED: frozenset({_H.EXITED}),
    _H.EXITED: frozenset(),
}


class RayProcess:
    """One worker on a Ray node, as the supervisor sees it (a ProcessHandle)."""

    def __init__(
        self, worker_id: str, actor: Any, wire: RemoteWire, loop: asyncio.AbstractEventLoop
    ):
        self.worker_id = worker_id
        self.actor = actor
        self.wire = wire
        self.loop = loop
        self.pid = 0  # until the actor reports it
        self.node: str | None = None  # Ray node id, once placed
        self.node_ip: str | None = None
        self.cores: list[int] = []  # on its node, picked there
        self.data = None  # the worker dials back (ipc.remote)
        self.state = HostState.PLACING
        self.code: int | None = None
        self.reason: str | None = None  # why it ended, when the worker itself could not say
        self.node_available: int | None = None  # its node's available memory, last sampled
        self.task: asyncio.Task | None = None
        self._sample: Sample | None = None
        self._sampling = False
        self._kill_deadline = float("inf")
        self._lock = threading.RLock()  # terminate_all signals and waits from a thread
        self._exited = threading.Event()

    @property
    def where(self) -> str:
        return f"node {self.node_ip} ({self.node[:8]})" if self.node else "no node yet"

    def _move(self, state: HostState, reason: str, level: int = logging.INFO) -> None:
        with self._lock:
            check(HOST_TRANSITIONS, "ray host of worker", self.worker_id, self.state, state, reason)
            self.state = state
        log.log(level, "worker %s host %s: %s", self.worker_id, state.value, reason)

    def _exit(self, code: int, reason: str | None) -> None:
        with self._lock:
            if self.state is HostState.EXITED:
                return
            self.code, self.reason = code, reason
            self._move(HostState.EXITED, reason or f"status {code}", logging.DEBUG)
            self._exited.set()

    async def run(
        self,
        router: str,
        wanted: dict[str, str],
        args: list[str],
        env: dict[str, str],
        n_threads: int,
    ) -> None:
        """Prepare → admit its key → start → wait, one step per actor call."""
        try:
            info = await self.actor.prepare.remote(router, wanted)
            if self.state is not HostState.PLACING:
                return  # killed while placed
            self.node, self.node_ip = info["node_id"], info["node_ip"]
            self.wire.admit(self.worker_id, info["public_key"], info["token_sha256"])
            self._move(HostState.STARTING, f"placed on {self.where}")
            started = await self.actor.start.remote(args, env, n_threads)
            if self.state is not HostState.STARTING:
                return  # killed meanwhile: the actor's death takes the worker (PDEATHSIG)
            self.pid, self.cores = started["pid"], started["cores"]
            self._move(HostState.RUNNING, f"pid {self.pid} on {self.where}, cores {self.cores}")
            code = await self.actor.wait.remote()
            self._exit(code, None)
        except RayTaskError as exc:  # one of the host's methods raised: this node cannot host it
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._exit(EXIT_CANNOT_BOOT, str(cause))
        except RayActorError as exc:
            if self.state is HostState.KILLED:
                self._exit(-signal.SIGKILL, None)
            else:
                self._exit(
                    -signal.SIGKILL, f"its Ray actor on {self.where} died: {_first_line(exc)}"
                )
        except asyncio.CancelledError:
            self._exit(-signal.SIGKILL, "the launcher closed")
            raise
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises ends this worker, not the loop
            log.exception("worker %s: Ray host failed", self.worker_id)
            self._exit(-signal.SIGKILL, f"its Ray host failed: {exc!r}")
        finally:
            if self.state is HostState.EXITED:
                ray.kill(self.actor, no_restart=True)  # frees its CPUs; a no-op once dead

    # -- ProcessHandle ---------------------------------------------------------------

    def poll(self) -> int | None:
        """Its exit status once known; after an unconfirmed SIGKILL, -9 at the deadline."""
        with self._lock:
            if self.state is HostState.KILLED and time.monotonic() >= self._kill_deadline:
                self._exit(
                    -signal.SIGKILL,
                    f"no word from {self.where} {KILL_CONFIRM:g} s after SIGKILL; presumed gone",
                )
            return self.code

    def signal_group(self, sig: int) -> None:
        """Signal the worker's group through its actor; SIGKILL kills the actor as well."""
        with self._lock:
            state = self.state
            if state is HostState.EXITED:
                return
            if sig == signal.SIGKILL and state is not HostState.KILLED:
                self._move(HostState.KILLED, f"SIGKILL to the worker and its actor on {self.where}")
                self._kill_deadline = time.monotonic() + KILL_CONFIRM
        if state in (HostState.RUNNING, HostState.KILLED):
            self.actor.signal.remote(sig)
        if sig == signal.SIGKILL:
            ray.kill(self.actor, no_restart=True)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            left = 0.1 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.worker_id} still running after {timeout} s")
            # Woken by the exit; the short cap lets poll() see a kill's deadline pass.
            self._exited.wait(min(left, 0.1))

    def memory(self) -> Sample | None:
        """The last sample its actor took (PSS on its node), and a fresh one requested."""
        if self.state is HostState.RUNNING and not self._sampling:
            self._sampling = True
            asyncio.run_coroutine_threadsafe(self._sample_memory(), self.loop)
        return self._sample if self.state is HostState.RUNNING else None

    async def _sample_memory(self) -> None:
        try:
            m = await self.actor.memory.remote()
        except Exception:  # noqa: BLE001 - a gone actor has no memory to report
            m = None
        finally:
            self._sampling = False
        if m is not None:
            self._sample = Sample(rss=m["rss"], pss=m["pss"])
            self.node_available = m["available"]


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class RayLauncher:
    """Starts each worker in its own Ray actor on whichever node Ray picks."""

    def __init__(self, placement: PlacementSettings, wire: RemoteWire):
        self.wire = wire
        with warnings.catch_warnings():
            # Ray warns about a change of its GPU env var defaults; not ours to act on.
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(
                address=placement.address,
                namespace="llamapool",
                logging_level=logging.WARNING,
                log_to_driver=True,  # the workers' logs come to the router's
            )
        self.host = ray.remote(WorkerHost)
        self.versions = versions()
        self.processes: list[RayProcess] = []
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info(
            "joined the Ray cluster at %s: %d node(s), %g CPUs",
            placement.address,
            len(nodes),
            sum(n["Resources"].get("CPU", 0) for n in nodes),
        )

    def start(self, launch: WorkerLaunch) -> RayProcess:
        """Create the worker's actor; the rest happens on the loop (RayProcess.run)."""
        loop = asyncio.get_running_loop()
        options = actor_options(launch.spec.config.n_threads or 1, launch.spec.placement)
        actor = self.host.options(**options).remote()
        process = RayProcess(launch.worker_id, actor, self.wire, loop)
        env = worker_env(launch)
        env.update({k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIX)})
        router = msgspec.json.encode(self.wire.address()).decode()
        process.task = loop.create_task(
            process.run(
                router, self.versions, worker_args(launch), env, launch.spec.config.n_threads or 1
            )
        )
        self.processes = [p for p in self.processes if p.state is not HostState.EXITED]
        self.processes.append(process)
        wanted = ", ".join(
            f"{k}={v}" for k, v in options.items() if k not in ("max_restarts", "max_task_retries")
        )
        log.debug("worker %s host PLACING: actor asked for %s", launch.worker_id, wanted)
        return process

    def close(self) -> None:
        """Stop following the actors (the supervisor has reaped their workers); leave Ray."""
        for p in self.processes:
            if p.task is not None:
                p.task.cancel()
        ray.shutdown()


def actor_options(n_threads: int, placement: ModelPlacement | None) -> dict[str, Any]:
    """The host actor's Ray options: the worker's CPUs, the model's resources and labels."""
    p = placement or ModelPlacement()
    options: dict[str, Any] = {"num_cpus": n_threads, "max_restarts": 0, "max_task_retries": 0}
    if p.num_gpus:
        options["num_gpus"] = p.num_gpus
    if p.resources:
        options["resources"] = dict(p.resources)
    if p.labels:
        options["label_selector"] = dict(p.labels)
    return options
