"""Stress mode: N requests at once against a small queue, and the invariant they must keep.

Every request ends as a success, a 503 (queue full / queue timeout) or another clear error;
none hangs past its client timeout, none is lost, the counts add up, and the server still
answers afterwards.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.progress import Progress, TaskID

from benchmarks.client import RequestResult, make_requests
from benchmarks.stats import distribution, errors_by_type
from benchmarks.sweep import LoadSettings, on_each_target
from benchmarks.targets import TargetSettings

OUTCOMES = ("ok", "rejected_503", "clear_error", "unclear_error", "hung")


@dataclass(frozen=True)
class StressSettings:
    requests: int
    client_timeout: float


def outcome(result: RequestResult) -> str:
    """Which of OUTCOMES a request ended in."""
    if result.ok:
        return "ok"
    if result.error == "timeout":
        return "hung"
    if result.clear_error and result.status == 503:
        return "rejected_503"
    if result.clear_error:
        return "clear_error"
    return "unclear_error"


def check_invariant(
    sent: int, results: Sequence[RequestResult], post_check_ok: bool | None
) -> dict[str, Any]:
    """Counts per outcome and the invariant's verdict, with one line per violation."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for result in results:
        counts[outcome(result)] += 1
    returned = len(results)
    lost = sent - len({r.index for r in results})
    violations = []
    if counts["hung"]:
        violations.append(f"{counts['hung']} request(s) hung past the client timeout")
    if counts["unclear_error"]:
        kinds = errors_by_type(r for r in results if outcome(r) == "unclear_error")
        violations.append(
            f"{counts['unclear_error']} request(s) failed without a clear error: {kinds}"
        )
    if lost:
        violations.append(f"{lost} request(s) lost (sent {sent}, got {returned} results)")
    if sum(counts.values()) != returned or returned != sent:
        violations.append(f"counts do not add up: {counts} over {returned} results for {sent} sent")
    if post_check_ok is False:
        violations.append("the server did not serve a request after the stress")
    return {
        "sent": sent,
        "returned": returned,
        "lost": lost,
        **counts,
        "holds": not violations,
        "violations": violations,
    }


async def run_stress(
    targets: list[str],
    settings: TargetSettings,
    load: LoadSettings,
    stress: StressSettings,
    workdir: pathlib.Path,
    progress: Progress,
) -> dict[str, dict[str, Any]]:
    """Every target's stress result by name."""

    async def work(target: Any, task: TaskID) -> dict[str, Any]:
        progress.update(
            task, description=f"{target.name}: {stress.requests} at once", total=stress.requests
        )
        requests = make_requests(
            stress.requests, load.max_tokens, load.temperature, load.seed, load.logit_bias
        )
        results, wall = await target.run_level(
            requests,
            stress.requests,
            stress.client_timeout,
            lambda result: progress.advance(task),
        )
        post_ok = await _post_check(target, load)
        return _summarize(stress.requests, results, wall, post_ok)

    return await on_each_target(
        targets, settings, load, workdir, progress, stress.requests, stress.client_timeout, work
    )


async def _post_check(target: Any, load: LoadSettings) -> bool:
    """The server still answers: healthy, and one short request succeeds."""
    if not await target.healthy():
        return False
    request = make_requests(1, 4, load.temperature, load.seed, load.logit_bias)
    results, _ = await target.run_level(request, 1, load.request_timeout, lambda result: None)
    return bool(results and results[0].ok)


def _summarize(
    sent: int, results: list[RequestResult], wall: float, post_ok: bool
) -> dict[str, Any]:
    by_outcome: dict[str, list[RequestResult]] = {name: [] for name in OUTCOMES}
    for result in results:
        by_outcome[outcome(result)].append(result)
    return {
        "wall_s": wall,
        "post_check_ok": post_ok,
        "invariant": check_invariant(sent, results, post_ok),
        "errors_by_type": errors_by_type(results),
        "retry_after_missing_on_503": sum(
            1 for r in results if r.status == 503 and r.retry_after is None
        ),
        "e2e_s_by_outcome": {
            name: distribution(r.e2e_s for r in group)
            for name, group in by_outcome.items()
            if group
        },
        "completion_tokens": sum(r.completion_tokens for r in by_outcome["ok"]),
        "requests_detail": [r.as_dict() for r in results],
    }
