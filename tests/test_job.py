"""A job's lifecycle: the transition table, the checked setter and the derived views."""

from __future__ import annotations

import itertools

import pytest

from llamapool.ipc import protocol as P
from llamapool.pool.job import TRANSITIONS, InvalidTransition, Job, JobState

S = JobState


def _job(*path: JobState) -> Job:
    job = Job(id="r-1", model_id="m", request=P.Request(request_id="r-1", kind="completion"))
    for state in path:
        job.move(state)
    return job


def test_every_state_has_a_row_and_terminal_states_have_no_exit():
    assert set(TRANSITIONS) == set(JobState)
    for state, targets in TRANSITIONS.items():
        assert state not in targets  # no move is a no-op
        assert not targets if state.is_finished() else targets


@pytest.mark.parametrize(
    "path",
    [
        [S.RUNNING, S.DONE],  # served without output streamed (an embedding)
        [S.RUNNING, S.STREAMING, S.DONE],
        [S.RUNNING, S.STREAMING, S.FAILED],  # crashed after output: worker_crashed in-band
        [S.RUNNING, S.QUEUED, S.RUNNING, S.DONE],  # crashed before output, requeued
        [S.RUNNING, S.FAILED],  # context_length_exceeded, or a requeue refused
        [S.FAILED],  # queue_timeout, model failed or removed while queued
        [S.CANCELLED],  # the client left while queued
        [S.RUNNING, S.CANCELLING, S.CANCELLED],  # the client left: CANCEL, confirmed
        [S.RUNNING, S.STREAMING, S.CANCELLING, S.CANCELLED],
    ],
)
def test_the_lifecycles_the_scheduler_uses_are_allowed(path):
    assert _job(*path).state is path[-1]


def test_a_move_outside_the_table_raises_and_changes_nothing():
    allowed = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    for a, b in itertools.product(JobState, repeat=2):
        if (a, b) in allowed:
            continue
        job = _job()
        job._state = a
        with pytest.raises(InvalidTransition, match=f"r-1: {a.name} → {b.name}"):
            job.move(b)
        assert job.state is a


def test_nothing_seen_by_the_client_can_be_redone():
    # Once output went to the client, a crash cannot be hidden by running it again.
    assert [s for s in JobState if s.can_requeue()] == [S.RUNNING]
    assert S.QUEUED not in TRANSITIONS[S.STREAMING]


def test_derived_views():
    assert {s for s in JobState if s.is_finished()} == {S.DONE, S.FAILED, S.CANCELLED}
    assert {s for s in JobState if s.can_cancel()} == {S.RUNNING, S.STREAMING}
    # A job told to stop sends its client nothing more, whatever its worker still says.
    assert {s for s in JobState if s.delivers()} == {S.QUEUED, S.RUNNING, S.STREAMING}
