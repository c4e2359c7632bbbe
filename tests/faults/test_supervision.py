"""Supervision with real processes and real signals: boot failures, hangs, crash loops, shutdown."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import psutil
from serverutil import SMOLLM2_EOG, chat, model_entry

# 2 s of silence is a death: short for a test, long enough that a loaded box's stalls
# (a router tick, a replacement's boot) are not mistaken for one.
FAST_HEARTBEAT = {"heartbeat_interval": 0.2, "heartbeat_liveness": 10}


def test_missing_and_corrupt_models_fail_alone(serve, tiny_gguf, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    server = serve(
        [
            model_entry("good", tiny_gguf),
            model_entry("missing", tmp_path / "absent.gguf"),
            model_entry("corrupt", corrupt),
        ],
        wait_ready=False,
    )
    server.wait_for(
        lambda: server.model_ready("corrupt")["state"] == "FAILED",
        what="corrupt model FAILED",
    )
    assert chat(server.url, "good").status_code == 200
    for model, needle in (("missing", "file not found"), ("corrupt", "cannot load")):
        r = chat(server.url, model)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_failed"
        assert needle in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/ready").status_code == 503
    # Cannot boot means no respawn loop: exactly one attempt was logged.
    assert server.log_text().count("(corrupt) STARTING") == 1


def test_sigstop_hang_is_detected_and_replaced(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], pool=FAST_HEARTBEAT)
    (victim,) = server.workers()
    os.kill(victim.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    server.wait_for(
        lambda: victim.pid not in {w.pid for w in server.workers()},
        timeout=20,
        what="the stopped worker killed",
    )
    detected = time.monotonic() - t0
    # interval × liveness, plus a supervisor tick and slack for a loaded box. Only the
    # heartbeats can see a stopped process: without them it would never be replaced.
    assert detected < 0.2 * 10 + 4, detected
    # Killed is not yet reaped: /ready may count the victim until the supervisor sees it.
    (replacement,) = server.wait_for(
        lambda: [w for w in server.workers() if w.pid != victim.pid], what="a replacement"
    )
    server.ready()
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert "missed heartbeats" in server.log_text()
    assert chat(server.url, "m").status_code == 200


def test_crash_loop_marks_the_model_failed(serve, tiny_gguf):
    server = serve(
        [model_entry("m", tiny_gguf)],
        pool={"restart_attempts": 2, "restart_window": 60, "backoff_initial": 0.05},
    )
    killed: set[int] = set()
    for _ in range(3):
        (w,) = server.wait_for(
            lambda: [x for x in server.workers() if x.pid not in killed], what="a worker"
        )
        server.ready()
        killed.add(w.pid)
        os.kill(w.pid, signal.SIGKILL)
    server.wait_for(lambda: server.model_ready("m")["state"] == "FAILED", what="FAILED")
    r = chat(server.url, "m")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "model_failed"
    assert "3 worker deaths" in err["message"]
    assert server.workers() == []


def test_failed_model_is_retried_after_the_configured_time(serve, tiny_gguf):
    server = serve(
        [model_entry("m", tiny_gguf)],
        pool={"restart_attempts": 1, "backoff_initial": 0.05, "failed_retry_after": 1.0},
    )
    for _ in range(2):
        (w,) = server.wait_for(server.workers, what="a worker")
        server.ready()
        os.kill(w.pid, signal.SIGKILL)
        server.wait_for(lambda w=w: w.pid not in {x.pid for x in server.workers()}, what="reap")
    # FAILED lasts only the configured second: its log line stays, the state may not.
    server.wait_for(lambda: "model m FAILED" in server.log_text(), what="FAILED")
    server.ready(timeout=30)
    assert chat(server.url, "m").status_code == 200
    assert "retrying after 1 s FAILED" in server.log_text()


def test_router_sigkill_leaves_no_worker_behind(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf, min_instances=2)])
    workers = server.workers()
    assert len(workers) == 2
    server.proc.kill()
    server.proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=5 * 1 + 1)
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"


def test_router_sigterm_lets_running_requests_finish(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf)])
    (worker,) = server.workers()
    start_cpu = sum(worker.cpu_times()[:2])
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(chat, server.url, "m", 200, logit_bias=SMOLLM2_EOG)
        server.wait_for(lambda: sum(worker.cpu_times()[:2]) - start_cpu > 0.3, what="generation")
        server.proc.send_signal(signal.SIGTERM)
        r = fut.result(timeout=60)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 200
    assert server.proc.wait(30) == 0
    gone, alive = psutil.wait_procs([worker], timeout=5)
    assert not alive
