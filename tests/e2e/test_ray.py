"""Workers on a Ray cluster (`placement: {backend: ray}`): a real Ray cluster on this
machine (a head with no CPUs for work and small worker nodes, dashboard off), a real
router joining it, the tiny model. Run alone with `pytest -m ray`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from serverutil import chat, chat_body, free_port, tagged_processes

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed"),
]

# Every process of a node (its raylet and agents, the actors' Ray workers, and the
# llamapool workers they start) inherits this, with the node's name: the fixture proves
# none outlives it, and a test takes a node down by killing exactly its processes.
RAY_TAG_ENV = "LLAMAPOOL_RAY_TEST_TAG"
FAST = {"heartbeat_interval": 0.5, "backoff_initial": 0.05}
SMALL_STORE = str(80 << 20)
RAY = str(Path(sys.executable).parent / "ray")


def _tagged(env: str, prefix: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(env, "").startswith(
                prefix
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RayCluster:
    """A Ray cluster of this machine's processes, started with `ray start` as on real
    machines: a head without CPUs, node A, and nodes a test adds and takes down. Each
    node's processes are found by their tag and ended by pid (never `ray stop`, which
    would end every Ray of this user on the machine)."""

    def __init__(self, root: Path) -> None:
        self.tag = f"ray-{uuid.uuid4().hex[:12]}"
        self.root = root
        self.address = f"127.0.0.1:{free_port()}"
        self._start("head", ["--head", "--port", self.address.split(":")[1], "--num-cpus", "0",
                             "--include-dashboard", "false"])  # fmt: skip
        self.add_node("a")

    def _start(self, name: str, args: list[str]) -> None:
        env = {**os.environ, RAY_TAG_ENV: f"{self.tag}-{name}", "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run(
            [RAY, "start", *args, "--node-ip-address", "127.0.0.1",
             "--object-store-memory", SMALL_STORE, "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def add_node(self, zone: str, num_cpus: int = 2) -> None:
        self._start(
            zone,
            ["--address", self.address, "--num-cpus", str(num_cpus),
             "--resources", json.dumps({f"node_{zone}": 1}), "--labels", f"zone={zone}"],
        )  # fmt: skip

    def processes(self, node: str = "") -> list[psutil.Process]:
        return _tagged(RAY_TAG_ENV, f"{self.tag}-{node}")

    def kill_node(self, node: str, sig: int = signal.SIGKILL) -> list[psutil.Process]:
        procs = self.processes(node)
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        return procs

    def shutdown(self) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left after 10 s (as
        `ray stop` does after its grace period), then prove that nothing remains."""
        self.kill_node("", signal.SIGCONT)
        self.kill_node("", signal.SIGTERM)
        try:
            _wait_until(lambda: not self.processes(), 10, "the Ray processes' exit")
        except AssertionError:
            self.kill_node("", signal.SIGKILL)
            _wait_until(lambda: not self.processes(), 10, "the Ray processes' exit on SIGKILL")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _ray(cluster: RayCluster, **placement) -> dict:
    return {"placement": {"backend": "ray", "address": cluster.address, **placement}}


def _model(model_id: str, path, **overrides) -> dict:
    entry = {"id": model_id, "config": {"model_path": str(path), "n_ctx": 512, "n_threads": 1}}
    entry["config"].update(overrides.pop("config", {}))
    entry.update(overrides)
    return entry


def _workers(server) -> list[psutil.Process]:
    """The server's llamapool worker processes, wherever Ray put them."""
    return [
        p for p in tagged_processes(server.tag) if "llamapool.pool.worker" in " ".join(p.cmdline())
    ]


def _hosts(cluster: RayCluster) -> list[psutil.Process]:
    """The cluster's WorkerHost actors (Ray names their processes after the actor)."""
    out = []
    for p in cluster.processes():
        try:
            if "WorkerHost" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def _stream(url: str, model: str, max_tokens: int) -> str:
    body = chat_body(model, "hello", max_tokens, stream=True)
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        text.extend(line for line in r.iter_lines() if line)
    assert text[-1] == "data: [DONE]", text[-3:]
    return "\n".join(text)


def _node_of(worker: psutil.Process) -> str:
    """The name of the Ray node whose actor started `worker` (a, b...)."""
    return worker.parent().environ()[RAY_TAG_ENV].rsplit("-", 1)[1]


def test_workers_run_on_ray_nodes_and_leave_nothing_behind(serve, tiny_gguf, ray_cluster):
    server = serve([_model("m", tiny_gguf, min_instances=2)], pool=FAST, extra=_ray(ray_cluster))
    pool = server.pool()
    workers = {w.pid: w for w in _workers(server)}
    assert sorted(workers) == sorted(w["pid"] for w in pool["workers"])
    for w in workers.values():  # each a child of its host actor on node a (the head has no CPU)
        assert "WorkerHost" in " ".join(w.parent().cmdline())
        assert _node_of(w) == "a"
        assert "LLAMAPOOL_WORKER_WIRE" not in " ".join(w.cmdline())
    (node,) = {w["node"] for w in pool["workers"]}
    assert node and len(node) == 56  # a Ray node id
    assert sorted(c for w in pool["workers"] for c in w["cores"]) == [0, 1]  # one core each
    assert "data: [DONE]" in _stream(server.url, "m", 16)
    r = chat(server.url, max_tokens=8)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

    server.stop()
    assert not _workers(server)
    _wait_until(lambda: not _hosts(ray_cluster), 15, "the host actors' exit")


def test_killing_the_router_leaves_no_worker_on_any_node(serve, tiny_gguf, ray_cluster):
    server = serve([_model("m", tiny_gguf)], pool=FAST, extra=_ray(ray_cluster))
    assert len(_workers(server)) == 1
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    started = time.monotonic()
    _wait_until(lambda: not _workers(server), 10, "the workers' exit after kill -9")
    took = time.monotonic() - started
    _wait_until(lambda: not _hosts(ray_cluster), 15, "the host actors' exit")
    print(f"worker gone {took:.2f} s after kill -9 of the router")
