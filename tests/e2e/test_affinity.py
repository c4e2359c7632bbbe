"""Prompt-cache affinity: a chat's next turn goes to the instance that holds its prefix."""

from __future__ import annotations

import httpx
from serverutil import model_entry


def _turn(url: str, messages: list[dict]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0},
        timeout=60,
    )


def test_next_turn_reuses_the_same_instance_and_its_cache(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf, min_instances=2)])
    history = [{"role": "system", "content": "a long shared system prompt " * 20}]
    workers, cached = [], []
    for i in range(4):
        history.append({"role": "user", "content": f"question {i}"})
        r = _turn(server.url, history)
        assert r.status_code == 200
        workers.append(r.headers["x-llamapool-worker"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        history.append(
            {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}
        )
    assert len(set(workers)) == 1, workers  # least-recently-used alone would alternate
    assert cached[0] == 0 and all(c > 100 for c in cached[1:]), cached
    # An unrelated request goes to the other, least recently used instance.
    other = _turn(server.url, [{"role": "user", "content": "unrelated"}])
    assert other.headers["x-llamapool-worker"] != workers[0]
