"""Clients that leave: queued requests never reach a worker, running ones stop at once."""

from __future__ import annotations

import json
import socket
import time

import httpx
from serverutil import SMOLLM2_EOG, chat, chat_body, model_entry, skip_to_first_token


def _workers(server) -> list[dict]:
    return server.pool()["workers"]


# "At once": far below the seconds the cancelled work would have taken (thousands of tokens
# at 40-150 tok/s), with room for a loaded 2-core box to deliver the cancel and poll.
AT_ONCE = 5.0


def _idle_within(server, seconds: float = AT_ONCE) -> float:
    """Seconds until every worker is IDLE again; fails past `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if all(w["state"] == "IDLE" for w in _workers(server)):
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"workers still busy after {seconds} s: {_workers(server)}")


def _raw_post(server, body: dict) -> socket.socket:
    """Send a request on a raw socket (so the test can hang up whenever it likes)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def _busy_cpu(server, worker_pid: int, seconds: float) -> None:
    import psutil

    proc = psutil.Process(worker_pid)
    start = sum(proc.cpu_times()[:2])
    server.wait_for(
        lambda: sum(proc.cpu_times()[:2]) - start > seconds, what="the worker to compute"
    )


def test_stream_disconnect_frees_the_worker_at_once(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf, config={"n_ctx": 4096})])
    body = chat_body("m", "Write a long story.", 2000, logit_bias=SMOLLM2_EOG, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        skip_to_first_token(r.iter_lines())
    # The connection is closed: the router sends CANCEL, the worker stops at the next token.
    _idle_within(server)
    assert _workers(server)[0]["served"] == 0  # cancelled, not finished
    t0 = time.monotonic()
    r = chat(server.url)
    assert r.status_code == 200 and time.monotonic() - t0 < AT_ONCE
    assert "inconsistent sequence positions" not in server.log_text()


def test_non_streamed_disconnect_cancels_generation(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf)])
    (worker,) = server.workers()
    sock = _raw_post(server, chat_body("m", "story", 1500, logit_bias=SMOLLM2_EOG))
    _busy_cpu(server, worker.pid, 0.3)
    sock.close()
    _idle_within(server)
    assert _workers(server)[0]["served"] == 0  # cancelled, not finished


def test_disconnect_during_a_long_prompt_aborts_the_evaluation(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf, config={"n_ctx": 8192, "n_batch": 512})])
    (worker,) = server.workers()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 700  # ~7000 tokens
    sock = _raw_post(server, chat_body("m", long_prompt, 1))
    _busy_cpu(server, worker.pid, 0.3)  # well inside the prompt evaluation
    sock.close()
    _idle_within(server)
    assert _workers(server)[0]["served"] == 0  # cancelled, not finished
    r = chat(server.url)
    assert r.status_code == 200
    assert "inconsistent sequence positions" not in server.log_text()


def test_disconnect_while_queued_never_reaches_a_worker(serve, smollm2_gguf):
    server = serve([model_entry("m", smollm2_gguf)])
    body = chat_body("m", "story", 1500, logit_bias=SMOLLM2_EOG, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        served_before = _workers(server)[0]["served"]
        queued = _raw_post(server, chat_body("m", "q", 4))
        depth = lambda: server.model_ready("m")["queue_depth"]  # noqa: E731
        server.wait_for(lambda: depth() == 1, what="one queued")
        queued.close()
        server.wait_for(lambda: depth() == 0, what="the queue to empty")
    _idle_within(server)
    # Only the streamed request was ever served (it was cancelled, so it is not counted).
    assert _workers(server)[0]["served"] == served_before
