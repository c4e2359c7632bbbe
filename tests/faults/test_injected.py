"""Faults injected at exact points of a request (test-only hook in the worker), real processes."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from serverutil import SMOLLM2_EOG, chat, model_entry

FAST = {"backoff_initial": 0.05, "heartbeat_interval": 0.5}


def _faulty(serve, tiny_gguf, tmp_path, fault: str, **pool):
    return serve(
        [model_entry("m", tiny_gguf)],
        pool={**FAST, **pool},
        env={"LLAMAPOOL_TEST_FAULT": fault, "LLAMAPOOL_TEST_FAULT_FILE": str(tmp_path / "fault")},
    )


def _stream_events(url: str) -> list[str]:
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 64,
            "stream": True,
        },
        timeout=60,
    ) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def test_death_before_output_is_retried_transparently(serve, tiny_gguf, tmp_path):
    server = _faulty(serve, tiny_gguf, tmp_path, "crash_before_output:2")
    r = chat(server.url, max_tokens=8)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    log = server.log_text()
    assert log.count("requeued r-1 at the head") == 2


def test_death_before_output_gives_up_after_two_requeues(serve, tiny_gguf, tmp_path):
    server = _faulty(serve, tiny_gguf, tmp_path, "crash_before_output:3")
    r = chat(server.url, max_tokens=8)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "worker_crashed"
    server.ready()
    assert (
        chat(server.url, max_tokens=8).status_code == 200
    )  # the fault is spent; the pool is healthy


@pytest.mark.parametrize(
    ("fault", "needle"), [("broken_pipe:1", "broken pipe"), ("segfault:1", "SIGSEGV")]
)
def test_mid_stream_fault_ends_the_stream_cleanly(serve, tiny_gguf, tmp_path, fault, needle):
    server = _faulty(serve, tiny_gguf, tmp_path, fault)
    (first,) = server.workers()
    events = _stream_events(server.url)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "worker_crashed"
    assert needle in error["message"]
    server.wait_for(lambda: [w for w in server.workers() if w.pid != first.pid], what="respawn")
    server.ready()
    assert chat(server.url, max_tokens=8).status_code == 200


def test_wedged_engine_is_detected_and_replaced(serve, tiny_gguf, tmp_path):
    # Heartbeats keep flowing from the I/O thread; only the engine's own progress shows it.
    server = _faulty(serve, tiny_gguf, tmp_path, "stall:1", engine_stall_timeout=1.5)
    (first,) = server.workers()
    events = _stream_events(server.url)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "worker_crashed"
    assert "engine made no progress" in error["message"]
    server.wait_for(lambda: [w for w in server.workers() if w.pid != first.pid], what="respawn")
    server.ready()
    assert chat(server.url, max_tokens=8).status_code == 200


def test_sigabrt_is_a_crash_like_any_other(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], pool=FAST)
    (first,) = server.workers()
    os.kill(first.pid, signal.SIGABRT)
    server.wait_for(lambda: [w for w in server.workers() if w.pid != first.pid], what="respawn")
    server.ready()
    assert chat(server.url, max_tokens=8).status_code == 200
    assert "DEAD: killed by SIGABRT while IDLE" in server.log_text()


def test_stall_watchdog_spares_idle_and_long_but_progressing_work(serve, smollm2_gguf):
    # 2 s: short enough to test, long enough that a loaded box's slowest step stays under it.
    server = serve([model_entry("m", smollm2_gguf)], pool={"engine_stall_timeout": 2.0})
    (worker,) = server.workers()
    time.sleep(4.5)  # idle for longer than the timeout: the thing under test, not a wait
    r = chat(server.url, max_tokens=300, logit_bias=SMOLLM2_EOG)  # ~3-7 s, one step at a time
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 300
    assert [w.pid for w in server.workers()] == [worker.pid]
    assert "no progress" not in server.log_text()
