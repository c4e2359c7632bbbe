"""Supervision: policies, and the state logic over fake processes, without real ones."""

from __future__ import annotations

import signal

import msgspec
import pytest
from fakepool import fake_pool

from llamapool.config import PoolSettings, parse_config
from llamapool.pool import placement
from llamapool.pool.lifecycle import ExitCause, IllegalTransition, ModelState, WorkerState
from llamapool.pool.memory import Sample
from llamapool.pool.runtime import FlapPolicy
from llamapool.pool.supervisor import Supervisor


def test_flap_policy_fails_after_attempts_within_window():
    flap = FlapPolicy(attempts=2, window=10, initial=0.5, cap=4)
    assert not flap.record(0.0)
    assert not flap.record(1.0)
    assert flap.record(2.0)


def test_flap_policy_forgets_old_deaths():
    flap = FlapPolicy(attempts=2, window=10, initial=0.5, cap=4)
    flap.record(0.0)
    flap.record(1.0)
    assert not flap.record(20.0)
    assert len(flap.deaths) == 1


def test_backoff_doubles_and_caps():
    flap = FlapPolicy(attempts=100, window=1000, initial=0.5, cap=4)
    assert flap.backoff() == 0
    delays = []
    for t in range(6):
        flap.record(float(t))
        delays.append(flap.backoff())
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


def _supervisor(tiny_gguf, *instances: int) -> Supervisor:
    models = [
        {"id": f"m{i}", "min_instances": n, "config": {"model_path": str(tiny_gguf)}}
        for i, n in enumerate(instances)
    ]
    config = parse_config({"models": models})
    sup = Supervisor(
        PoolSettings(),
        "ipc:///nonexistent",
        on_worker_lost=lambda w, r: None,
        on_worker_ready=lambda w: None,
        on_model_failed=lambda m, r: None,
    )
    for spec in config.models.values():
        sup.add_model(spec)
    return sup


def test_threads_split_cores_between_instances(tiny_gguf):
    spec = _supervisor(tiny_gguf, 2).models["m0"].spec
    assert placement.threads_for(spec, [0, 1, 2, 3], instances_wanted=2) == 2
    assert placement.threads_for(spec, [0, 1, 2, 3], instances_wanted=1) == 4
    assert placement.threads_for(spec, [0, 1], instances_wanted=8) == 1
    pinned = msgspec.structs.replace(spec.config, n_threads=3)
    assert placement.threads_for(msgspec.structs.replace(spec, config=pinned), [0, 1], 8) == 3


def test_cores_are_least_loaded_first():
    assert placement.pick_cores([0, 1, 2, 3], [], 2) == [0, 1]
    assert placement.pick_cores([0, 1, 2, 3], [], 8) == [0, 1, 2, 3]
    assert placement.pick_cores([0, 1, 2, 3], [[0], [1, 2]], 2) == [0, 3]


# -- the state logic over fake processes (tests/fakepool.py) -------------------


def test_spawn_ready_busy_idle(tiny_gguf):
    pool = fake_pool(tiny_gguf)
    pool.tick()
    w = pool.only()
    assert w.state is WorkerState.STARTING and pool.sup.models["m"].state is ModelState.STARTING
    assert pool.proc(w).launch.spec.config.n_threads == 2  # decided before the start
    pool.ready(w)
    assert w.state is WorkerState.IDLE and pool.sup.models["m"].state is ModelState.READY
    w.in_flight["r-1"] = object()
    pool.sup.note_dispatched(w)
    assert w.state is WorkerState.BUSY and w.free_slots == 0
    del w.in_flight["r-1"]
    pool.sup.note_released(w)
    assert w.state is WorkerState.IDLE and w.free_slots == 1
    assert [state for _, state, _ in w.history] == ["STARTING", "IDLE", "BUSY", "IDLE"]


def test_a_death_respawns_at_once_then_backs_off_doubling(tiny_gguf):
    pool = fake_pool(tiny_gguf, backoff_initial=0.5, restart_attempts=10)
    pool.tick()
    delays = []
    for _ in range(3):
        w = pool.only()
        pool.ready(w)
        pool.proc(w).exit(-signal.SIGKILL)
        pool.tick()
        assert w.state is WorkerState.DEAD and w.history[-1][2] == "killed by SIGKILL while IDLE"
        waited = 0.0
        while not pool.workers():
            pool.tick(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == [0.0, 0.5, 1.0]  # a lone death is an accident; then 0.5 s, doubling
    assert pool.sup.models["m"].restarts == 3 and pool.restarts("signal") == 3
    assert len(pool.lost) == 3


def test_flapping_marks_the_model_failed(tiny_gguf):
    pool = fake_pool(tiny_gguf, restart_attempts=2, restart_window=60, backoff_initial=0.1)
    pool.tick()
    for _ in range(3):
        while not pool.workers():
            pool.tick(0.1)
        pool.proc(pool.only()).exit(1)
        pool.tick()
    runtime = pool.sup.models["m"]
    assert runtime.state is ModelState.FAILED and "3 worker deaths within 60 s" in runtime.reason
    assert pool.failed == [("m", runtime.reason)]
    pool.tick(30)
    assert not pool.workers() and len(pool.launcher.started) == 3


def test_cannot_boot_fails_the_model_at_once(tiny_gguf):
    pool = fake_pool(tiny_gguf, restart_attempts=5)
    pool.tick()
    w = pool.only()
    pool.sup.note_fatal(w, ExitCause.CANNOT_BOOT, "cannot load /m.gguf: bad magic")
    pool.proc(w).exit(78)
    pool.tick()
    runtime = pool.sup.models["m"]
    assert runtime.state is ModelState.FAILED and runtime.reason == "cannot load /m.gguf: bad magic"
    pool.tick(10)
    assert len(pool.launcher.started) == 1  # no respawn loop
    assert pool.restarts("cannot_boot") == 1


def test_exit_78_alone_is_cannot_boot_too(tiny_gguf):
    pool = fake_pool(tiny_gguf)
    pool.tick()
    pool.proc(pool.only()).exit(78)
    pool.tick()
    assert pool.sup.models["m"].state is ModelState.FAILED
    assert len(pool.launcher.started) == 1


def test_boot_timeout_kills(tiny_gguf):
    pool = fake_pool(tiny_gguf, boot_timeout=5)
    pool.tick()
    w = pool.only()
    pool.tick(4.9)
    assert pool.proc(w).signals == []
    pool.tick(0.2)
    assert pool.proc(w).signals == [signal.SIGKILL]
    assert w.free_slots == 0
    pool.tick()
    assert w.state is WorkerState.DEAD
    assert w.history[-1][2] == "killed by SIGKILL: did not boot within 5 s while STARTING"
    assert pool.restarts("boot_timeout") == 1


def test_heartbeat_silence_kills(tiny_gguf):
    pool = fake_pool(tiny_gguf, heartbeat_interval=1, heartbeat_liveness=3)
    pool.tick()
    w = pool.only()
    pool.ready(w)
    pool.clock.advance(2.5)
    pool.sup.heard_from(w)  # any message counts
    pool.tick(2.9)
    assert pool.proc(w).signals == []
    pool.tick(0.2)
    assert pool.proc(w).signals == [signal.SIGKILL]
    pool.tick()
    assert w.state is WorkerState.DEAD and "missed heartbeats for 3.1 s" in w.history[-1][2]
    assert pool.restarts("heartbeat") == 1


def test_drain_stops_without_counting_a_restart(tiny_gguf):
    pool = fake_pool(tiny_gguf, models=[{"id": "m", "min_instances": 1, "max_instances": 2}])
    pool.tick()
    first = pool.only()
    pool.ready(first)
    pool.sup.scale("m", 2)
    second = next(w for w in pool.workers() if w is not first)
    pool.ready(second)
    first.last_used = 1.0  # the least recently used goes
    second.last_used = 2.0
    pool.sup.scale("m", 1)
    assert first.state is WorkerState.DRAINING and pool.drained == [first.id]
    pool.proc(first).exit(0)
    pool.tick()
    assert first.state is WorkerState.STOPPED and first.history[-1][2] == "exit 0"
    assert pool.sup.models["m"].restarts == 0 and pool.restarts("exit_code") == 0
    assert pool.workers() == [second]


def test_memory_over_limit_drains_with_cause_memory_limit(tiny_gguf):
    pool = fake_pool(tiny_gguf, max_worker_memory="2MiB", memory_check_interval=1)
    pool.tick()
    w = pool.only()
    pool.ready(w)
    pool.proc(w).sample = Sample(rss=3 << 20, pss=3 << 20)
    pool.tick(1)
    pool.tick(1)
    assert w.state is WorkerState.IDLE  # two readings are not enough
    pool.tick(1)
    assert w.state is WorkerState.DRAINING and pool.drained == [w.id]
    assert "above max_worker_memory 2 MiB for 3 readings in a row" in w.history[-1][2]
    assert pool.restarts("memory_limit") == 1
    pool.proc(w).exit(0)
    pool.tick()
    assert w.state is WorkerState.STOPPED and len(pool.workers()) == 1  # replaced


def test_eviction_drains_the_idle_lru_instance_of_another_model(tiny_gguf):
    models = [{"id": m, "min_instances": 0, "max_instances": 2} for m in ("a", "b", "c")]
    pool = fake_pool(tiny_gguf, models=models)
    cost = pool.sup.models["a"].footprint.cost(0)
    # Room for two instances: a third one needs an eviction.
    pool.sup.memory.limit = 2 * cost + cost // 2
    for model, used_at in (("a", 5.0), ("b", 1.0)):
        pool.sup.ensure_capacity(model)
        w = pool.only(model)
        pool.proc(w).sample = Sample(rss=cost, pss=cost)
        pool.ready(w)
        w.last_used = used_at
    pool.sup.ensure_capacity("c")
    victim = pool.only("b")
    assert victim.state is WorkerState.DRAINING and pool.drained == [victim.id]
    assert "to make room for c" in victim.history[-1][2]
    assert pool.only("a").state is WorkerState.IDLE and not pool.workers("c")
    pool.proc(victim).exit(0)
    pool.tick()
    assert victim.state is WorkerState.STOPPED and len(pool.workers("c")) == 1
    assert pool.sup.models["b"].evictions == 1 and pool.sup.models["b"].restarts == 0


def test_evicting_two_instances_of_a_model_lowers_its_target_by_two(tiny_gguf):
    models = [{"id": m, "min_instances": 0, "max_instances": 2} for m in ("b", "c")]
    pool = fake_pool(tiny_gguf, models=models)
    cost = pool.sup.models["c"].footprint.cost(0)
    pool.sup.scale("b", 2)
    pool.tick()
    assert len(pool.workers("b")) == 2
    for w in pool.workers("b"):
        pool.proc(w).sample = Sample(rss=cost * 6 // 10, pss=cost * 6 // 10)
        pool.ready(w)
    # The two instances of b use 1.2 c's; c needs one, so both must go.
    pool.sup.memory.limit = cost * 13 // 10
    pool.sup.ensure_capacity("c")
    assert [w.state for w in pool.workers("b")] == [WorkerState.DRAINING] * 2
    assert pool.sup.models["b"].target == 0
    for w in pool.workers("b"):
        pool.proc(w).exit(0)
    pool.tick()
    assert not pool.workers("b"), "an evicted instance came back"
    assert len(pool.workers("c")) == 1


_ACTS = {
    "protocol": lambda p, w: p.sup.kill(w, ExitCause.PROTOCOL, "protocol error: out of order"),
    "unreachable": lambda p, w: p.sup.kill(w, ExitCause.UNREACHABLE, "unreachable on its socket"),
    "fatal": lambda p, w: p.sup.note_fatal(w, ExitCause.FATAL, "engine thread died"),
    "stall": lambda p, w: p.sup.note_fatal(w, ExitCause.STALL, "engine made no progress"),
    "admin": lambda p, w: p.sup.restart_worker(w.id),
}


@pytest.mark.parametrize(
    ("act", "code", "label"),
    [
        ("protocol", None, "protocol"),
        ("unreachable", None, "unreachable"),
        ("fatal", 70, "fatal"),
        ("stall", 70, "stall"),
        (None, 70, "fatal"),
        (None, 79, "orphaned"),
        (None, -signal.SIGSEGV, "signal"),
        (None, 0, "exit_code"),
        ("admin", None, "admin"),
    ],
)
def test_restart_metric_label_per_cause(tiny_gguf, act, code, label):
    pool = fake_pool(tiny_gguf)
    pool.tick()
    w = pool.only()
    pool.ready(w)
    if act is not None:
        _ACTS[act](pool, w)
    if code is not None:
        pool.proc(w).exit(code)
    pool.tick()
    assert pool.restarts(label) == 1
    assert sum(pool.restarts(c.value) for c in ExitCause) == 1


def test_a_kill_is_a_state_that_takes_no_work(tiny_gguf):
    pool = fake_pool(tiny_gguf)
    pool.tick()
    w = pool.only()
    pool.ready(w)
    pool.proc(w).ignore_sigkill = True
    pool.sup.kill(w, ExitCause.PROTOCOL, "protocol error: READY out of order")
    assert w.state is WorkerState.KILLING and w.free_slots == 0 and not w.ready
    assert pool.sup.serving("m") == [w]  # a death under way: replaced once reaped, not before
    pool.tick(10)
    assert len(pool.launcher.started) == 1
    pool.proc(w).exit(-signal.SIGKILL)
    pool.tick()
    assert [st for _, st, _ in w.history][-3:] == ["KILLING", "EXITED", "DEAD"]
    assert len(pool.launcher.started) == 2


def test_a_kill_while_draining_still_ends_stopped(tiny_gguf):
    pool = fake_pool(tiny_gguf, heartbeat_interval=1, heartbeat_liveness=2)
    pool.tick()
    w = pool.only()
    pool.ready(w)
    pool.sup.restart_worker(w.id)
    pool.tick(3)  # silent while draining: killed, but its end was asked for
    assert w.state is WorkerState.KILLING
    pool.tick()
    assert w.state is WorkerState.STOPPED
    assert pool.restarts("admin") == 1 and pool.restarts("heartbeat") == 0


def test_illegal_transitions_are_refused(tiny_gguf):
    pool = fake_pool(tiny_gguf)
    pool.tick()
    w = pool.only()
    with pytest.raises(IllegalTransition, match="STARTING → BUSY"):
        pool.sup._set_state(w, WorkerState.BUSY, "no READY yet")
    runtime = pool.sup.models["m"]
    runtime.unload(force=False)
    with pytest.raises(IllegalTransition, match="UNLOADED → READY"):
        runtime.set_state(ModelState.READY, "not loaded")


def test_model_lifecycle_unload_load_standby(tiny_gguf):
    pool = fake_pool(tiny_gguf, models=[{"id": "m"}, {"id": "lazy", "min_instances": 0}])
    sup = pool.sup
    assert sup.models["lazy"].state is ModelState.STANDBY
    assert sup.refusal("lazy") is None
    sup.ensure_capacity("lazy")  # a request arrives
    assert sup.models["lazy"].state is ModelState.STARTING and pool.workers("lazy")
    pool.tick()
    pool.ready(pool.only("m"))
    workers = sup.unload("m", force=True)
    assert sup.models["m"].state is ModelState.UNLOADED
    assert sup.refusal("m").code == "model_unloaded"
    pool.tick()
    assert workers[0].state is WorkerState.STOPPED and sup.models["m"].restarts == 0
    sup.load("m")
    assert sup.models["m"].state is ModelState.STARTING and sup.refusal("m") is None
    assert sup.refusal("nope").code == "model_not_found"
    sup.remove_model("lazy")
    assert sup.refusal("lazy").code == "model_not_found"
    assert "removed by a reload" in sup.refusal("lazy").message


def test_scaling_an_on_demand_model_to_none_is_standby(tiny_gguf):
    pool = fake_pool(tiny_gguf, models=[{"id": "m", "min_instances": 0, "max_instances": 1}])
    pool.sup.ensure_capacity("m")
    pool.ready(pool.only())
    assert pool.sup.models["m"].state is ModelState.READY
    pool.sup.scale("m", 0)
    assert pool.sup.models["m"].state is ModelState.STANDBY


def test_workers_killed_by_a_model_failure_are_not_deaths_after_a_load(tiny_gguf):
    # A model fails (one worker cannot boot); its other workers are SIGKILLed but, held up,
    # are reaped only after an operator's load. Those kills are the old failure's, not new
    # deaths: they must not count as restarts nor fail the model again.
    pool = fake_pool(
        tiny_gguf, models=[{"id": "m", "min_instances": 4, "max_instances": 4}], restart_attempts=2
    )
    for _ in range(4):
        pool.tick()
    workers = pool.workers()
    for w in workers:
        pool.ready(w)
    for w in workers[1:]:
        pool.proc(w).ignore_sigkill = True
    pool.proc(workers[0]).exit(78)
    pool.tick()
    runtime = pool.sup.models["m"]
    assert runtime.state is ModelState.FAILED
    restarts = runtime.restarts
    pool.sup.load("m")
    for w in workers[1:]:
        pool.proc(w).ignore_sigkill = False
        pool.proc(w).exit(-9)
    pool.tick()
    assert runtime.state is not ModelState.FAILED, runtime.reason
    assert runtime.restarts == restarts


# -- placement ---------------------------------------------------------------------


def test_instances_take_turns_on_the_models_gpus(tiny_gguf):
    pool = fake_pool(
        tiny_gguf,
        models=[{"id": "m", "min_instances": 4, "max_instances": 4, "gpus": [0, 1]}],
    )
    for _ in range(4):
        pool.tick()  # one spawn per model per tick
    assert [p.launch.gpu for p in pool.launcher.started] == [0, 1, 0, 1]
    assert [w.gpu for w in pool.workers()] == [0, 1, 0, 1]
    assert pool.workers()[1].history[0][2].endswith("and GPU 1")
    # A replacement goes where the instance it replaces was.
    pool.sup.kill(pool.workers()[1], ExitCause.PROTOCOL, "test")
    pool.tick()
    assert pool.launcher.started[-1].launch.gpu == 1


def test_without_gpus_workers_see_every_gpu(tiny_gguf):
    pool = fake_pool(tiny_gguf)
    pool.tick()
    assert pool.launcher.started[0].launch.gpu is None and pool.only().gpu is None


def _elastic_pool(tiny_gguf, elastic_threads=True):
    p = fake_pool(tiny_gguf, [{"id": "m", "min_instances": 2}], elastic_threads=elastic_threads)
    p.tick()
    p.tick()
    a, b = p.workers()
    p.ready(a, capacity=4, resizable=True)
    p.ready(b, capacity=4, resizable=True)
    return p, a, b


def test_a_busy_worker_borrows_its_idle_neighbours_core_and_gives_it_back(tiny_gguf):
    p, a, b = _elastic_pool(tiny_gguf)
    assert (a.cores, b.cores) == ([0], [1])
    p.dispatch(a, "r-1")
    assert p.resizes == [(a.id, [0, 1], 2)]
    assert p.sup.cores.view(a.id)["state"] == "borrowing"
    assert p.sup.cores.view(b.id)["state"] == "lent"
    p.sup.note_resized(a, 1, [0, 1], 2)
    assert p.sup.cores.view(a.id)["cores"] == [0, 1]
    # The neighbour gets work: a shrinks, and b's request waits for a's confirmation.
    p.dispatch(b, "r-2")
    assert p.resizes[-1] == (a.id, [0], 1)
    assert p.sup.cores.holds(b.id) and not p.reclaimed
    p.sup.note_resized(a, 2, [0], 1)
    assert p.reclaimed == [b.id] and not p.sup.cores.holds(b.id)
    assert not p.sup.cores.violations()


def test_a_lenders_death_or_a_borrowers_frees_what_waits(tiny_gguf):
    p, a, b = _elastic_pool(tiny_gguf)
    p.dispatch(a, "r-1")
    p.dispatch(b, "r-2")
    assert p.sup.cores.holds(b.id)
    p.proc(a).exit(-9)
    p.tick()
    assert p.reclaimed == [b.id]


def test_elastic_threads_off_for_the_pool_or_the_model(tiny_gguf):
    p, a, b = _elastic_pool(tiny_gguf, elastic_threads=False)
    p.dispatch(a, "r-1")
    assert not p.resizes and p.sup.cores.view(a.id)["state"] == "own"
    models = [{"id": "m", "min_instances": 2, "elastic_threads": False}]
    p = fake_pool(tiny_gguf, models, elastic_threads=True)
    p.tick()
    p.tick()
    a, b = p.workers()
    p.ready(a, resizable=True)
    p.ready(b, resizable=True)
    p.dispatch(a, "r-1")
    assert not p.resizes


def test_a_worker_that_cannot_resize_never_lends_nor_borrows(tiny_gguf):
    p = fake_pool(tiny_gguf, [{"id": "m", "min_instances": 2}], elastic_threads=True)
    p.tick()
    p.tick()
    a, b = p.workers()
    p.ready(a, resizable=True)
    p.ready(b, resizable=False)  # the one-at-a-time engine
    p.dispatch(a, "r-1")
    p.dispatch(b, "r-2")
    assert not p.resizes and p.sup.cores.view(b.id)["elastic"] is False


def test_a_worker_on_another_node_stays_out_of_the_core_ledger(tiny_gguf):
    p = fake_pool(tiny_gguf, [{"id": "m", "min_instances": 2}], elastic_threads=True)
    p.tick()
    p.tick()
    a, b = p.workers()
    p.proc(b).node = "ray-node-1"  # its cores are numbered on its own machine
    p.ready(a, resizable=True)
    p.ready(b, resizable=True)
    p.dispatch(a, "r-1")
    assert p.sup.cores.view(b.id) is None
    assert p.resizes == []  # a has no idle neighbour on this machine
