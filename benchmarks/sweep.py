"""The concurrency sweep: each target in turn, warm-up, then a fixed batch per level."""

from __future__ import annotations

import pathlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rich.progress import Progress, TaskID

from benchmarks.client import make_requests
from benchmarks.modelfile import ModelFileError
from benchmarks.queue_wait import level_queue_wait
from benchmarks.servers import ServerStartError
from benchmarks.stats import errors_by_type, ratio, summarize_level
from benchmarks.targets import TargetSettings, open_target

# Warm-up requests are short: they only need every instance loaded and its pages touched.
WARMUP_MAX_TOKENS = 16
# Warm-up seeds live apart from the measured ones.
WARMUP_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class LoadSettings:
    """The load every target gets."""

    levels: list[int]
    requests: int
    warmup: int
    max_tokens: int
    temperature: float
    seed: int
    logit_bias: dict[int, float]
    request_timeout: float


async def warm_up(target: Any, load: LoadSettings, concurrency: int) -> dict[str, Any]:
    """Send the warm-up requests (excluded from every number) and say how they went."""
    if load.warmup <= 0:
        return {"requests": 0, "ok": 0, "errors_by_type": {}}
    requests = make_requests(
        load.warmup,
        min(load.max_tokens, WARMUP_MAX_TOKENS),
        load.temperature,
        load.seed + WARMUP_SEED_OFFSET,
        load.logit_bias,
    )
    results, wall = await target.run_level(
        requests, concurrency, load.request_timeout, lambda result: None
    )
    return {
        "requests": len(results),
        "ok": sum(r.ok for r in results),
        "errors_by_type": errors_by_type(results),
        "wall_s": wall,
    }


async def on_each_target(
    targets: list[str],
    settings: TargetSettings,
    load: LoadSettings,
    workdir: pathlib.Path,
    progress: Progress,
    clients: int,
    client_timeout: float,
    work: Callable[[Any, TaskID], Awaitable[dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """Start each target in turn, warm it up, run `work(target, task)`, stop it.

    The report by name: what `work` returned, the warm-up and the target's description; a
    target that could not start or run has `error` set.
    """
    report: dict[str, dict[str, Any]] = {}
    for name in targets:
        entry: dict[str, Any] = {"kind": name, "error": None}
        report[name] = entry
        task = progress.add_task(f"{name}: starting", total=None)
        target = None
        try:
            async with open_target(name, settings, workdir, clients, client_timeout) as target:
                progress.update(task, description=f"{name}: warming up")
                entry["warmup"] = await warm_up(target, load, max(1, load.warmup))
                results = await work(target, task)
            entry.update(results)
        except (ServerStartError, ModelFileError, ValueError, OSError) as exc:
            entry["error"] = str(exc)
        finally:
            progress.remove_task(task)
        if target is not None:
            # After the stop, so the pids include every worker the server ever showed.
            entry.update(target.describe())
    return report


async def run_sweep(
    targets: list[str],
    settings: TargetSettings,
    load: LoadSettings,
    workdir: pathlib.Path,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Every target's results by name; a target that could not start has `error` set."""
    report: dict[str, dict[str, Any]] = {}
    for name in targets:
        entry: dict[str, Any] = {"kind": name, "error": None, "levels": []}
        report[name] = entry
        levels = [1] if name == "direct" else load.levels
        starting = progress.add_task(f"{name}: starting", total=None)
        target = None
        try:
            async with open_target(
                name, settings, workdir, max(levels + [load.warmup]), load.request_timeout
            ) as target:
                progress.update(starting, description=f"{name}: warming up")
                entry["warmup"] = await warm_up(target, load, max(1, load.warmup))
                progress.remove_task(starting)
                starting = None
                for concurrency in levels:
                    entry["levels"].append(
                        await _run_level(target, name, concurrency, load, progress)
                    )
        except (ServerStartError, ModelFileError, ValueError, OSError) as exc:
            entry["error"] = str(exc)
        finally:
            if starting is not None:
                progress.remove_task(starting)
        if target is not None:
            # After the stop, so the pids include every worker the server ever showed.
            entry.update(target.describe())
    return report


async def _run_level(
    target: Any, name: str, concurrency: int, load: LoadSettings, progress: Progress
) -> dict[str, Any]:
    count = max(load.requests, concurrency)
    requests = make_requests(count, load.max_tokens, load.temperature, load.seed, load.logit_bias)
    task = progress.add_task(f"{name}: concurrency {concurrency}", total=count)
    before = await target.queue_histogram()
    results, wall = await target.run_level(
        requests, concurrency, load.request_timeout, lambda result: progress.advance(task)
    )
    after = await target.queue_histogram()
    return summarize_level(
        concurrency, results, wall, load.max_tokens, level_queue_wait(before, after)
    )


def _level(
    targets: dict[str, dict[str, Any]], name: str, concurrency: int
) -> dict[str, Any] | None:
    entry = targets.get(name)
    if not entry or entry.get("error"):
        return None
    for level in entry["levels"]:
        if level["concurrency"] == concurrency:
            return level
    return None


def _get(level: dict[str, Any] | None, metric: str, stat: str | None = None) -> float | None:
    if level is None:
        return None
    value = level.get(metric)
    return value.get(stat) if stat and isinstance(value, dict) else value


def _ratio_of(
    level: dict[str, Any] | None,
    baseline: dict[str, Any] | None,
    metric: str,
    stat: str | None = None,
) -> float | None:
    return ratio(_get(level, metric, stat), _get(baseline, metric, stat))


def compare(
    targets: dict[str, dict[str, Any]],
    http_floor: dict[str, Any] | None = None,
    paired: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The reported (not asserted) targets: pool vs mutex per level, single stream vs direct."""
    candidate = "pool" if "pool" in targets else "url" if "url" in targets else None
    if candidate is None:
        return {"candidate": None}
    entry = targets[candidate]
    per_level = []
    for level in entry.get("levels", []):
        c = level["concurrency"]
        mutex = _level(targets, "mutex", c)
        per_level.append(
            {
                "concurrency": c,
                "aggregate_tok_s_ratio": _ratio_of(level, mutex, "aggregate_tok_s"),
                "ttft_p50_ratio": _ratio_of(level, mutex, "ttft_s", "p50"),
                "e2e_p95_ratio": _ratio_of(level, mutex, "e2e_s", "p95"),
            }
        )
    single = _level(targets, candidate, 1)
    direct = _level(targets, "direct", 1)
    ttft_c, ttft_d = _get(single, "ttft_s", "p50"), _get(direct, "ttft_s", "p50")
    at8 = next((row for row in per_level if row["concurrency"] == 8), None)
    routing = _get(single, "routing_overhead_s", "p50")
    floor = ((http_floor or {}).get("ttft_s") or {}).get("p50")
    return {
        "candidate": candidate,
        f"{candidate}_over_mutex": per_level,
        "single_stream": {
            "candidate_tok_s": _get(single, "stream_tok_s", "p50"),
            "direct_tok_s": _get(direct, "stream_tok_s", "p50"),
            "ratio": _ratio_of(single, direct, "stream_tok_s", "p50"),
        },
        "ttft_overhead_s": None if ttft_c is None or ttft_d is None else ttft_c - ttft_d,
        # Client TTFT minus the server's own, per request, at concurrency 1: HTTP + routing.
        "routing_overhead_p50_s": routing,
        # The same client against a server that answers at once: HTTP alone.
        "http_floor_ttft_p50_s": floor,
        "routing_beyond_http_floor_p50_s": (
            None if routing is None or floor is None else routing - floor
        ),
        "aggregate_c8_ratio_vs_mutex": at8["aggregate_tok_s_ratio"] if at8 else None,
        # The same three, with the pool, the floor and direct taking turns (benchmarks/paired.py).
        "paired": _paired_summary(paired),
    }


def _paired_summary(paired: dict[str, Any] | None) -> dict[str, Any] | None:
    if not paired or paired.get("error") or not paired.get("ok"):
        return None
    return {
        "pairs": paired["ok"],
        "single_stream_ratio_p50": paired["stream_tok_s_ratio"]["p50"],
        "routing_overhead_p50_s": paired["routing_overhead_s"]["p50"],
        "http_floor_ttft_p50_s": paired["http_floor_ttft_s"]["p50"],
        "routing_beyond_http_floor_p50_s": paired["routing_beyond_http_floor_s"]["p50"],
    }
