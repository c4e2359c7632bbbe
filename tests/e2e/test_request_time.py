"""max_request_time: a request that runs too long is stopped, its client told, its slot freed."""

from __future__ import annotations

import json
import time

import httpx
from serverutil import chat, chat_body, is_content_line, model_entry

# The tiny model's end-of-generation tokens, biased away: a request runs to max_tokens.
NO_EOG = {"2": -100, "4": -100}
LONG = 4000  # tokens: many seconds of work next to the limit below


def _idle(server) -> bool:
    return all(w["state"] == "IDLE" for w in server.pool()["workers"])


def test_a_request_past_max_request_time_is_stopped(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf, max_request_time=0.3, config={"n_ctx": 4096})])
    started = time.monotonic()
    r = chat(server.url, "m", LONG, logit_bias=NO_EOG)
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["code"] == "request_timeout"
    assert "max_request_time" in error["message"] and "0.3 s" in error["message"]
    assert time.monotonic() - started < 5
    # The worker was told to stop: its slot is free again, and it serves the next request.
    server.wait_for(lambda: _idle(server), what="the worker to stop the request")
    assert chat(server.url, "m", 4, logit_bias=NO_EOG).status_code == 200

    # A stream whose tokens went out gets the error in-band, then [DONE].
    body = chat_body("m", "go", LONG, logit_bias=NO_EOG, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert any(is_content_line(f"data: {e}") for e in events[:-2])
    server.wait_for(lambda: _idle(server), what="the worker to stop the stream")
    assert "ran past max_request_time (0.3 s) of m" in server.log_text()
