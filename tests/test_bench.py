"""The benchmark harness (benchmarks/): client classification, stats, and short real runs.

The runs use the tiny test model with a few 8-token requests: they check the JSON schema and
that the counts add up, never speed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import pathlib
import uuid
from typing import Any

import httpx
import psutil
import pytest
from serverutil import TAG_ENV, tagged_processes

from benchmarks.cli import configure_parser, run
from benchmarks.client import RequestResult, send_chat
from benchmarks.modelfile import end_of_generation_ids, token_counter
from benchmarks.queue_wait import find_queue_wait, level_queue_wait, parse_samples
from benchmarks.servers import loopback_base_url
from benchmarks.stats import distribution, percentile
from benchmarks.stress import check_invariant

TINY_ARGS = ["--max-tokens", "8", "--n-ctx", "512", "--warmup", "1", "--no-progress"]
LEVEL_KEYS = {
    "concurrency", "requests", "ok", "failed", "errors_by_type", "wall_s", "completion_tokens",
    "short_completions", "tokens_source", "aggregate_tok_s", "stream_tok_s", "decode_tok_s",
    "ttft_s", "routing_overhead_s", "e2e_s", "queue_wait_s", "requests_detail",
}  # fmt: skip
DISTRIBUTION_KEYS = {"p50", "p95", "p99", "mean", "min", "max"}


def _pool_unavailable() -> str | None:
    spec = importlib.util.find_spec("llamapool.cli")
    if spec is None or spec.origin is None:
        return "llamapool.cli does not exist yet"
    if '"serve"' not in pathlib.Path(spec.origin).read_text():
        return "llamapool.cli has no `serve` command yet"
    return None


needs_pool = pytest.mark.skipif(_pool_unavailable() is not None, reason=str(_pool_unavailable()))


@pytest.fixture
def bench(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """Run the harness with flags; returns (exit code, report). Fails if a process outlives it."""
    tag = f"bench-{uuid.uuid4().hex[:12]}"
    # Every server the harness starts inherits the tag, so even re-parented workers are found.
    monkeypatch.setenv(TAG_ENV, tag)

    def call(*flags: str) -> tuple[int, dict[str, Any]]:
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        code = run(parser.parse_args([*flags, "--out-dir", str(tmp_path), "--name", "run"]))
        report = json.loads((tmp_path / "run.json").read_text())
        for entry in report["targets"].values():
            for pid in entry.get("pids", []):
                assert not _alive(pid), f"server process {pid} outlived the benchmark"
        assert not tagged_processes(tag), "the benchmark left processes behind"
        return code, report

    return call


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_level(level: dict[str, Any], concurrency: int, requests: int, max_tokens: int) -> None:
    assert set(level) == LEVEL_KEYS
    assert level["concurrency"] == concurrency
    assert level["requests"] == max(requests, concurrency)
    assert level["ok"] + level["failed"] == level["requests"]
    assert sum(level["errors_by_type"].values()) == level["failed"]
    assert level["failed"] == 0, level["errors_by_type"]
    assert level["short_completions"] == 0
    assert level["completion_tokens"] == level["ok"] * max_tokens
    details = level["requests_detail"]
    assert sorted(d["index"] for d in details) == list(range(level["requests"]))
    assert all(d["ok"] and d["completion_tokens"] == max_tokens for d in details)
    for key in ("stream_tok_s", "ttft_s", "e2e_s"):
        assert set(level[key]) == DISTRIBUTION_KEYS
        assert level[key]["p50"] > 0
    assert level["ttft_s"]["p50"] <= level["e2e_s"]["p50"]
    assert level["aggregate_tok_s"] > 0


def _check_report(report: dict[str, Any], targets: list[str]) -> None:
    assert report["schema"] == "llamapool-bench/1"
    assert report["kind"] == "sweep"
    machine = report["machine"]
    assert {"cpu_usable", "memory_total_bytes", "platform", "python"} <= set(machine)
    # A noisy measure (another process can slow the lone run): only absurd values fail.
    assert 0 < machine["effective_cores"] <= machine["cpu_usable"] * 2
    assert report["versions"]["llama_cpp_python"]
    assert report["config"]["max_tokens"] == 8
    assert report["config"]["eog_token_ids"]
    assert list(report["targets"]) == targets
    assert "comparisons" in report


def test_sweep_mutex_and_direct(bench, tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    code, report = bench(
        "--model", str(tiny_gguf), "--targets", "mutex,direct", "--concurrency", "1,4",
        "--requests", "4", *TINY_ARGS,
    )  # fmt: skip
    assert code == 0
    _check_report(report, ["mutex", "direct"])
    mutex, direct = report["targets"]["mutex"], report["targets"]["direct"]
    assert mutex["error"] is None and direct["error"] is None
    assert mutex["warmup"]["ok"] == 1
    assert [level["concurrency"] for level in mutex["levels"]] == [1, 4]
    for level in mutex["levels"]:
        _check_level(level, level["concurrency"], 4, 8)
        assert level["tokens_source"] == ["usage"]
    # direct is one stream: only concurrency 1, whatever the sweep asks.
    assert [level["concurrency"] for level in direct["levels"]] == [1]
    _check_level(direct["levels"][0], 1, 4, 8)
    assert mutex["pids"], "the mutex server's pid is recorded"
    assert (tmp_path / "run.png").stat().st_size > 0


@needs_pool
def test_sweep_pool(bench, tiny_gguf: pathlib.Path) -> None:
    code, report = bench(
        "--model", str(tiny_gguf), "--targets", "pool", "--concurrency", "1,4",
        "--requests", "4", "--instances", "2", "--threads-per-instance", "1", *TINY_ARGS,
    )  # fmt: skip
    assert code == 0, report["targets"]["pool"].get("error")
    _check_report(report, ["pool"])
    pool = report["targets"]["pool"]
    assert pool["instances"] == 2
    assert "min_instances: 2" in pool["config_yaml"]
    # The router and its two workers were seen, and all are gone.
    assert len(pool["pids"]) >= 3
    assert pool["parallel"] == 4
    assert "n_parallel: 4" in pool["config_yaml"]
    for level in pool["levels"]:
        _check_level(level, level["concurrency"], 4, 8)
        # The pool reports its own time to first token, so routing overhead is measured.
        overhead = level["routing_overhead_s"]
        assert 0 < overhead["p50"] < level["ttft_s"]["p50"]
    assert report["comparisons"]["candidate"] == "pool"
    assert report["comparisons"]["routing_overhead_p50_s"] > 0
    # The HTTP floor: the same client against a server that answers at once.
    floor = report["http_floor"]
    assert floor["requests"] == 35
    assert floor["ttft_s"]["p50"] > 0  # no speed comparison: phases apart, a noisy box
    comparisons = report["comparisons"]
    assert comparisons["routing_beyond_http_floor_p50_s"] == pytest.approx(
        comparisons["routing_overhead_p50_s"] - comparisons["http_floor_ttft_p50_s"]
    )


@needs_pool
def test_paired_turns_of_pool_floor_and_direct(bench, tiny_gguf: pathlib.Path) -> None:
    code, report = bench(
        "--model", str(tiny_gguf), "--targets", "pool,direct", "--concurrency", "1",
        "--requests", "2", "--pairs", "3", "--instances", "1", *TINY_ARGS,
    )  # fmt: skip
    assert code == 0
    paired = report["paired"]
    assert paired["pairs"] == paired["ok"] == 3
    for key in ("pool_stream_tok_s", "direct_stream_tok_s", "stream_tok_s_ratio"):
        assert paired[key]["p50"] > 0
    assert paired["http_floor_ttft_s"]["p50"] > 0
    assert paired["routing_overhead_s"]["p50"] > 0
    summary = report["comparisons"]["paired"]
    assert summary["pairs"] == 3
    assert summary["single_stream_ratio_p50"] == paired["stream_tok_s_ratio"]["p50"]
    beyond = paired["routing_beyond_http_floor_s"]["p50"]
    assert summary["routing_beyond_http_floor_p50_s"] == beyond
    assert report["config"]["pairs"] == 3


def test_pairs_are_ratios_and_differences_of_one_moment() -> None:
    from benchmarks.paired import summarize_pairs

    def result(e2e: float, ttft: float, server_ttft: float | None = None) -> RequestResult:
        r = RequestResult(index=0, ok=True, e2e_s=e2e, ttft_s=ttft, completion_tokens=10)
        r.server_ttft_s = server_ttft
        return r

    rows = [
        # pool, floor, direct: one slow moment of the host slows all three alike.
        (result(2.0, 0.105, 0.100), result(0.002, 0.002), result(1.9, 0.1)),
        (result(4.0, 0.210, 0.200), result(0.004, 0.004), result(3.8, 0.2)),
        (result(1.0, 0.1, 0.1), result(0.002, 0.002), RequestResult(index=0, error="timeout")),
    ]
    summary = summarize_pairs(rows)
    assert summary["pairs"] == 3 and summary["ok"] == 2
    assert summary["stream_tok_s_ratio"]["p50"] == pytest.approx(0.95)
    assert summary["routing_overhead_s"]["min"] == pytest.approx(0.005)
    assert summary["routing_beyond_http_floor_s"]["p50"] == pytest.approx(0.0045)


def test_stress_mutex_keeps_the_invariant(bench, tiny_gguf: pathlib.Path) -> None:
    code, report = bench(
        "--model", str(tiny_gguf), "--targets", "mutex", "--stress", "24",
        "--stress-timeout", "60", *TINY_ARGS,
    )  # fmt: skip
    assert code == 0
    assert report["kind"] == "stress"
    entry = report["targets"]["mutex"]
    inv = entry["invariant"]
    assert inv["holds"], inv["violations"]
    assert inv["sent"] == inv["returned"] == 24
    assert inv["ok"] + inv["rejected_503"] + inv["clear_error"] == 24
    assert entry["post_check_ok"]
    assert len(entry["requests_detail"]) == 24


@needs_pool
def test_stress_pool_rejects_past_its_queue(bench, tiny_gguf: pathlib.Path) -> None:
    code, report = bench(
        "--model", str(tiny_gguf), "--stress", "60", "--instances", "2",
        "--threads-per-instance", "1", "--parallel", "1", "--stress-max-queue", "2",
        "--stress-queue-timeout", "2", "--stress-timeout", "60", "--max-tokens", "1500",
        "--n-ctx", "2048", "--warmup", "1", "--no-progress",
    )  # fmt: skip
    entry = report["targets"]["pool"]
    assert entry.get("error") is None, entry.get("error")
    inv = entry["invariant"]
    assert code == 0, inv["violations"]
    assert inv["holds"]
    assert inv["sent"] == inv["returned"] == 60
    assert inv["ok"] + inv["rejected_503"] + inv["clear_error"] == 60
    assert inv["ok"] >= 1
    # 60 at once against 2 one-slot instances and a queue of 2: the bound must turn some away.
    # Each request decodes 1500 tokens (over 1 s on one core), so the instances stay busy far
    # longer than the router takes to admit all 60. With 64-token requests on four slots, a
    # router starved by streaming on a loaded 2-core box admitted them no faster than they
    # finished, and none was turned away (CI, once). With two busy loops competing here:
    # 5-8 ok, the rest 503.
    assert inv["rejected_503"] > 0
    assert report["config"]["max_queue"] == 2


@needs_pool
def test_chat_replay_pool(bench, tiny_gguf: pathlib.Path) -> None:
    code, report = bench(
        "--model", str(tiny_gguf), "--chat-replay", "--conversations", "2", "--turns", "2",
        "--system-tokens", "300", "--instances", "1", "--threads-per-instance", "1",
        "--parallel", "1", *TINY_ARGS, "--n-ctx", "1024",
    )  # fmt: skip
    entry = report["targets"]["pool"]
    assert code == 0, entry.get("error") or entry["errors_by_type"]
    assert report["kind"] == "chat-replay"
    assert list(report["targets"]) == ["pool"]
    replay = report["config"]["chat_replay"]
    assert (replay["conversations"], replay["turns"]) == (2, 2)
    # The tiny model's tokens are single characters: 300 tokens is about 300 bytes.
    assert 300 <= replay["system_prompt_tokens"] < 400
    assert report["config"]["temperature"] == 0.0
    assert (entry["requests"], entry["ok"], entry["failed"], entry["skipped"]) == (4, 4, 0, 0)
    assert entry["completion_tokens"] == 4 * 8 and entry["short_completions"] == 0
    assert entry["aggregate_tok_s"] > 0
    turns = entry["per_turn"]
    assert [t["turn"] for t in turns] == [1, 2]
    for turn in turns:
        assert turn["ok"] == 2 and turn["ttft_s"]["p50"] > 0 and turn["aggregate_tok_s"] > 0
        prompt = turn["prompt_tokens"]
        # The system prompt, a user message and the template, at least; the pool reports
        # what it evaluated, never more than it was sent.
        assert prompt["sent"] > 2 * 300
        assert 0 < prompt["evaluated"] <= prompt["sent"]
        assert prompt["evaluated"] + prompt["cached"] == prompt["sent"]
    assert turns[1]["prompt_tokens"]["sent"] > turns[0]["prompt_tokens"]["sent"]
    details = entry["requests_detail"]
    assert sorted((d["extra"]["conversation"], d["extra"]["turn"]) for d in details) == [
        (0, 1), (0, 2), (1, 1), (1, 2),
    ]  # fmt: skip
    assert all(d["content"] and d["prompt_evaluated"] <= d["prompt_tokens"] for d in details)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--chat-replay", "--stress", "4"], "choose one"),
        (["--chat-replay", "--targets", "direct"], "HTTP target"),
        (["--chat-replay", "--n-ctx", "256", "--system-tokens", "300"], "--n-ctx is 256"),
    ],
)
def test_chat_replay_usage_errors(
    tiny_gguf: pathlib.Path,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    needle: str,
) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--model", str(tiny_gguf), "--out-dir", str(tmp_path), *flags])
    assert run(args) == 2
    assert needle in " ".join(capsys.readouterr().out.split())
    assert not list(tmp_path.iterdir()), "a refused run writes no results"


@pytest.mark.parametrize("flag", ["--conversations", "--turns", "--system-tokens"])
def test_chat_replay_counts_must_be_positive(flag: str) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--chat-replay", flag, "0"])
    assert exc.value.code == 2


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_chat_replay_think_time_must_not_be_negative(value: str) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args(["--chat-replay", "--think-time", "2.5"]).think_time == 2.5
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--chat-replay", "--think-time", value])
    assert exc.value.code == 2


def test_missing_model_is_a_usage_error(tmp_path: pathlib.Path) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--model", str(tmp_path / "nope.gguf"), "--out-dir", str(tmp_path)])
    assert run(args) == 2


def test_non_loopback_url_is_refused() -> None:
    assert loopback_base_url("http://127.0.0.1:8080/v1/") == "http://127.0.0.1:8080"
    assert loopback_base_url("localhost:9000") == "http://localhost:9000"
    with pytest.raises(ValueError, match="loopback"):
        loopback_base_url("http://10.0.0.5:8080")


def test_end_of_generation_ids_of_the_tiny_model(tiny_gguf: pathlib.Path) -> None:
    from tinymodel import EOS_ID, IM_END_ID

    assert {EOS_ID, IM_END_ID} <= set(end_of_generation_ids(tiny_gguf))


def test_token_counter_of_the_tiny_model(tiny_gguf: pathlib.Path) -> None:
    with token_counter(tiny_gguf) as count:
        assert count("") == 0
        # The tiny vocabulary has one piece per character, and a word-start marker.
        assert count("abc") == len("abc") + 1
        assert count("abc " * 50) > 150


# -- client: how each kind of ending is classified -----------------------------------------


def _sse(*events: Any) -> bytes:
    lines = [e if isinstance(e, str) else json.dumps(e) for e in events]
    return "".join(f"data: {line}\n\n" for line in lines).encode()


def _chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
SSE = {"content-type": "text/event-stream"}


def _send(
    response: httpx.Response | None, timeout: float = 5.0, keep_content: bool = False
) -> RequestResult:
    async def handler(request: httpx.Request) -> httpx.Response:
        if response is None:
            await asyncio.sleep(10)
        assert response is not None
        return response

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_chat(
                client, "http://127.0.0.1/v1/chat/completions", {}, 7, timeout,
                keep_content=keep_content,
            )  # fmt: skip

    return asyncio.run(go())


def test_client_ok_stream_counts_usage_tokens() -> None:
    body = _sse(_chunk("a"), _chunk("b"), _chunk(finish="length"), USAGE, "[DONE]")
    result = _send(httpx.Response(200, headers=SSE, content=body))
    assert result.ok and result.error is None
    assert (result.completion_tokens, result.tokens_source, result.chunks) == (2, "usage", 2)
    assert result.ttft_s is not None and result.e2e_s >= result.ttft_s
    assert result.index == 7


def test_client_reads_the_servers_prompt_counts_and_keeps_the_text() -> None:
    timings = {"prompt_n": 3, "cache_n": 40, "prompt_ms": 12.5, "predicted_n": 2}
    final = {**_chunk(finish="length"), "timings": timings}
    usage = {"choices": [], "usage": {"prompt_tokens": 43, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 40}}}  # fmt: skip
    body = _sse(_chunk("Hel"), _chunk("lo"), final, usage, "[DONE]")
    result = _send(httpx.Response(200, headers=SSE, content=body), keep_content=True)
    assert result.ok
    assert (result.prompt_tokens, result.prompt_evaluated, result.prompt_cached) == (43, 3, 40)
    assert result.server_ttft_s == pytest.approx(0.0125)
    assert result.content == "Hello" and result.as_dict()["content"] == "Hello"


def test_client_derives_evaluated_tokens_from_openais_cached_tokens() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 2,
             "prompt_tokens_details": {"cached_tokens": 32}}}  # fmt: skip
    body = _sse(_chunk("a"), _chunk(finish="length"), usage, "[DONE]")
    result = _send(httpx.Response(200, headers=SSE, content=body))
    assert (result.prompt_evaluated, result.prompt_cached) == (18, 32)
    # Not asked for: the text is not kept.
    assert result.content is None and "content" not in result.as_dict()


def test_client_without_timings_or_cached_tokens_knows_no_evaluated_count() -> None:
    body = _sse(_chunk("a"), _chunk(finish="length"), USAGE, "[DONE]")
    result = _send(httpx.Response(200, headers=SSE, content=body))
    assert result.prompt_tokens == 5
    assert result.prompt_evaluated is None and result.prompt_cached is None


def test_client_counts_chunks_without_usage() -> None:
    body = _sse(_chunk("a"), _chunk("b"), _chunk("c"), _chunk(finish="length"), "[DONE]")
    result = _send(httpx.Response(200, headers=SSE, content=body))
    assert result.ok and (result.completion_tokens, result.tokens_source) == (3, "chunks")


def test_client_http_error_with_openai_body() -> None:
    error = {"error": {"message": "queue full", "type": "server_error", "code": "queue_full"}}
    result = _send(httpx.Response(503, headers={"retry-after": "2"}, json=error))
    assert not result.ok
    assert result.error == "http_503:queue_full"
    assert result.clear_error and result.retry_after == "2"
    assert result.error_message == "queue full"


def test_client_http_error_without_body_is_not_clear() -> None:
    result = _send(httpx.Response(500, content=b"<html>oops</html>"))
    assert result.error == "http_500:no_error_body" and not result.clear_error


def test_client_sse_error_event() -> None:
    error = {"error": {"message": "worker died", "type": "server_error", "code": "worker_crashed"}}
    result = _send(httpx.Response(200, headers=SSE, content=_sse(_chunk("a"), error)))
    assert result.error == "sse_error:worker_crashed" and result.clear_error


@pytest.mark.parametrize(
    ("events", "error"),
    [
        ((_chunk("a"),), "truncated:no_finish_reason"),
        ((_chunk("a"), _chunk(finish="length")), "truncated:no_done"),
        ((_chunk("a"), "{not json"), "protocol:bad_json"),
    ],
)
def test_client_broken_streams(events: tuple[Any, ...], error: str) -> None:
    result = _send(httpx.Response(200, headers=SSE, content=_sse(*events)))
    assert result.error == error and not result.ok and not result.clear_error


def test_client_timeout_counts_as_hung() -> None:
    result = _send(None, timeout=0.05)
    assert result.error == "timeout" and not result.ok


# -- stress invariant ------------------------------------------------------------------------


def _result(index: int, **fields: Any) -> RequestResult:
    return RequestResult(index=index, **fields)


def test_invariant_holds_for_success_rejection_and_clear_errors() -> None:
    results = [
        _result(0, ok=True),
        _result(1, status=503, error="http_503:queue_full", clear_error=True),
        _result(2, status=502, error="http_502:worker_crashed", clear_error=True),
    ]
    verdict = check_invariant(3, results, post_check_ok=True)
    assert verdict["holds"], verdict["violations"]
    assert (verdict["ok"], verdict["rejected_503"], verdict["clear_error"]) == (1, 1, 1)


@pytest.mark.parametrize(
    ("results", "post_ok", "needle"),
    [
        ([_result(0, ok=True), _result(1, error="timeout")], True, "hung"),
        ([_result(0, ok=True), _result(1, error="truncated:no_done")], True, "without a clear"),
        ([_result(0, ok=True)], True, "lost"),
        ([_result(0, ok=True), _result(1, ok=True)], False, "after the stress"),
    ],
)
def test_invariant_breaks(results: list[RequestResult], post_ok: bool, needle: str) -> None:
    verdict = check_invariant(2, results, post_check_ok=post_ok)
    assert not verdict["holds"]
    assert any(needle in line for line in verdict["violations"])


# -- statistics ------------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert distribution([None, 1.0, 3.0])["mean"] == 2.0


METRICS_BEFORE = """\
# HELP llamapool_queue_wait_seconds Time requests spent queued.
# TYPE llamapool_queue_wait_seconds histogram
llamapool_queue_wait_seconds_bucket{model="bench",le="0.1"} 4
llamapool_queue_wait_seconds_bucket{model="bench",le="1.0"} 4
llamapool_queue_wait_seconds_bucket{model="bench",le="+Inf"} 4
llamapool_queue_wait_seconds_sum{model="bench"} 0.2
llamapool_queue_wait_seconds_count{model="bench"} 4
llamapool_queue_wait_seconds_count{model="other"} 100
"""
METRICS_AFTER = """\
llamapool_queue_wait_seconds_bucket{model="bench",le="0.1"} 6
llamapool_queue_wait_seconds_bucket{model="bench",le="1.0"} 14
llamapool_queue_wait_seconds_bucket{model="bench",le="+Inf"} 14
llamapool_queue_wait_seconds_sum{model="bench"} 5.2
llamapool_queue_wait_seconds_count{model="bench"} 14
llamapool_queue_wait_seconds_count{model="other"} 900
"""


def test_queue_wait_from_prometheus_histograms() -> None:
    before = find_queue_wait(parse_samples(METRICS_BEFORE), "bench")
    after = find_queue_wait(parse_samples(METRICS_AFTER), "bench")
    wait = level_queue_wait(before, after)
    assert wait is not None
    assert wait["count"] == 10 and wait["mean"] == pytest.approx(0.5)
    # 2 of the 10 new waits are under 0.1 s, 8 between 0.1 and 1 s.
    assert 0.1 < wait["p50"] < 1.0
    assert find_queue_wait(parse_samples("up 1\n"), "bench") is None
    assert level_queue_wait(None, after) is None


@needs_pool
def test_versus_takes_turns_and_pairs_the_rounds(
    tiny_gguf: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import versus
    from benchmarks.servers import write_pool_config

    tag = f"versus-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv(TAG_ENV, tag)
    configs = []
    for name, slots in (("wide", 2), ("narrow", 1)):
        path = tmp_path / f"{name}.yaml"
        write_pool_config(path, tiny_gguf, 1, 512, 1, 16, 30.0, slots)
        configs += ["--pool", f"{name}={path}"]
    flags = [
        "--model", str(tiny_gguf), "--levels", "1,2", "--rounds", "2", "--requests", "2",
        "--max-tokens", "8", "--soak", "6", "--soak-concurrency", "3", "--soak-tokens", "4",
        "--out-dir", str(tmp_path), "--name", "v",
    ]  # fmt: skip
    code = versus.main(configs + flags)
    report = json.loads((tmp_path / "v.json").read_text())
    assert code == 0
    assert report["config"]["reference"] == "narrow"  # no llama-server: the last one
    for name in ("wide", "narrow"):
        for level, count in (("1", 2), ("2", 4)):  # --requests, at least twice the level
            batches = report["batches"][name][level]
            assert len(batches) == 2  # one per round
            assert all(b["ok"] == count and b["completion_tokens"] == 8 * count for b in batches)
            assert all(b["server_cpu_s"] >= b["main_cpu_s"] >= 0 for b in batches)
        assert report["soak"][name]["ok"] == 6
        # CPU seconds tick at 10 ms: one tiny batch may read 0, all of them together not.
        spent = [b["server_cpu_s"] for bs in report["batches"][name].values() for b in bs]
        assert sum(spent) + report["soak"][name]["server_cpu_s"] > 0
    wide = report["summary"]["wide"]["2"]
    assert wide["tok_s_ratio_vs_narrow"] > 0 and wide["failed"] == 0
    assert "tok_s_ratio_vs_narrow" not in report["summary"]["narrow"]["2"]
    assert not tagged_processes(tag), "the benchmark left processes behind"
