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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from serverutil import chat, chat_body, free_port, tagged_processes

WORKER_HEADER = "x-llamapool-worker"
NO_EOG = {"2": -100, "4": -100}  # the tiny model's </s> and <|im_end|>: exactly max_tokens

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
        # Three CPUs (of this machine's two cores: Ray's CPU is a count): room for a lost
        # node's worker to come back here.
        self.add_node("a", num_cpus=3)

    def _start(self, name: str, args: list[str], extra_env: dict | None = None) -> None:
        env = {**os.environ, RAY_TAG_ENV: f"{self.tag}-{name}", "RAY_USAGE_STATS_ENABLED": "0"}
        env.update(extra_env or {})
        subprocess.run(
            [RAY, "start", *args, "--node-ip-address", "127.0.0.1",
             "--object-store-memory", SMALL_STORE, "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip

    def add_node(
        self, zone: str, num_cpus: int = 2, name: str | None = None, env: dict | None = None
    ) -> str:
        """Start a node in `zone` (label zone=<zone>, resource node_<zone>: 1); its name."""
        name = name or zone
        self._start(
            name,
            ["--address", self.address, "--num-cpus", str(num_cpus),
             "--resources", json.dumps({f"node_{zone}": 1}), "--labels", f"zone={zone}"],
            env,
        )  # fmt: skip
        return name

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

    def wait_dead(self, zone: str, timeout: float = 90.0) -> None:
        """Wait until Ray itself has declared every node of `zone` dead: a lost node it
        still counts alive would take the next test's workers (their actors then die)."""
        probe = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(any(n['Alive'] and n['Resources'].get(sys.argv[2]) for n in ray.nodes()))"
        )

        def gone() -> bool:
            out = subprocess.run(
                [sys.executable, "-c", probe, self.address, f"node_{zone}"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            return out.stdout.strip().endswith("False")

        _wait_until(gone, timeout, f"Ray to declare the zone {zone} nodes dead")

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


def _worker(server, worker_id: str) -> dict:
    return next((w for w in server.pool()["workers"] if w["id"] == worker_id), {"in_flight": []})


def _serving_elsewhere(server, model: str, gone: str) -> list[str] | None:
    """The nodes of `model`'s two ready workers once `gone` is not among them, else None."""
    workers = [w for w in server.pool()["workers"] if w["model"] == model]
    ready = [w for w in workers if w["state"] in ("IDLE", "BUSY") and w["id"] != gone]
    if len(ready) < 2 or any(w["id"] == gone for w in workers):
        return None
    by_pid = {p.pid: p for p in _workers(server)}
    return [_node_of(by_pid[w["pid"]]) for w in ready]


def _outcome(url: str, body: dict) -> tuple[str, str]:
    """How a request ended (done, or the error code it got, in-band for a stream) and the
    worker that served it last."""
    if not body["stream"]:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        outcome = "done" if r.status_code == 200 else r.json()["error"]["code"]
        return outcome, r.headers.get(WORKER_HEADER, "").split(" ")[0]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        if r.status_code != 200:
            return json.loads(r.read())["error"]["code"], ""
        served_by = r.headers.get(WORKER_HEADER, "").split(" ")[0]  # "m-4 pid=123"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][len("data: ") :])
    if "error" in last:
        return last["error"]["code"], served_by
    assert last["choices"][0]["finish_reason"] == "length", last
    return "done", served_by


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
    # One core each, picked on the node (other llamapool workers on this shared machine
    # count too, so which ones is theirs to decide).
    assert [len(w["cores"]) for w in pool["workers"]] == [1, 1]
    assert "data: [DONE]" in _stream(server.url, "m", 16)
    r = chat(server.url, max_tokens=8)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8

    assert server.stop() == 0  # drained and stopped as locally (Ray's SIGTERM handler undone)
    assert "SIGTERM received" not in server.log_text()
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


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_nodes_workers_come_back_elsewhere_and_no_request_is_lost(
    serve, tiny_gguf, ray_cluster, tmp_path, how
):
    # Node b's workers hang after their first chunk (the router has it), so requests are
    # caught there mid-way when the node goes: by SIGKILL of all its processes (a crash),
    # or SIGSTOP (a frozen machine, whose sockets stay open: only heartbeats tell).
    fault = {"LLAMAPOOL_TEST_FAULT": "stall:1000", "LLAMAPOOL_TEST_FAULT_FILE": str(tmp_path / "f")}
    node = ray_cluster.add_node("b", name=f"b{how}", env=fault)
    server = serve(
        [
            _model("pa", tiny_gguf, placement={"labels": {"zone": "a"}}),
            _model("pb", tiny_gguf, placement={"resources": {"node_b": 0.5}}),
            _model("m", tiny_gguf, min_instances=2, config={"n_parallel": 2, "n_ctx": 1024}),
        ],
        pool=FAST,
        extra=_ray(ray_cluster),
    )
    by_pid = {w.pid: _node_of(w) for w in _workers(server)}
    placed = {(w["model"], by_pid[w["pid"]]) for w in server.pool()["workers"]}
    assert placed == {("pa", "a"), ("pb", node), ("m", "a"), ("m", node)}, placed
    on_b = next(
        w for w in server.pool()["workers"] if by_pid[w["pid"]] == node and w["model"] == "m"
    )

    # Streams first: node b's first request is a stream, and hangs after its first token;
    # then a burst of whole responses, so that node b takes its second one when instance a
    # is full (with only three, a could finish each before the next came: b kept one).
    streams = [chat_body("m", f"s{i}", 200, stream=True, logit_bias=NO_EOG) for i in range(2)]
    wholes = [chat_body("m", f"w{i}", 200, stream=False, logit_bias=NO_EOG) for i in range(8)]
    in_flight_on_b = lambda: len(_worker(server, on_b["id"])["in_flight"])  # noqa: E731
    with ThreadPoolExecutor(len(streams) + len(wholes)) as pool:
        futures = [pool.submit(_outcome, server.url, b) for b in streams]
        server.wait_for(in_flight_on_b, what="a stream on node b")
        futures += [pool.submit(_outcome, server.url, b) for b in wholes]
        server.wait_for(lambda: in_flight_on_b() == 2, what="two requests on node b")
        lost_at = time.monotonic()
        ray_cluster.kill_node(node, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        try:
            back = server.wait_for(
                lambda: _serving_elsewhere(server, "m", on_b["id"]), timeout=30, what="replacement"
            )
            took = time.monotonic() - lost_at
            outcomes = [f.result(timeout=60) for f in futures]  # none hangs
        finally:
            if how == "frozen":
                ray_cluster.kill_node(node, signal.SIGKILL)
                ray_cluster.kill_node(node, signal.SIGCONT)
            ray_cluster.wait_dead("b")
    assert back == ["a", "a"]
    # Each request ended once: a stream that had output on node b gets worker_crashed,
    # every other request is whole (a whole response's output is held: requeued, redone).
    for body, (outcome, served_by) in zip(streams + wholes, outcomes, strict=True):
        lost = body["stream"] and served_by == on_b["id"]
        assert outcome == ("worker_crashed" if lost else "done"), (body, outcome, served_by)
    assert ("worker_crashed", on_b["id"]) in outcomes
    log = server.log_text()
    # Heartbeats told, not Ray; the node did not confirm the kill, and is avoided since.
    assert f"worker {on_b['id']} (m) KILLING: missed heartbeats" in log
    assert f"worker {on_b['id']} (m) DEAD: killed by SIGKILL: missed heartbeats" in log
    assert "presumed lost: no new worker goes there for 60 s" in log
    print(f"node {how}: m back to 2 instances {took:.2f} s after the loss: {outcomes}")
