"""How a worker process is started, polled, signalled and reaped (circus's process class).

The supervisor only ever talks to a `Launcher` and the `ProcessHandle`s it returns, so
its state logic runs against fakes in tests, and a launcher for processes elsewhere
(`pool/ray_launcher.py`) plugs in without touching it. `LocalLauncher` starts local
subprocesses: its own session each (the supervisor kills process groups), the data
socket handed over with `pass_fds`, the model spec in the environment; or, given a
`RemoteWire`, no socket: the worker dials back over TCP with the ticket it is handed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import IO, Protocol

import msgspec

from llamapool.config import ModelSpec
from llamapool.ipc.remote import WIRE_ENV, RemoteWire
from llamapool.pool.memory import Sample, sample
from llamapool.pool.worker import SPEC_ENV


@dataclass(frozen=True)
class WorkerLaunch:
    """Everything a worker needs to start: who it is, what it serves, whom it talks to."""

    worker_id: str
    spec: ModelSpec  # n_threads already decided
    endpoint: str  # the router's ZeroMQ control endpoint
    cores: list[int]
    heartbeat_interval: float
    heartbeat_liveness: int
    stall_timeout: float
    log_level: str
    gpu: int | None = None  # the only GPU it may see (NVML's index); None: every GPU
    node: str | None = None  # the machine the memory budget chose; None: the launcher's


@dataclass(frozen=True)
class NodeRoom:
    """A machine a launcher could start the next worker on, as far as it knows now."""

    node: str
    memory: int  # bytes it offers workers (Ray's `memory` resource): what a % budget is of
    available: int | None  # its available memory at the last sample there; None: none yet


class ProcessHandle(Protocol):
    """One started worker process, as the supervisor sees it."""

    pid: int  # shown in /admin/pool and response headers; the launcher's own numbering
    node: str | None  # the machine it runs on (a Ray node id); None: this one
    node_available: int | None  # that machine's available memory, last sampled there
    # Why it ended, in the launcher's words, where the worker could not say (its node
    # was lost, no node could host it); None otherwise.
    reason: str | None
    # The router's end of the worker's data socket (requests in, tokens out).
    data: socket.socket | None

    def poll(self) -> int | None:
        """Its exit status once it has exited (negative: killed by that signal), else None."""

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the process and everything it started; a no-op once it is gone."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; raise TimeoutError after `timeout` seconds."""

    def memory(self) -> Sample | None:
        """Its memory now, or None when gone or not measurable from here."""


class Launcher(Protocol):
    """Starts worker processes."""

    def start(self, launch: WorkerLaunch) -> ProcessHandle:
        """Start one worker; raise OSError when it cannot be started."""

    def nodes_for(self, spec: ModelSpec) -> list[NodeRoom] | None:
        """The machines that could host one more worker of `spec` now, best first; None
        when it starts workers on this machine only (the budget reads it directly)."""

    def close(self) -> None:
        """Release what the launcher holds, once every worker has been reaped."""


class LocalProcess:
    """A worker subprocess of this router, in its own session."""

    def __init__(self, popen: subprocess.Popen, data: socket.socket | None):
        self.popen = popen
        self.pid = popen.pid
        self.node: str | None = None
        self.node_available: int | None = None  # this machine: the budget reads psutil
        self.reason: str | None = None
        self.data: socket.socket | None = data

    def poll(self) -> int | None:
        """Exit status if it has exited."""
        return self.popen.poll()

    def signal_group(self, sig: int) -> None:
        """Signal its whole process group (its session: it is the leader)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        """Reap it, within `timeout` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"pid {self.pid} still running after {timeout} s") from None

    def memory(self) -> Sample | None:
        """RSS and PSS from /proc via psutil."""
        return sample(self.pid)


class LocalLauncher:
    """Runs `python -m llamapool.pool.worker` as a subprocess of this router."""

    def __init__(
        self,
        worker_log: IO | None = None,
        python: str = sys.executable,
        wire: RemoteWire | None = None,
    ):
        self.worker_log = worker_log
        self.python = python
        self.wire = wire  # set: workers dial back over TCP (ipc.remote), no socket pair

    def nodes_for(self, spec: ModelSpec) -> None:
        """This machine only."""
        return None

    def close(self) -> None:
        """Nothing to release: every worker is a subprocess, reaped by the supervisor."""

    def start(self, launch: WorkerLaunch) -> LocalProcess:
        """Popen with a fresh socket pair; the child gets its end by file descriptor."""
        # The data socket: a pair, so no address to guard and no connection to wait for.
        # With a wire, none: the worker dials back and proves itself with its ticket.
        router_end, child_end = _data_pair(self.wire is None)
        env = {**os.environ, **worker_env(launch)}
        # CUDA numbers GPUs fastest first unless told otherwise; NVML (and nvidia-smi, and
        # the config's `gpus`) by PCI bus. One order for both, so the numbers mean one GPU.
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        cmd = [
            self.python,
            "-m",
            "llamapool.pool.worker",
            *worker_args(launch),
            *(["--data-fd", str(child_end.fileno())] if child_end else []),
            "--parent-pid",
            str(os.getpid()),
            "--cores",
            ",".join(map(str, launch.cores)),
        ]
        if self.wire is not None:
            env[WIRE_ENV] = self.wire.issue(launch.worker_id).encode()
        try:
            popen = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self.worker_log,
                stderr=self.worker_log,
                pass_fds=(child_end.fileno(),) if child_end else (),
                start_new_session=True,  # its own process group: we kill the whole group
            )
        except BaseException:
            if self.wire is not None:
                self.wire.revoke(launch.worker_id)
            if router_end:
                router_end.close()
            raise
        finally:
            if child_end:
                child_end.close()
        return LocalProcess(popen, router_end)


def worker_env(launch: WorkerLaunch) -> dict[str, str]:
    """What a worker's environment must add to its host's: its spec, thread and GPU
    settings. Wherever it runs."""
    env = {SPEC_ENV: msgspec.json.encode(launch.spec).decode()}
    # llama.cpp reads OMP/OpenBLAS thread counts from the environment; keep them in step.
    env["OMP_NUM_THREADS"] = str(launch.spec.config.n_threads)
    if launch.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(launch.gpu)
    return env


def worker_args(launch: WorkerLaunch) -> list[str]:
    """The worker's arguments that do not depend on where it runs (no parent, no cores,
    no data descriptor)."""
    return [
        "--worker-id",
        launch.worker_id,
        "--endpoint",
        launch.endpoint,
        "--heartbeat-interval",
        str(launch.heartbeat_interval),
        "--heartbeat-liveness",
        str(launch.heartbeat_liveness),
        "--stall-timeout",
        str(launch.stall_timeout),
        "--log-level",
        launch.log_level,
    ]


def _data_pair(wanted: bool) -> tuple[socket.socket | None, socket.socket | None]:
    if not wanted:
        return None, None
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
