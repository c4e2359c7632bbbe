"""Speculative decoding end to end: drafted and accepted tokens in usage, timings, metrics."""

from __future__ import annotations

import httpx
from conftest import running_server
from serverutil import model_entry


def test_usage_timings_and_metrics_report_drafts(tiny_gguf, tmp_path):
    config = {"speculative": {"mode": "ngram", "draft_max": 8}}
    with running_server(tmp_path, [model_entry("tiny", tiny_gguf, config=config)]) as srv:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "abc abc abc abc"}],
            "max_tokens": 60,
            "temperature": 0,
        }
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
        details = r["usage"]["completion_tokens_details"]
        timings = r["timings"]
        assert details["accepted_prediction_tokens"] == timings["draft_n_accepted"] > 0
        assert (
            timings["draft_n"]
            == timings["draft_n_accepted"] + (details["rejected_prediction_tokens"])
        )
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
        drafted = f'llamapool_draft_tokens_total{{model="tiny"}} {float(timings["draft_n"])}'
        assert drafted in metrics
