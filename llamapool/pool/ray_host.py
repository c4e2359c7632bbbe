"""The Ray actor that hosts one worker process on its node (`pool/ray_launcher.py`).

It makes the worker's wire secrets where the worker runs (only the public key and the
token's hash go back to the router), picks the worker's cores among those its node's
other workers leave free, starts today's worker subprocess in its own session, reports
its pid, waits for its exit and signals its process group when told. Tokens never pass
through it: the worker dials the router itself.

Runs inside a Ray worker process on every node, so it imports little: no llama.cpp, no
HTTP layer. The worker's parent is this actor's event loop thread, which lives as long
as the actor: when Ray kills the actor (its owner, the router, died; or `ray.kill`), the
worker's PR_SET_PDEATHSIG takes it down too.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib.metadata
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable

import msgspec
import psutil

import llamapool
from llamapool.ipc.remote import WIRE_ENV, RouterAddress, WireTicket, make_secrets
from llamapool.pool.placement import pick_cores

WORKER_MODULE = "llamapool.pool.worker"
# Serialises core picks between the hosts of one node (per user: /tmp is shared).
_CORES_LOCK = os.path.join(tempfile.gettempdir(), f"llamapool-cores-{os.getuid()}.lock")


class CannotHost(RuntimeError):
    """This node cannot run the worker (another llamapool or llama-cpp-python version)."""


def versions() -> dict[str, str]:
    """What must be identical on the router and every node, as installed here."""
    return {
        "llamapool": llamapool.__version__,
        "llama-cpp-python": importlib.metadata.version("llama-cpp-python"),
        "python": ".".join(map(str, sys.version_info[:2])),
    }


def taken_cores(cmdlines: Iterable[list[str]] | None = None) -> list[list[int]]:
    """The cores of every llamapool worker on this machine, from their command lines
    (`cmdlines`: those of every process here, by default read with psutil)."""
    if cmdlines is None:
        cmdlines = (p.info["cmdline"] or [] for p in psutil.process_iter(["cmdline"]))
    taken = []
    for cmd in cmdlines:
        if WORKER_MODULE in cmd and "--cores" in cmd[:-1]:
            value = cmd[cmd.index("--cores") + 1]
            taken.append([int(c) for c in value.split(",") if c.isdigit()])
    return taken


class WorkerHost:
    """One worker's host on a Ray node: prepare → start → wait; signal any time."""

    def __init__(self) -> None:
        self.ticket: WireTicket | None = None
        self.proc: subprocess.Popen | None = None

    async def prepare(self, router: str, wanted: dict[str, str]) -> dict[str, str]:
        """Check this node can run the worker and make its secrets; return where it is,
        its public key and its token's SHA-256."""
        import ray

        node_ip = ray.util.get_node_ip_address()
        here = versions()
        differ = {k: (wanted.get(k), v) for k, v in here.items() if wanted.get(k) != v}
        if differ:
            what = ", ".join(f"{k} {v} (router: {w})" for k, (w, v) in differ.items())
            raise CannotHost(
                f"node {node_ip} ({socket.gethostname()}) cannot host a worker: it has {what}; "
                "install the router's versions on every node"
            )
        address = msgspec.json.decode(router.encode(), type=RouterAddress)
        self.ticket, public, token_sha256 = make_secrets(address)
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": node_ip,
            "public_key": public,
            "token_sha256": token_sha256,
        }

    async def start(self, args: list[str], env: dict[str, str], n_threads: int) -> dict:
        """Start the worker on the least loaded cores of this node; its pid and cores."""
        assert self.ticket is not None, "prepare first"
        cpus = sorted(os.sched_getaffinity(0))
        full_env = {**os.environ, **env, WIRE_ENV: self.ticket.encode()}
        full_env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        with open(_CORES_LOCK, "a") as lock:
            # Held until the worker's command line (its --cores) is visible to the next pick.
            fcntl.flock(lock, fcntl.LOCK_EX)
            cores = pick_cores(cpus, taken_cores(), n_threads)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    WORKER_MODULE,
                    *args,
                    "--parent-pid",
                    str(os.getpid()),
                    "--cores",
                    ",".join(map(str, cores)),
                ],
                env=full_env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: signal() takes the group
            )
        self.ticket = None  # the worker has it; this process need not keep it
        return {"pid": self.proc.pid, "cores": cores}

    async def wait(self) -> int:
        """The worker's exit status (negative: the signal that killed it)."""
        assert self.proc is not None
        return await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)

    async def signal(self, sig: int) -> None:
        """Signal the worker's process group; a no-op once it is gone."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    async def memory(self) -> dict[str, int] | None:
        """What the worker costs its node, this actor's own process included (Ray's
        Python worker: ~50 MB PSS that exists only because the worker does), as RSS and
        PSS, and this node's available memory; None once the worker is gone."""
        if self.proc is None:
            return None
        try:
            worker = psutil.Process(self.proc.pid).memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        me = psutil.Process().memory_full_info()
        return {
            "rss": worker.rss + me.rss,
            "pss": getattr(worker, "pss", worker.rss) + getattr(me, "pss", me.rss),
            "available": psutil.virtual_memory().available,
        }
