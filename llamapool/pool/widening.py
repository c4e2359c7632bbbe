"""Elastic threads, the worker's side: a decode widened onto lent cores runs its extra
threads only while that is faster than running at home.

The supervisor lends an idle instance's cores (pool/cores.py); it sees idle instances, not
idle cores. When other work runs on a lent core (another program, the client, a test
suite), a widened decode waits at every barrier of its graph for the thread that shares
that core, and runs slower than it would have on its own cores alone: measured on a 2-core
box with a busy loop on the lent core, SmolLM2 fell from 35-39 tok/s at home to 4-34 tok/s
on two threads. So the engine times its generating decodes by the row, at home and widened,
and `WidenGuard` decides which thread count the next decode runs with. The grant stays the
supervisor's (the lender's cores stay lent); the guard only leaves them unused.

A guard goes through `Widening` (see `WIDEN_TRANSITIONS`); each move is logged with its
reason. `running` is the thread count decodes run with; the worker reports it in its
heartbeat, and `/admin/pool` shows it as the worker's `elastic.decode_threads`.
"""

from __future__ import annotations

import enum
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable

from llamapool.pool.transitions import check

log = logging.getLogger("llamapool.widening")

# Home decodes timed before a first widening, when no home cost is known yet.
HOME_SAMPLES = 2
# Widened decodes a trial times before it judges.
TRIAL_DECODES = 3
# Widened is kept while its cost per row stays under this share of the home cost: the
# guard is there for other work on the lent cores (1.0-10x home then), not to judge a small
# gain. Measured on the quiet 2-core box: 0.5-0.7 for two threads against one, drifting
# towards 0.9 at times late in a long answer.
KEEP_BELOW = 1.0
# Two widened decodes in a row this much slower per row than at home end the widening at
# once, without waiting for the trial or the median: a decode that shares a core with a
# busy loop runs 3-5x slower, while the router or the client taking the core for a moment
# costs 1.5x.
SLOW = 2.0
# One widened decode this much slower per row than at home ends it at once (a collapse: a
# decode that shares its core with a busy loop took 100-340 ms a row against 20-50).
COLLAPSE = 3.0
# After a widening was slower, the wait before the next trial: doubled on each failed trial
# up to the maximum, back to the first after a trial that paid.
RETRY_FIRST = 1.0
RETRY_MAX = 16.0
# Other work on the cores a worker may run on, in cores (the pool's workers' CPU time
# subtracted), at or above which a widening ends and a retry waits: a decode on a core that
# a busy loop holds took up to seconds for a single row.
BUSY = 0.5
# Seconds between the worker's readings of that load (`CoreLoad`, in its I/O thread).
LOAD_EVERY = 0.25
# A wide guard runs one decode in this many at home: a row's cost grows with the context
# (SmolLM2 at 2 threads: 13 ms a row at position 50, 25-28 at 700), so a home cost timed
# at the start of a long answer would make the widening look worse and worse.
PROBE_EVERY = 64
# Weight of the newest home decode in the home cost's running average.
EMA = 0.5
# A wide guard judges the median of its last this many decodes: one slow decode (the
# router or the client took the core for a moment) does not end a widening.
RECENT = 5


class Widening(str, enum.Enum):
    """What a worker's decodes run with, relative to what the supervisor granted."""

    HOME = "home"  # nothing beyond its own threads granted: it runs them
    MEASURING = "measuring"  # granted more, no home cost known: a few decodes at home first
    TRIAL = "trial"  # runs the granted threads; not yet shown faster than home
    WIDE = "wide"  # runs the granted threads: faster per row than home
    DECLINED = "declined"  # granted more, but slower than home: at home until a retry


_W = Widening
WIDEN_TRANSITIONS: dict[Widening, frozenset[Widening]] = {
    # HOME → DECLINED: a new grant before the retry time of the last decline.
    _W.HOME: frozenset({_W.MEASURING, _W.TRIAL, _W.DECLINED}),
    _W.MEASURING: frozenset({_W.HOME, _W.TRIAL, _W.DECLINED}),
    # TRIAL → TRIAL and WIDE → TRIAL: a new grant of another width is tried afresh.
    _W.TRIAL: frozenset({_W.HOME, _W.TRIAL, _W.WIDE, _W.DECLINED}),
    _W.WIDE: frozenset({_W.HOME, _W.TRIAL, _W.DECLINED}),
    _W.DECLINED: frozenset({_W.HOME, _W.TRIAL}),
}


class WidenGuard:
    """Which thread count the next decode runs: `home` or the supervisor's grant."""

    def __init__(self, home: int, name: str, clock: Callable[[], float] = time.monotonic):
        self.home = home
        self.name = name  # for the log: the worker or model
        self.clock = clock
        self.state = Widening.HOME
        self.granted = home
        # Seconds per row at home, a running average per batch size (`_size`): a row costs
        # less in a batch of eight than alone, so each cost is compared with its own size's.
        self.home_costs: dict[int, float] = {}
        # Widened costs per row over the home cost of their size, newest last.
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.slow_run = 0  # widened decodes in a row slower than SLOW × home
        self.home_seen = 0  # home decodes timed while MEASURING
        self.since_probe = 0  # widened decodes since a WIDE guard's last home decode
        self.retry_after = RETRY_FIRST
        self.retry_at = 0.0
        # Other work on its cores over the last reading, in cores, and when that reading's
        # window began (`note_load`); when the grant came.
        self.foreign = 0.0
        self.foreign_since = 0.0
        self.granted_at = 0.0

    @property
    def running(self) -> int:
        """The threads the next decode runs with."""
        widened = self.state is _W.TRIAL or (
            self.state is _W.WIDE and self.since_probe < PROBE_EVERY
        )
        return self.granted if widened else self.home

    @property
    def prompt_threads(self) -> int:
        """The threads the next prompt decode runs with: at home while a new grant is
        suspect (other work held the cores just before it, and no reading since says it
        stopped), so a busy core costs a prompt nothing; else as `running`."""
        suspect = self.foreign >= BUSY and self.foreign_since < self.granted_at
        return self.home if suspect else self.running

    def note_load(self, foreign: float, since: float) -> None:
        """A reading: other work used `foreign` cores of its cores since `since` (the
        worker's I/O thread, each LOAD_EVERY)."""
        self.foreign, self.foreign_since = foreign, since

    def grant(self, n_threads: int) -> int:
        """The supervisor's new grant (a RESIZE); the threads to run from the next decode."""
        if n_threads == self.granted:
            return self.running
        self.granted = n_threads
        self.granted_at = self.clock()
        if n_threads <= self.home:
            if self.state is not _W.HOME:
                self._move(_W.HOME, f"granted {n_threads} thread(s): its own")
            return self.running
        if self.clock() < self.retry_at:  # the cores are as busy as when it last declined
            if self.state is not _W.DECLINED:
                self._move(_W.DECLINED, f"granted {n_threads} threads before the retry time")
            return self.running
        if not self.home_costs:
            if self.state is not _W.MEASURING:
                self.home_seen = 0
                self._move(_W.MEASURING, f"granted {n_threads} threads; timing home decodes")
        else:
            self._start_trial(f"granted {n_threads} threads")
        return self.running

    def observe(self, n_threads: int, rows: int, seconds: float) -> int:
        """A generating decode of `rows` rows took `seconds` on `n_threads` threads; the
        threads to run from the next decode."""
        cost, size = seconds / max(rows, 1), _size(rows)
        home = self.home_costs.get(size)
        if n_threads == self.home:
            self.home_costs[size] = cost if home is None else _avg(home, cost)
            self.since_probe = 0
            if self.state is _W.MEASURING:
                self.home_seen += 1
                if self.home_seen >= HOME_SAMPLES:
                    self._start_trial(f"home costs {_ms(self.home_costs[size])} a row")
            elif self.state is _W.DECLINED and self.clock() >= self.retry_at:
                if not self._busy_elsewhere("time to retry"):
                    self._start_trial("time to retry")
            return self.running
        if self.state not in (_W.TRIAL, _W.WIDE) or n_threads != self.granted:
            return self.running  # a decode from before the last change
        if self.foreign_since >= self.granted_at and self._busy_elsewhere("widened"):
            return self.running
        self.since_probe += 1
        # Against the dearest home row known, where this size has none yet.
        worst = max(self.home_costs.values())
        ref = home or worst
        self.slow_run = self.slow_run + 1 if cost > SLOW * ref else 0
        if cost > COLLAPSE * ref or self.slow_run >= 2:
            self._decline(cost, ref, "one decode" if self.slow_run < 2 else "two decodes in a row")
            return self.running
        if home is None:
            return self.running  # nothing to compare it with
        self.recent.append(cost / home)
        if len(self.recent) < (TRIAL_DECODES if self.state is _W.TRIAL else RECENT):
            return self.running
        ratio = statistics.median(self.recent)
        what = f"median of the last {len(self.recent)} decodes"
        if ratio >= KEEP_BELOW:
            self._decline(ratio * home, home, what)
        elif self.state is _W.TRIAL:
            self.retry_after = RETRY_FIRST
            why = self._compare(ratio * home, home, f"{self.granted} threads, {what}")
            self._move(_W.WIDE, why)
        return self.running

    def _busy_elsewhere(self, why: str) -> bool:
        """Whether other work holds its cores: if so, it runs at home (DECLINED) and looks
        again after RETRY_FIRST, a reading costing nothing (no doubling). A grant is judged
        on readings that began after it: the load of a moment before (a benchmark's other
        server, say) may have ended with it."""
        if self.foreign < BUSY:
            return False
        self.retry_at = max(self.retry_at, self.clock() + RETRY_FIRST)
        if self.state is not _W.DECLINED:
            busy = f"other work used {self.foreign:.2f} cores"
            self._move(_W.DECLINED, f"{why}: {busy}; home for {RETRY_FIRST:g} s at least")
        return True

    def _start_trial(self, why: str) -> None:
        self.recent.clear()
        self.slow_run = 0
        self.since_probe = 0
        self._move(_W.TRIAL, f"{why}; trying {self.granted} threads")

    def _decline(self, cost: float, home: float, what: str) -> None:
        self.retry_at = self.clock() + self.retry_after
        why = f"{self._compare(cost, home, what)}: lent cores busy; home for {self.retry_after:g} s"
        self.retry_after = min(self.retry_after * 2, RETRY_MAX)
        self._move(_W.DECLINED, why)

    @staticmethod
    def _compare(cost: float, home: float, what: str) -> str:
        return f"{what}: {_ms(cost)} a row widened vs {_ms(home)} at home"

    def _move(self, to: Widening, reason: str) -> None:
        check(WIDEN_TRANSITIONS, "decode threads of", self.name, self.state, to, reason)
        log.info("%s decode threads %s → %s: %s", self.name, self.state.value, to.value, reason)
        self.state = to


def _size(rows: int) -> int:
    """A decode's batch size for comparing costs: 1 to 4 rows apart, then by powers of 2."""
    return rows if rows <= 4 else 1 << (rows - 1).bit_length()


def _avg(old: float, new: float) -> float:
    return (1 - EMA) * old + EMA * new


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class CoreLoad:
    """How much of some cores other work used between two readings, in cores: their busy
    time (/proc/stat) less the CPU time of this worker and its siblings (the processes its
    parent started: the pool's other workers, whose threads run on lent cores). Linux only,
    as CPU affinity is."""

    def __init__(self) -> None:
        self.last: tuple[dict[int, int], dict[int, int], float] | None = None

    def read(self, cores: set[int]) -> tuple[float, float]:
        """Other work on `cores` since the last reading (0.0 on the first, or off Linux),
        and when that was (time.monotonic())."""
        now = time.monotonic()
        try:
            busy, pool = _busy_ticks(), _pool_ticks()
        except OSError:
            return 0.0, now
        last, self.last = self.last, (busy, pool, now)
        if last is None or now <= last[2]:
            return 0.0, now
        ticks = sum(busy.get(c, 0) - last[0].get(c, 0) for c in cores)
        # A worker new since the last reading: all its time is in the window (the safe side).
        ticks -= sum(t - last[1].get(pid, 0) for pid, t in pool.items())
        return max(0.0, ticks / _TICKS_PER_SECOND / (now - last[2])), last[2]


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> dict[int, int]:
    """Per CPU, its ticks not idle since boot (/proc/stat: all but idle and iowait)."""
    out = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                ticks = [int(f) for f in fields[:8]]
                out[int(name[3:])] = sum(ticks) - ticks[3] - ticks[4]
    return out


def _pool_ticks() -> dict[int, int]:
    """CPU ticks (user + system) of this process and its siblings, by pid."""
    parent = os.getppid()
    pids = {os.getpid()}
    try:
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as children:
                pids.update(int(pid) for pid in children.read().split())
    except OSError:
        pass  # no children files (CONFIG_PROC_CHILDREN): this process alone
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it has just exited
        out[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return out
