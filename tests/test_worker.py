"""Worker pieces without a process: the stall watchdog's clocks, the choice of engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llamapool.config import parse_config
from llamapool.pool.batch import BatchEngine
from llamapool.pool.engine import Engine
from llamapool.pool.worker import Worker, make_engine


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


def test_handler_only_chat_formats_get_the_one_at_a_time_engine(tiny_gguf):
    def spec(**cfg):
        entry = {"id": "t", "config": {"model_path": str(tiny_gguf), "n_ctx": 256, **cfg}}
        return parse_config({"models": [entry]}).models["t"]

    plain = make_engine(spec())
    assert isinstance(plain, BatchEngine)
    plain.close()
    handler = make_engine(spec(chat_format="chatml-function-calling"))
    assert type(handler) is Engine
    with pytest.raises(ValueError, match="set n_parallel: 1"):
        make_engine(spec(chat_format="chatml-function-calling", n_parallel=2))
