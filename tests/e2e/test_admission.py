"""Bounded queues and deadlines: a busy pool answers 503 at once, never hangs."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
from serverutil import SMOLLM2_EOG, chat, chat_body, model_entry, skip_to_first_token


def _long_stream(url: str, model: str, client: httpx.Client):
    """Open a long streamed chat and return once its first token has arrived.

    The caller keeps the returned objects alive: dropping the line iterator closes
    the connection, which the server (rightly) treats as a client disconnect.
    """
    body = chat_body(model, "Write a very long story.", 1500, logit_bias=SMOLLM2_EOG, stream=True)
    cm = client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120)
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    skip_to_first_token(lines)
    return cm, lines


def test_full_queue_is_503_with_retry_after_and_queue_timeout(serve, smollm2_gguf):
    server = serve(
        [
            model_entry("bounded", smollm2_gguf, max_queue=2),
            model_entry("deadline", smollm2_gguf, queue_timeout=0.5),
        ]
    )
    with httpx.Client() as client, cf.ThreadPoolExecutor(4) as pool:
        # bounded: one running, two queued, the fourth is refused at once.
        long_a = _long_stream(server.url, "bounded", client)
        queued = [pool.submit(chat, server.url, "bounded") for _ in range(2)]
        server.wait_for(
            lambda: (
                httpx.get(f"{server.url}/ready").json()["models"]["bounded"]["queue_depth"] == 2
            ),
            what="two queued requests",
        )
        t0 = time.monotonic()
        refused = chat(server.url, "bounded")
        # At once: next to the 1500-token stream ahead of it (tens of seconds).
        assert time.monotonic() - t0 < 5.0
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert "max_queue" in refused.json()["error"]["message"]

        # deadline: one running, the next waits 0.5 s and gets queue_timeout.
        long_b = _long_stream(server.url, "deadline", client)
        t0 = time.monotonic()
        timed_out = chat(server.url, "deadline")
        waited = time.monotonic() - t0
        assert timed_out.status_code == 503
        assert timed_out.json()["error"]["code"] == "queue_timeout"
        assert 0.4 < waited < 5.0
        assert "Retry-After" in timed_out.headers

        # Client disconnect cancels the running generation; the queued work then runs.
        long_a[0].__exit__(None, None, None)
        long_b[0].__exit__(None, None, None)
        for fut in queued:
            r = fut.result(timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] <= 4
        # The cancelled stream's instance is free before the next request waits its 0.5 s.
        server.wait_for(
            lambda: server.model_ready("deadline")["busy_instances"] == 0, what="deadline idle"
        )
        after = chat(server.url, "deadline")
        assert after.status_code == 200
    assert "inconsistent sequence positions" not in server.log_text()


def test_stream_error_before_output_is_a_plain_http_error(serve, tiny_gguf):
    server = serve([model_entry("tiny", tiny_gguf)])
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "x " * 3000}],
            "stream": True,
        },
    ) as r:
        assert r.status_code == 400
        assert json.loads(r.read())["error"]["code"] == "context_length_exceeded"


def test_choices_queued_behind_their_own_request_do_not_time_out(serve, tiny_gguf):
    # One slot, three choices of 1500 tokens: the second and third wait for the first,
    # far past queue_timeout. That wait is the request's own work, not a busy pool's.
    server = serve([model_entry("tiny", tiny_gguf, queue_timeout=0.5)])
    body = {"model": "tiny", "prompt": "abc", "n": 3, "max_tokens": 1500}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 3
