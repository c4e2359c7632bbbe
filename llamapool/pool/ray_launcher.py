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
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import msgspec
import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llamapool.config import ModelSpec, PlacementSettings
from llamapool.ipc.remote import RemoteWire
from llamapool.pool.launcher import NodeRoom, WorkerLaunch, worker_args, worker_env
from llamapool.pool.memory import Sample
from llamapool.pool.ray_host import WorkerHost, versions
from llamapool.pool.ray_placement import actor_options, demand, fitting_nodes, pick_node
from llamapool.pool.transitions import check
from llamapool.pool.worker import EXIT_CANNOT_BOOT

log = logging.getLogger("llamapool.ray")

# Seconds a SIGKILL may go unconfirmed before the worker counts as gone (its node lost or
# frozen). A healthy node confirms in well under this.
KILL_CONFIRM = 1.0
# Seconds between asks to an actor Ray calls unavailable (its node unreachable for now).
UNAVAILABLE_RETRY = 0.5
# After a SIGKILL its node never confirmed, no new worker goes to that node for this long:
# Ray still counts it alive (and may place there) until its health checks give up.
SUSPECT_FOR = 60.0
# Seconds a reading of ray.nodes() (a GCS call) serves the memory budget's questions.
NODES_TTL = 1.0
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
        self,
        worker_id: str,
        actor: Any,
        wire: RemoteWire,
        loop: asyncio.AbstractEventLoop,
        on_node_lost: Callable[[str], None] = lambda node: None,
        kill_actor: Callable[[Any], None] = lambda actor: ray.kill(actor, no_restart=True),
    ):
        self.worker_id = worker_id
        self.actor = actor
        self.wire = wire
        self.loop = loop
        self.on_node_lost = on_node_lost
        self.kill_actor = kill_actor
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
        self.options: dict[str, Any] = {}  # its actor's Ray options (what it holds there)
        self.model_id = ""
        self._sample: Sample | None = None
        self._sampling = False
        self._lock = threading.RLock()  # terminate_all signals and waits from a thread
        self._exited = threading.Event()

    @property
    def where(self) -> str:
        if self.node is None:
            return "no node yet"
        return f"node {self.node_ip} ({self.node[:8]})" if self.node_ip else f"node {self.node[:8]}"

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
            self._exit(await self._wait_for_exit(), None)
        except RayTaskError as exc:  # one of the host's methods raised: this node cannot host it
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self._exit(EXIT_CANNOT_BOOT, str(cause))
        except RayActorError as exc:
            if self.state is not HostState.KILLED:  # else _kill settles how it ended
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
                self.kill_actor(self.actor)  # frees its CPUs; a no-op once dead

    async def _wait_for_exit(self) -> int:
        """The worker's exit status, through Ray blips: an actor that is unreachable for
        now may come back, and heartbeats (not Ray) decide when the worker is lost."""
        while True:
            try:
                return await self.actor.wait.remote()
            except ActorUnavailableError as exc:
                if self.state is HostState.KILLED:
                    raise
                log.debug("worker %s: host unreachable, asking again: %s", self.worker_id, exc)
                await asyncio.sleep(UNAVAILABLE_RETRY)

    # -- ProcessHandle ---------------------------------------------------------------

    def poll(self) -> int | None:
        """Its exit status once known (for a SIGKILL: confirmed, or presumed)."""
        return self.code

    def signal_group(self, sig: int) -> None:
        """Signal the worker's group through its actor. SIGKILL (and any signal before the
        worker runs: there is nothing to stop politely) also ends the actor; see _kill."""
        with self._lock:
            state = self.state
            if state is HostState.EXITED or state is HostState.KILLED:
                return
            if state in (HostState.PLACING, HostState.STARTING):
                sig = signal.SIGKILL
            if sig == signal.SIGKILL:
                self._move(HostState.KILLED, f"SIGKILL to the worker and its actor on {self.where}")
        if sig == signal.SIGKILL:
            asyncio.run_coroutine_threadsafe(self._kill(state is HostState.RUNNING), self.loop)
        else:
            self.actor.signal.remote(sig)

    async def _kill(self, running: bool) -> None:
        """SIGKILL the worker's group and wait up to KILL_CONFIRM s for its node to say it
        did; then kill the actor. Unconfirmed, the worker counts as gone and its node as
        lost: heartbeats found it silent and its node does not answer either."""
        confirmed = not running
        if running:
            try:
                await asyncio.wait_for(self.actor.signal.remote(signal.SIGKILL), KILL_CONFIRM)
                confirmed = True
            except (asyncio.TimeoutError, RayError):
                pass
        self.kill_actor(self.actor)
        if confirmed:
            self._exit(-signal.SIGKILL, None)
            return
        self._exit(-signal.SIGKILL, f"no word from {self.where} {KILL_CONFIRM:g} s after SIGKILL")
        if self.node is not None:
            self.on_node_lost(self.node)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; TimeoutError after `timeout` seconds."""
        if not self._exited.wait(timeout):
            raise TimeoutError(f"worker {self.worker_id} still running after {timeout} s")
        assert self.code is not None
        return self.code

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
        _check_reachable(placement.address)
        # ray.init makes SIGTERM sys.exit(15) (and its C++ core logs a "crash" on it); the
        # router's own graceful stop must keep it (drain, then exit 0).
        sigterm = signal.getsignal(signal.SIGTERM)
        with warnings.catch_warnings():
            # Ray warns about a change of its GPU env var defaults; not ours to act on.
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(
                address=placement.address,
                namespace="llamapool",
                logging_level=logging.WARNING,
                log_to_driver=True,  # the workers' logs come to the router's
            )
        signal.signal(signal.SIGTERM, sigterm)
        self.host = ray.remote(WorkerHost)
        self.versions = versions()
        self.processes: list[RayProcess] = []
        self.suspects: dict[str, float] = {}  # node id → until when no worker goes there
        self._nodes_cache: list[dict[str, Any]] = []
        self._nodes_at = float("-inf")
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info(
            "joined the Ray cluster at %s: %d node(s), %g CPUs",
            placement.address,
            len(nodes),
            sum(n["Resources"].get("CPU", 0) for n in nodes),
        )

    def nodes_for(self, spec: ModelSpec) -> list[NodeRoom]:
        """Live nodes, lost ones excepted, where one more worker of `spec` fits Ray's
        resources now (less what this router's actors hold), in `fitting_nodes` order:
        what each offers workers (Ray's `memory`) and had available at its last sample."""
        self._forget_old_suspects()
        options = actor_options(spec.config.n_threads or 1, spec.placement)
        siblings: dict[str, int] = {}
        for p in self.processes:
            if p.model_id == spec.id and p.node is not None and p.state is not HostState.EXITED:
                siblings[p.node] = siblings.get(p.node, 0) + 1
        fits = fitting_nodes(self._nodes(), options, self._held(), set(self.suspects), siblings)
        return [
            NodeRoom(n["NodeID"], int(n["Resources"].get("memory", 0)), self._available(n))
            for n in fits
        ]

    def _nodes(self) -> list[dict[str, Any]]:
        """ray.nodes(), at most NODES_TTL seconds old: a blocked model asks every tick."""
        now = time.monotonic()
        if now - self._nodes_at > NODES_TTL:
            self._nodes_cache, self._nodes_at = ray.nodes(), now
        return self._nodes_cache

    def _available(self, node: dict[str, Any]) -> int | None:
        samples = [
            p.node_available
            for p in self.processes
            if p.node == node["NodeID"] and p.node_available is not None
        ]
        return samples[-1] if samples else None

    def _forget_old_suspects(self) -> None:
        now = time.monotonic()
        self.suspects = {n: t for n, t in self.suspects.items() if t > now}

    def start(self, launch: WorkerLaunch) -> RayProcess:
        """Create the worker's actor; the rest happens on the loop (RayProcess.run)."""
        loop = asyncio.get_running_loop()
        self._forget_old_suspects()
        options = actor_options(
            launch.spec.config.n_threads or 1, launch.spec.placement, avoid=list(self.suspects)
        )
        if launch.node is not None:
            # The node the memory budget chose (soft: should Ray's view differ, it places
            # the worker elsewhere, and the next samples count it there).
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(launch.node, soft=True)
        elif self.suspects:
            # Ray's GCS may still lease the actor on a lost node (its pick ignores label
            # selectors until a raylet re-checks, and a frozen raylet never answers): seen
            # here as a replacement stuck for 30 s. Name a live node with room instead.
            node = pick_node(ray.nodes(), options, self._held(), set(self.suspects))
            if node is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        actor = self.host.options(**options).remote()
        process = RayProcess(launch.worker_id, actor, self.wire, loop, self.node_lost)
        process.options, process.model_id = options, launch.spec.id
        process.node = launch.node  # counted there while it boots; prepare says where it is
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
        asked = ("num_", "res", "label", "sched")
        wanted = ", ".join(f"{k}={v}" for k, v in options.items() if k.startswith(asked))
        log.debug("worker %s host PLACING: actor asked for %s", launch.worker_id, wanted)
        return process

    def _held(self) -> dict[str, dict[str, float]]:
        """What this router's live actors hold on each node (Ray's CPU and resources)."""
        held: dict[str, dict[str, float]] = {}
        for p in self.processes:
            if p.node is None or p.state is HostState.EXITED:
                continue
            mine = held.setdefault(p.node, {})
            for name, amount in demand(p.options).items():
                mine[name] = mine.get(name, 0.0) + amount
        return held

    def node_lost(self, node: str) -> None:
        """A node did not confirm a SIGKILL: place nothing there for SUSPECT_FOR seconds."""
        if node not in self.suspects:
            log.warning(
                "Ray node %s presumed lost: no new worker goes there for %g s", node, SUSPECT_FOR
            )
        self.suspects[node] = time.monotonic() + SUSPECT_FOR

    def close(self) -> None:
        """Stop following the actors (the supervisor has reaped their workers); leave Ray."""
        for p in self.processes:
            if p.task is not None:
                p.task.cancel()
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, saying so, when a head given as host:port does not answer (ray.init
    would retry for minutes)."""
    if address == "auto" or address.startswith("ray://"):
        return  # auto fails fast by itself; Ray Client's port is not the GCS's
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(
            f"placement.address {address}: cannot reach the Ray cluster's head ({exc}); "
            "start it with `ray start --head`, or fix the address"
        ) from None
