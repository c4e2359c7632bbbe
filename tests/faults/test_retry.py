"""A worker that dies after producing output: what is redone unseen, what cannot be."""

from __future__ import annotations

import json

import httpx
from serverutil import chat, chat_body, model_entry

# The tiny model's end-of-generation tokens (</s>, <|im_end|>), biased away: every request
# generates exactly max_tokens.
NO_EOG = {"2": -100, "4": -100}
# A fixed seed at a temperature that samples: the same request gives the same text.
SEEDED = {"seed": 1234, "temperature": 1.0, "logit_bias": NO_EOG}


def test_non_streamed_output_is_redone_whole_a_stream_that_sent_tokens_is_not(
    serve, tiny_gguf, tmp_path
):
    # Two faults: each segfaults a worker after its first chunk has reached the router.
    # Every request starts from an empty KV cache, so the seeded text depends on nothing else.
    server = serve(
        [model_entry("m", tiny_gguf, config={"reset_each_request": True})],
        pool={"backoff_initial": 0.05},
        env={
            "LLAMAPOOL_TEST_FAULT": "segfault:2",
            "LLAMAPOOL_TEST_FAULT_FILE": str(tmp_path / "f"),
        },
    )
    body = chat_body("m", "tell me", 24, stream=True, **SEEDED)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    # Tokens went out before the crash: the stream cannot be redone, it ends in-band.
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "worker_crashed"
    assert any('"content":"' in e and '"content":""' not in e for e in events[:-2])

    server.ready()
    (victim,) = server.workers()
    crashed = chat(server.url, "m", 24, "tell me", **SEEDED)
    # The client of a non-streamed request had seen nothing: redone on the replacement.
    assert crashed.status_code == 200, crashed.text
    assert f"pid={victim.pid}" not in crashed.headers["x-llamapool-worker"]
    assert crashed.json()["usage"]["completion_tokens"] == 24
    assert "requeued r-2 at the head" in server.log_text()

    server.ready()
    reference = chat(server.url, "m", 24, "tell me", **SEEDED)  # the faults are spent
    assert reference.status_code == 200
    text = crashed.json()["choices"][0]["message"]["content"]
    assert text == reference.json()["choices"][0]["message"]["content"]
