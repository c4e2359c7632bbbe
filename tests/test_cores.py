"""The elastic-threads ledger alone: who lends, who borrows, when cores come back."""

from __future__ import annotations

import pytest

from llamapool.pool.cores import CORE_TRANSITIONS, CoreLedger, CoreState
from llamapool.pool.lifecycle import IllegalTransition


def _ledger(*homes: list[int], elastic: bool = True) -> CoreLedger:
    ledger = CoreLedger(lend_after=0.25, reclaim_timeout=2.0)
    for i, home in enumerate(homes):
        ledger.join(f"w{i}", home, len(home), elastic=elastic, now=0.0)
    return ledger


def _state(ledger: CoreLedger, worker_id: str) -> CoreState:
    return ledger.seats[worker_id].state


def test_a_busy_worker_borrows_every_idle_neighbour_at_dispatch():
    ledger = _ledger([0], [1], [2])
    moves = ledger.busy("w0", now=1.0)
    (resize,) = moves.resizes
    assert (resize.worker_id, resize.cores, resize.n_threads) == ("w0", [0, 1, 2], 3)
    assert _state(ledger, "w0") is CoreState.BORROWING
    assert _state(ledger, "w1") is _state(ledger, "w2") is CoreState.LENT
    assert not ledger.holds("w0")
    assert not ledger.violations()


def test_going_idle_gives_everything_back_at_once():
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    moves = ledger.idle("w0", now=2.0)
    (resize,) = moves.resizes
    assert (resize.cores, resize.n_threads) == ([0], 1)
    # No decode runs in an idle worker and its shrink goes before any new request:
    # the lender owns its core again without waiting for the confirmation.
    assert _state(ledger, "w0") is _state(ledger, "w1") is CoreState.OWN


def test_a_lender_that_gets_work_waits_for_the_borrowers_shrink(caplog):
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    moves = ledger.busy("w1", now=1.5)
    (shrink,) = moves.resizes
    assert (shrink.worker_id, shrink.cores, shrink.n_threads) == ("w0", [0], 1)
    assert ledger.holds("w1") and _state(ledger, "w1") is CoreState.RECLAIMING
    assert _state(ledger, "w0") is CoreState.OWN
    assert not ledger.violations()
    # An older confirmation (the widening) frees nothing; the shrink's does.
    assert not ledger.resized("w0", shrink.seq - 1, [0, 1], 2, now=9.9)
    caplog.set_level("INFO", logger="llamapool.cores")
    moves = ledger.resized("w0", shrink.seq, [0], 1, now=1.504)
    assert moves.freed == ["w1"] and not ledger.holds("w1")
    assert "w0 gave its cores back (resize 2) after 4.0 ms" in caplog.text
    assert _state(ledger, "w1") is CoreState.OWN
    assert ledger.view("w0")["cores"] == [0]


def test_two_busy_workers_never_share_a_core():
    ledger = _ledger([0], [1], [2], [3])
    ledger.busy("w0", now=1.0)  # borrows 1, 2, 3
    ledger.busy("w2", now=1.1)  # reclaims 2
    ledger.resized("w0", ledger.seats["w0"].seq, [0, 1, 3], 3, now=9.9)
    ledger.busy("w3", now=1.2)  # reclaims 3
    assert not ledger.violations()
    assert ledger.seats["w0"].cores == [0, 1]
    assert ledger.seats["w2"].cores == [2] and ledger.seats["w3"].cores == [3]
    ledger.idle("w2", now=5.0)
    ledger.resized("w0", ledger.seats["w0"].seq, [0, 1], 2, now=9.9)
    moves = ledger.tick(now=5.1)  # w2 idle for 0.1 s: not yet
    assert not moves.resizes
    moves = ledger.tick(now=5.3)
    assert [r.cores for r in moves.resizes] == [[0, 1, 2]]  # w0 first, w3 finds nothing left
    assert not ledger.violations()


def test_only_cores_idle_for_a_while_are_lent_to_a_worker_already_busy():
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    ledger.busy("w1", now=1.0)
    ledger.resized("w0", ledger.seats["w0"].seq, [0], 1, now=9.9)
    ledger.idle("w1", now=2.0)
    assert not ledger.tick(now=2.1).resizes  # a back-to-back request may be on its way
    (resize,) = ledger.tick(now=2.3).resizes
    assert resize.worker_id == "w0" and resize.cores == [0, 1]


def test_workers_sharing_a_core_are_lent_together_or_not_at_all():
    # Three instances on two cores: w1 and w2 share core 1.
    ledger = _ledger([0], [1], [1])
    (resize,) = ledger.busy("w0", now=1.0).resizes
    assert resize.cores == [0, 1]
    assert _state(ledger, "w1") is _state(ledger, "w2") is CoreState.LENT
    (shrink,) = ledger.busy("w1", now=1.1).resizes
    assert shrink.cores == [0]
    ledger.resized("w0", shrink.seq, [0], 1, now=9.9)
    assert _state(ledger, "w1") is _state(ledger, "w2") is CoreState.OWN
    ledger.idle("w0", now=2.0)
    assert not ledger.busy("w0", now=3.0).resizes  # w2 is idle, but w1 works on core 1
    assert not ledger.violations()


def test_non_elastic_workers_neither_lend_nor_borrow():
    ledger = _ledger([0], [1])
    ledger.join("gpu", [2], 1, elastic=False, now=0.0)
    (resize,) = ledger.busy("w0", now=1.0).resizes
    assert resize.cores == [0, 1]  # not the GPU worker's core 2
    assert not ledger.busy("gpu", now=1.0)
    assert ledger.seats["gpu"].state is CoreState.OWN


def test_a_draining_borrower_keeps_its_loan_until_idle_and_takes_no_more():
    ledger = _ledger([0], [1], [2])
    ledger.busy("w0", now=1.0)
    ledger.busy("w2", now=1.1)
    ledger.resized("w0", ledger.seats["w0"].seq, [0, 1], 2, now=9.9)
    ledger.retire("w0")
    ledger.idle("w2", now=1.2)
    assert not ledger.tick(now=9.0).resizes
    ledger.idle("w0", now=9.5)
    assert _state(ledger, "w1") is CoreState.OWN


def test_a_worker_placed_on_a_borrowed_core_starts_lent_and_reclaims_it():
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    ledger.leave("w1")  # the lender exited; w0 keeps running on core 1
    ledger.join("w9", [1], 1, elastic=True, now=2.0)
    assert _state(ledger, "w9") is CoreState.LENT
    (shrink,) = ledger.busy("w9", now=2.5).resizes
    assert shrink.cores == [0] and ledger.holds("w9")


def test_a_borrower_that_exits_frees_its_lenders():
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    ledger.busy("w1", now=1.1)
    assert ledger.leave("w0").freed == ["w1"]
    assert _state(ledger, "w1") is CoreState.OWN


def test_a_borrower_that_never_answers_frees_the_lender_after_the_timeout(caplog):
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    ledger.busy("w1", now=1.5)
    assert not ledger.tick(now=3.0).freed
    assert ledger.tick(now=3.6).freed == ["w1"]
    assert "did not give its cores back within 2 s" in caplog.text


def test_the_table_refuses_a_lent_worker_borrowing():
    assert CoreState.BORROWING not in CORE_TRANSITIONS[CoreState.LENT]
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    with pytest.raises(IllegalTransition):
        ledger._move(ledger.seats["w1"], CoreState.BORROWING, "a bug")


def test_violations_name_a_core_two_running_workers_would_share():
    ledger = _ledger([0], [1])
    ledger.busy("w0", now=1.0)
    seat = ledger.seats["w1"]
    seat.busy, seat.state = True, CoreState.OWN  # as a bug that skipped the reclaim would
    assert ledger.violations() == ["w0 borrows [1] of w1"]


def test_cores_are_lent_within_a_node_only():
    ledger = CoreLedger()
    ledger.join("a", [0], 1, elastic=True, now=0.0, node="n1")
    ledger.join("b", [0], 1, elastic=True, now=0.0, node="n2")  # core 0 of another host
    ledger.join("c", [1], 1, elastic=True, now=0.0, node="n2")
    assert not ledger.busy("a", now=1.0).resizes
    (resize,) = ledger.busy("b", now=1.0).resizes
    assert resize.cores == [0, 1] and _state(ledger, "a") is CoreState.OWN
    assert not ledger.violations()


def test_who_may_lend(tiny_gguf):
    from llamapool.config import parse_config
    from llamapool.pool.cores import may_lend

    def spec_and_pool(pool=None, **model):
        entry = {"id": "m", "config": {"model_path": str(tiny_gguf)}, **model}
        config = parse_config({"pool": pool or {}, "models": [entry]})
        return config.models["m"], config.pool

    spec, pool = spec_and_pool()
    assert may_lend(spec, pool, resizable=True, gpu=None)  # on by default
    assert not may_lend(spec, pool, resizable=False, gpu=None)  # one request at a time
    assert not may_lend(spec, pool, resizable=True, gpu=0)
    on_gpu, pool = spec_and_pool(
        {"elastic_threads": True}, config={"model_path": str(tiny_gguf), "n_gpu_layers": -1}
    )
    assert not may_lend(on_gpu, pool, resizable=True, gpu=None)
    assert not may_lend(*spec_and_pool({"elastic_threads": False}), resizable=True, gpu=None)
    model_on = spec_and_pool({"elastic_threads": False}, elastic_threads=True)
    assert may_lend(*model_on, resizable=True, gpu=None)
