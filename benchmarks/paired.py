"""Paired single-stream runs: the HTTP floor, the pool and in-process llama-cpp-python take
turns request by request, so the host's drift lands on both sides of every ratio.

The sweep runs each target for minutes before the next; on a shared VM whose speed moves
by 20% within that time, single-stream ratios of separate phases swing past the targets
they check (pool/direct measured 0.89–1.17x in back-to-back runs). Taking turns makes
each pair share one moment of the host; the medians of the per-pair numbers are what the
comparisons report.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any

from rich.progress import Progress

from benchmarks.client import RequestResult, make_requests
from benchmarks.stats import distribution
from benchmarks.sweep import LoadSettings, warm_up
from benchmarks.targets import TargetSettings, open_floor, open_target

# Floor requests before the pairs: the first few warm the connection up.
_FLOOR_WARMUP = 5


async def run_paired(
    settings: TargetSettings,
    load: LoadSettings,
    workdir: pathlib.Path,
    pairs: int,
    progress: Progress,
) -> dict[str, Any]:
    """`pairs` turns of floor (twice), pool, direct, summarized."""
    requests = make_requests(pairs, load.max_tokens, load.temperature, load.seed, load.logit_bias)
    task = progress.add_task("paired: floor / pool / direct", total=pairs)
    rows: list[tuple[RequestResult, RequestResult, RequestResult]] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            pool = await stack.enter_async_context(
                open_target("pool", settings, workdir, 1, load.request_timeout)
            )
            direct = await stack.enter_async_context(
                open_target("direct", settings, workdir, 1, load.request_timeout)
            )
            floor = await stack.enter_async_context(open_floor(workdir))
            await warm_up(pool, load, 1)
            await warm_up(direct, load, 1)
            for i in range(_FLOOR_WARMUP):
                await floor(i)
            for request in requests:
                # The floor goes first, twice: direct's generation in this process leaves
                # the client's code cold, and the first request after it pays for that. The
                # second one, like the pool's request after it, comes from a warm client;
                # the floor server is warm by then too, so the pool, whose router idled
                # through direct's request, is held to the stricter standard.
                await floor(request.index)
                f = await floor(request.index)
                (p,), _ = await pool.run_level([request], 1, load.request_timeout, _ignore)
                (d,), _ = await direct.run_level([request], 1, load.request_timeout, _ignore)
                rows.append((p, f, d))
                progress.advance(task)
    finally:
        progress.remove_task(task)
    return summarize_pairs(rows)


def _ignore(result: RequestResult) -> None:
    pass


def summarize_pairs(rows: list[tuple[RequestResult, RequestResult, RequestResult]]) -> dict:
    """Per-pair ratios and differences of (pool, floor, direct) results, as distributions."""
    ok = [(p, f, d) for p, f, d in rows if p.ok and f.ok and d.ok]
    ratios, overheads, beyond = [], [], []
    for p, f, d in ok:
        if p.e2e_s and d.e2e_s:
            ratios.append((p.completion_tokens / p.e2e_s) / (d.completion_tokens / d.e2e_s))
        if p.ttft_s is not None and p.server_ttft_s is not None:
            overheads.append(p.ttft_s - p.server_ttft_s)
            if f.ttft_s is not None:
                beyond.append(p.ttft_s - p.server_ttft_s - f.ttft_s)
    return {
        "pairs": len(rows),
        "ok": len(ok),
        "pool_stream_tok_s": distribution(p.completion_tokens / p.e2e_s for p, _, _ in ok),
        "direct_stream_tok_s": distribution(d.completion_tokens / d.e2e_s for _, _, d in ok),
        "stream_tok_s_ratio": distribution(ratios),
        "routing_overhead_s": distribution(overheads),
        "http_floor_ttft_s": distribution(f.ttft_s for _, f, _ in ok),
        "routing_beyond_http_floor_s": distribution(beyond),
    }
