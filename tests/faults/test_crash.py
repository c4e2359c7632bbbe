"""A worker killed mid-work: queued and non-streamed requests still complete; a stream that
sent tokens gets a clear error."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal

import httpx
import psutil
from serverutil import SMOLLM2_EOG, chat, chat_body, model_entry, skip_to_first_token


def _queue_ten(server, pool: cf.ThreadPoolExecutor) -> list[cf.Future]:
    """Ten short requests, sent once the pool is full and seen waiting in its queue."""
    queued = [
        pool.submit(chat, server.url, "m", 8, f"question {i}", logit_bias=SMOLLM2_EOG)
        for i in range(10)
    ]
    server.wait_for(lambda: server.model_ready("m")["queue_depth"] == 10, what="10 queued")
    return queued


def test_sigkill_mid_stream_with_queued_requests(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf)])
    (victim,) = server.workers()
    body = chat_body("m", "Write a very long story.", 1500, logit_bias=SMOLLM2_EOG, stream=True)
    with (
        httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r,
        cf.ThreadPoolExecutor(10) as pool,
    ):
        assert r.status_code == 200
        assert r.headers["x-llamapool-worker"].endswith(f"pid={victim.pid}")
        lines = r.iter_lines()
        skip_to_first_token(lines)
        queued = _queue_ten(server, pool)

        os.kill(victim.pid, signal.SIGKILL)

        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: ") :])["error"]
        assert error["code"] == "worker_crashed"
        assert "SIGKILL" in error["message"]
        results = [f.result(timeout=120) for f in queued]

    assert [res.status_code for res in results] == [200] * 10
    assert all(res.json()["usage"]["completion_tokens"] == 8 for res in results)
    served = {res.headers["x-llamapool-worker"] for res in results}
    assert all(f"pid={victim.pid}" not in s for s in served)
    assert (
        not psutil.pid_exists(victim.pid)
        or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE
    )
    (replacement,) = server.workers()
    assert replacement.pid != victim.pid
    assert "DEAD: killed by SIGKILL while BUSY" in server.log_text()


def test_sigkill_during_non_streamed_request_is_retried_whole(serve, smollm2_gguf):
    # Its client has seen nothing yet: the request runs again on the replacement.
    server = serve([model_entry("m", smollm2_gguf)])
    (victim,) = server.workers()
    start_cpu = sum(victim.cpu_times()[:2])
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(chat, server.url, "m", 400, "Write a story.", logit_bias=SMOLLM2_EOG)
        # Generating burns CPU: a second of it means tokens have already gone out.
        server.wait_for(
            lambda: sum(victim.cpu_times()[:2]) - start_cpu > 1.0, what="the worker to generate"
        )
        os.kill(victim.pid, signal.SIGKILL)
        r = fut.result(timeout=90)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 400
    assert f"pid={victim.pid}" not in r.headers["x-llamapool-worker"]
    assert "requeued r-1 at the head" in server.log_text()


def test_sigkill_of_a_batching_worker_ends_every_stream_it_held(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf, config={"n_parallel": 3})])
    (victim,) = server.workers()
    body = chat_body("m", "Write a very long story.", 1500, logit_bias=SMOLLM2_EOG, stream=True)

    def stream_until_killed(started: cf.Future) -> dict:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            skip_to_first_token(lines)
            started.set_result(True)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        return json.loads(rest[-2][len("data: ") :])["error"]

    with cf.ThreadPoolExecutor(13) as pool:
        started = [cf.Future() for _ in range(3)]
        streams = [pool.submit(stream_until_killed, f) for f in started]
        cf.wait(started, timeout=60)
        assert all(f.done() for f in started), "all three slots must be producing"
        queued = _queue_ten(server, pool)
        os.kill(victim.pid, signal.SIGKILL)
        errors = [s.result(timeout=60) for s in streams]
        results = [f.result(timeout=120) for f in queued]

    assert [e["code"] for e in errors] == ["worker_crashed"] * 3
    assert [res.status_code for res in results] == [200] * 10
    assert all(res.json()["usage"]["completion_tokens"] == 8 for res in results)
    assert all(f"pid={victim.pid}" not in res.headers["x-llamapool-worker"] for res in results)
