"""The worker's stall watchdog as a pure function of its clocks (processes: tests/faults)."""

from __future__ import annotations

from types import SimpleNamespace

from llamapool.pool.worker import Worker


def _worker(active, progress_at, busy_since, timeout=10.0):
    return SimpleNamespace(
        active=set(active),
        engine=SimpleNamespace(progress_at=progress_at),
        busy_since=busy_since,
        args=SimpleNamespace(stall_timeout=timeout),
    )


def test_idle_worker_never_stalls():
    assert Worker._engine_stalled(_worker([], progress_at=0.0, busy_since=0.0), now=1000.0) is None


def test_busy_engine_silent_past_the_timeout_stalls():
    why = Worker._engine_stalled(_worker(["r1", "r2"], 100.0, 100.0), now=111.0)
    assert why is not None
    assert "no progress for 11 s with 2 request(s)" in why
    assert "engine_stall_timeout 10 s" in why


def test_a_request_just_handed_to_a_long_idle_engine_is_not_a_stall():
    # The engine last stamped progress long ago (idle); the request arrived a moment ago.
    assert Worker._engine_stalled(_worker(["r1"], 0.0, busy_since=999.5), now=1000.0) is None


def test_recent_progress_is_not_a_stall():
    assert Worker._engine_stalled(_worker(["r1"], 995.0, busy_since=0.0), now=1000.0) is None
