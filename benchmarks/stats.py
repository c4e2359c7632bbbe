"""Summaries of one concurrency level: throughput, latency percentiles, errors by type."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from benchmarks.client import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float | None]) -> dict[str, float | None]:
    """p50/p95/p99, mean, min and max of the values that are not None."""
    present = [v for v in values if v is not None]
    return {
        "p50": percentile(present, 50),
        "p95": percentile(present, 95),
        "p99": percentile(present, 99),
        "mean": sum(present) / len(present) if present else None,
        "min": min(present) if present else None,
        "max": max(present) if present else None,
    }


def errors_by_type(results: Iterable[RequestResult]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in results if not r.ok and r.error).items()))


def summarize_level(
    concurrency: int,
    results: Sequence[RequestResult],
    wall_s: float,
    max_tokens: int,
    queue_wait: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything measured at one concurrency level, JSON-ready."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    per_stream = [r.completion_tokens / r.e2e_s for r in ok if r.e2e_s]
    decode = [
        (r.completion_tokens - 1) / r.decode_s for r in ok if r.decode_s and r.completion_tokens > 1
    ]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "errors_by_type": errors_by_type(results),
        "wall_s": wall_s,
        "completion_tokens": tokens,
        # Requests that stopped before max_tokens: EOS suppression did not hold.
        "short_completions": sum(1 for r in ok if r.completion_tokens != max_tokens),
        "tokens_source": sorted({r.tokens_source for r in ok}),
        "aggregate_tok_s": tokens / wall_s if wall_s > 0 else None,
        "stream_tok_s": distribution(per_stream),
        "decode_tok_s": distribution(decode),
        "ttft_s": distribution(r.ttft_s for r in ok),
        "routing_overhead_s": distribution(
            r.ttft_s - r.server_ttft_s
            for r in ok
            if r.ttft_s is not None and r.server_ttft_s is not None
        ),
        "e2e_s": distribution(r.e2e_s for r in ok),
        "queue_wait_s": queue_wait,
        "requests_detail": [r.as_dict() for r in results],
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
