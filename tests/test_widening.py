"""WidenGuard: which thread count a widened worker's decodes run, from their cost per row.
The same paths run in a real pool in tests/e2e/test_elastic_threads.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from llamapool.pool.transitions import IllegalTransition
from llamapool.pool.widening import (
    HOME_SAMPLES,
    PROBE_EVERY,
    RETRY_FIRST,
    RETRY_MAX,
    TRIAL_DECODES,
    WIDEN_TRANSITIONS,
    CoreLoad,
    WidenGuard,
    Widening,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard_at_home(cost: float = 0.030) -> tuple[WidenGuard, Clock]:
    """A one-thread guard that has timed home decodes at `cost` seconds a row."""
    clock = Clock()
    guard = WidenGuard(1, "model m", clock)
    for _ in range(3):
        assert guard.observe(1, 1, cost) == 1
    assert guard.state is Widening.HOME
    return guard, clock


def widen(guard: WidenGuard, cost: float = 0.017) -> None:
    """Run a granted guard's trial decodes at `cost` a row, each on two threads: it widens."""
    for _ in range(TRIAL_DECODES):
        assert guard.observe(2, 1, cost) == 2
    assert guard.state is Widening.WIDE


def test_a_grant_before_any_home_decode_times_home_decodes_first():
    guard = WidenGuard(1, "model m", Clock())
    assert guard.grant(2) == 1
    assert guard.state is Widening.MEASURING
    for _ in range(HOME_SAMPLES - 1):
        assert guard.observe(1, 1, 0.030) == 1
    assert guard.observe(1, 1, 0.030) == 2
    assert guard.state is Widening.TRIAL


def test_widened_decodes_that_pay_keep_the_grant(caplog):
    guard, _ = guard_at_home()
    assert guard.grant(2) == 2
    assert guard.state is Widening.TRIAL
    caplog.set_level(logging.INFO, "llamapool.widening")
    widen(guard)
    assert "decode threads trial → wide" in caplog.text
    for _ in range(20):  # steady: it stays wide
        assert guard.observe(2, 4, 4 * 0.018) == 2
    assert guard.state is Widening.WIDE


def test_a_trial_slower_than_home_declines_and_retries_later(caplog):
    guard, clock = guard_at_home()
    guard.grant(2)
    caplog.set_level(logging.INFO, "llamapool.widening")
    # Slower per row than at home, not by SLOW: judged on the trial's median.
    for _ in range(TRIAL_DECODES - 1):
        assert guard.observe(2, 1, 0.033) == 2
    assert guard.observe(2, 1, 0.033) == 1
    assert guard.state is Widening.DECLINED
    assert "lent cores busy; home for 1 s" in caplog.text
    assert guard.granted == 2  # the supervisor's grant stands
    # At home until the retry time, whatever it observes.
    assert guard.observe(1, 1, 0.030) == 1
    clock.now += RETRY_FIRST
    assert guard.observe(1, 1, 0.030) == 2
    assert guard.state is Widening.TRIAL


def test_two_slow_decodes_in_a_row_end_a_widening_at_once():
    guard, _ = guard_at_home()
    guard.grant(2)
    widen(guard)
    assert guard.observe(2, 1, 0.070) == 2  # one slow decode: noise, perhaps
    assert guard.observe(2, 1, 0.017) == 2
    assert guard.observe(2, 1, 0.070) == 2
    assert guard.observe(2, 1, 0.070) == 1  # two in a row: the lent core is busy
    assert guard.state is Widening.DECLINED


def test_one_collapsed_decode_ends_a_widening_at_once(caplog):
    guard, _ = guard_at_home()
    guard.grant(2)
    caplog.set_level(logging.INFO, "llamapool.widening")
    assert guard.observe(2, 1, 0.300) == 1  # 10x home: a busy loop on the lent core
    assert guard.state is Widening.DECLINED
    assert "one decode: 300.0 ms a row widened vs 30.0 ms at home" in caplog.text


def test_a_grant_before_the_retry_time_stays_home():
    guard, clock = guard_at_home()
    guard.grant(2)
    guard.observe(2, 1, 0.300)
    assert guard.grant(1) == 1  # the request ended; the next one gets the cores again
    assert guard.state is Widening.HOME
    assert guard.grant(2) == 1
    assert guard.state is Widening.DECLINED
    clock.now = guard.retry_at
    assert guard.grant(1) == 1 and guard.grant(2) == 2
    assert guard.state is Widening.TRIAL


def test_a_wide_guard_declines_when_its_average_stops_paying():
    guard, _ = guard_at_home()
    guard.grant(2)
    widen(guard)
    n = 0
    while guard.state is Widening.WIDE:
        guard.observe(2, 1, 0.032)  # slower than home, not by SLOW
        n += 1
        assert n < 20
    assert guard.state is Widening.DECLINED


def test_each_failed_trial_doubles_the_wait_up_to_the_maximum_and_one_that_pays_resets_it():
    guard, clock = guard_at_home()
    guard.grant(2)
    waits = []
    for _ in range(7):
        assert guard.state is Widening.TRIAL
        guard.observe(2, 1, 0.5)
        guard.observe(2, 1, 0.5)
        assert guard.state is Widening.DECLINED
        waits.append(guard.retry_at - clock.now)
        clock.now = guard.retry_at
        guard.observe(1, 1, 0.030)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, RETRY_MAX, RETRY_MAX]
    widen(guard)
    assert guard.retry_after == RETRY_FIRST


def test_giving_the_cores_back_returns_home_from_any_state():
    guard, clock = guard_at_home()
    for prepare in (
        lambda: None,  # TRIAL
        lambda: widen(guard),  # WIDE
        lambda: [guard.observe(2, 1, 0.5) for _ in range(2)],  # DECLINED
    ):
        clock.now += RETRY_MAX
        guard.grant(2)
        prepare()
        assert guard.grant(1) == 1
        assert guard.state is Widening.HOME


def test_a_grant_while_declined_waits_for_the_retry_time():
    guard, clock = guard_at_home()
    guard.grant(2)
    guard.observe(2, 1, 0.5)
    guard.observe(2, 1, 0.5)
    assert guard.state is Widening.DECLINED
    assert guard.grant(3) == 1  # a wider grant: the cores are as busy as before
    assert guard.state is Widening.DECLINED
    clock.now = guard.retry_at
    assert guard.observe(1, 1, 0.030) == 3


def test_decodes_from_before_a_change_are_not_judged():
    guard, _ = guard_at_home()
    guard.grant(2)
    assert guard.observe(3, 1, 5.0) == 2  # ran with another grant's width
    assert guard.state is Widening.TRIAL and not guard.recent


def test_the_table_refuses_moves_it_does_not_list():
    guard = WidenGuard(1, "model m", Clock())
    assert Widening.WIDE not in WIDEN_TRANSITIONS[Widening.HOME]
    with pytest.raises(IllegalTransition, match="home → wide"):
        guard._move(Widening.WIDE, "no trial")


def test_a_widened_decode_is_compared_with_home_decodes_of_its_own_size():
    guard, _ = guard_at_home(0.030)  # one row alone
    for _ in range(3):
        guard.observe(1, 8, 8 * 0.016)  # eight rows: cheaper each
    guard.grant(2)
    widen(guard, 0.018)  # 0.6x one row at home, 1.1x eight rows
    for _ in range(5):
        guard.observe(2, 8, 8 * 0.017)  # slower than eight rows at home
    assert guard.state is Widening.DECLINED


def test_a_wide_guard_times_one_decode_in_probe_every_at_home():
    # A row's cost grows with the context: the home cost is kept current, or a long answer
    # would compare its late widened rows with its early home ones.
    guard, _ = guard_at_home(0.020)
    guard.grant(2)
    widen(guard, 0.012)
    for _ in range(PROBE_EVERY - TRIAL_DECODES - 1):
        assert guard.observe(2, 1, 0.012) == 2
    assert guard.observe(2, 1, 0.018) == 1  # the probe: one decode at home
    assert guard.observe(1, 1, 0.040) == 2  # the context grew: home is dearer now
    assert guard.home_costs[1] > 0.020
    for _ in range(10):  # 0.45x home now: kept (against the old home cost, 0.9x)
        assert guard.observe(2, 1, 0.018) == 2
    assert guard.state is Widening.WIDE


def test_other_work_read_after_a_grant_ends_the_widening_and_holds_the_retry():
    guard, clock = guard_at_home()
    guard.note_load(1.0, since=clock.now - 0.25)  # a moment before the request: not judged
    guard.grant(2)
    assert guard.prompt_threads == 1  # suspect: its prompt runs at home
    assert guard.observe(2, 1, 0.017) == 2
    assert guard.state is Widening.TRIAL
    clock.now += 0.25
    guard.note_load(0.1, since=clock.now - 0.25)  # it ended with the request
    assert guard.prompt_threads == 2
    widen(guard)
    clock.now += 0.25
    guard.note_load(1.0, since=clock.now - 0.25)  # a busy loop on the lent core
    assert guard.observe(2, 1, 0.017) == 1
    assert guard.state is Widening.DECLINED
    for _ in range(3):  # while it lasts, no retry
        clock.now += RETRY_FIRST
        guard.note_load(0.9, since=clock.now - 0.25)
        assert guard.observe(1, 1, 0.030) == 1
    clock.now += RETRY_FIRST
    guard.note_load(0.0, since=clock.now - 0.25)
    assert guard.observe(1, 1, 0.030) == 2
    assert guard.state is Widening.TRIAL


def test_core_load_reads_a_busy_loop_on_a_core():
    cores = os.sched_getaffinity(0)
    core = min(cores)
    load = CoreLoad()
    loop = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    hog = subprocess.Popen([sys.executable, "-c", loop])
    try:
        load.read({core})
        time.sleep(0.5)  # a window for the reading, not a synchronisation
        foreign, _ = load.read({core})
    finally:
        hog.kill()
        hog.wait()
    assert foreign > 0.5
