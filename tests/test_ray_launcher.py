"""RayProcess's lifecycle against a fake actor whose calls the test settles (no Ray
cluster: tests/e2e/test_ray.py has one), and what the host actor reads on its node."""

from __future__ import annotations

import asyncio
import functools
import signal
import socket
import subprocess

import psutil
import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError, RayTaskError  # noqa: E402

from llamapool.pool import ray_launcher  # noqa: E402
from llamapool.pool.ray_host import CannotHost, WorkerHost, taken_cores  # noqa: E402
from llamapool.pool.ray_launcher import HostState, RayProcess  # noqa: E402

NODE = "ab" * 28


class _Method:
    """An actor method: each `.remote()` call returns a future the test resolves."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.calls: list[tuple] = []
        self.futures: list[asyncio.Future] = []

    def remote(self, *args):
        self.calls.append(args)
        fut = self.loop.create_future()
        self.futures.append(fut)
        return fut


class _Actor:
    def __init__(self, loop):
        for name in ("prepare", "start", "wait", "signal", "memory"):
            setattr(self, name, _Method(loop))


class _Wire:
    def __init__(self):
        self.admitted: list[tuple] = []

    def admit(self, worker_id, public_key, token_sha256):
        self.admitted.append((worker_id, public_key, token_sha256))


def _sync(scenario):
    """Run an async test on a fresh loop (the suite has no asyncio plugin)."""

    @functools.wraps(scenario)
    def run(*args, **kwargs):
        return asyncio.run(scenario(*args, **kwargs))

    return run


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


class _Host:
    """A RayProcess over a fake actor, and what it did."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.actor = _Actor(self.loop)
        self.wire = _Wire()
        self.killed: list = []
        self.lost: list[str] = []
        self.process = RayProcess(
            "m-1", self.actor, self.wire, self.loop, self.lost.append, self.killed.append
        )
        self.process.task = self.loop.create_task(
            self.process.run("{}", {}, ["--worker-id", "m-1"], {}, 1)
        )

    async def place(self):
        await _settle()
        self.actor.prepare.futures[0].set_result(
            {"node_id": NODE, "node_ip": "10.0.0.2", "public_key": "k" * 40, "token_sha256": "00"}
        )
        await _settle()

    async def run(self):
        await self.place()
        self.actor.start.futures[0].set_result({"pid": 4242, "cores": [3]})
        await _settle()


@_sync
async def test_a_worker_is_placed_started_and_reaped_through_its_actor():
    h = _Host()
    await _settle()
    assert h.process.state is HostState.PLACING and h.process.poll() is None
    await h.place()
    assert h.wire.admitted == [("m-1", "k" * 40, "00")]  # only the public half came back
    assert h.process.state is HostState.STARTING and h.process.node == NODE
    h.actor.start.futures[0].set_result({"pid": 4242, "cores": [3]})
    await _settle()
    assert (h.process.state, h.process.pid, h.process.cores) == (HostState.RUNNING, 4242, [3])
    h.actor.wait.futures[0].set_result(0)
    await _settle()
    assert (h.process.poll(), h.process.reason) == (0, None)
    assert h.killed == [h.actor]  # the actor goes with its worker: its CPUs come back


@_sync
async def test_a_node_that_cannot_host_makes_the_worker_unbootable():
    h = _Host()
    await _settle()
    why = "node 10.0.0.2 (n2) cannot host a worker: it has llamapool 0.0.9 (router: 0.1.0)"
    h.actor.prepare.futures[0].set_exception(RayTaskError("prepare", "tb", CannotHost(why)))
    await _settle()
    assert h.process.poll() == 78  # cannot boot: the model fails, not a respawn loop
    assert why in h.process.reason


@_sync
async def test_an_unconfirmed_sigkill_counts_as_done_and_its_node_as_lost(monkeypatch):
    monkeypatch.setattr(ray_launcher, "KILL_CONFIRM", 0.05)
    h = _Host()
    await h.run()
    h.process.signal_group(signal.SIGKILL)
    h.process.signal_group(signal.SIGKILL)  # once is enough
    await _settle()
    assert h.process.state is HostState.KILLED and h.actor.signal.calls == [(signal.SIGKILL,)]
    h.actor.wait.futures[0].set_exception(ActorDiedError())  # the kill's doing
    await asyncio.sleep(0.1)  # past KILL_CONFIRM, the signal call never answered
    assert h.process.poll() == -signal.SIGKILL
    assert "no word from node 10.0.0.2" in h.process.reason
    assert h.lost == [NODE] and h.actor in h.killed


@_sync
async def test_a_confirmed_sigkill_leaves_the_node_trusted():
    h = _Host()
    await h.run()
    h.process.signal_group(signal.SIGKILL)
    await _settle()
    h.actor.signal.futures[0].set_result(None)
    await _settle()
    assert (h.process.poll(), h.process.reason, h.lost) == (-signal.SIGKILL, None, [])


@_sync
async def test_any_signal_before_the_worker_runs_ends_the_actor():
    h = _Host()
    await _settle()
    h.process.signal_group(signal.SIGTERM)
    await _settle()
    assert h.process.poll() == -signal.SIGKILL and h.killed == [h.actor]
    assert h.actor.signal.calls == []  # no worker to signal
    await h.place()  # a late answer changes nothing
    assert h.wire.admitted == [] and h.process.state is HostState.EXITED


@_sync
async def test_sigterm_is_passed_on_and_the_exit_waited_for():
    h = _Host()
    await h.run()
    h.process.signal_group(signal.SIGTERM)
    assert h.actor.signal.calls == [(signal.SIGTERM,)] and h.process.state is HostState.RUNNING
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(h.process.wait, 0.01)
    h.actor.wait.futures[0].set_result(0)
    assert await asyncio.to_thread(h.process.wait, 5) == 0


def test_a_node_s_taken_cores_are_read_from_its_workers_command_lines():
    worker = ["python", "-m", "llamapool.pool.worker", "--worker-id", "m-1"]
    cmdlines = [
        [*worker, "--cores", "0,1"],
        [*worker, "--cores", "3"],
        [*worker, "--cores"],  # cut short: ignored
        ["python", "-m", "other", "--cores", "2"],
        [],
    ]
    assert taken_cores(cmdlines) == [[0, 1], [3]]


def test_a_worker_s_memory_includes_the_actor_hosting_it():
    """The host actor's process exists only for its worker, so the budget counts both
    (a Ray Python worker is ~50 MB PSS; a sleeping worker stand-in well under 10 MB)."""
    host = WorkerHost()
    host.proc = subprocess.Popen(["sleep", "30"])
    try:
        alone = psutil.Process(host.proc.pid).memory_full_info().pss
        sample = asyncio.run(host.memory())
    finally:
        host.proc.kill()
        host.proc.wait()
    assert sample is not None
    assert sample["pss"] > alone + 10 * 2**20
    assert sample["rss"] > sample["pss"] - alone
    assert sample["available"] > 0


def test_an_unreachable_head_fails_at_once_naming_the_address():
    with socket.socket() as s:  # a port that was free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=rf"placement.address 127.0.0.1:{port}: cannot reach"):
        ray_launcher._check_reachable(f"127.0.0.1:{port}")
    ray_launcher._check_reachable("auto")  # Ray finds it, or says so, by itself
