"""Supervision policies, tested without processes."""

from __future__ import annotations

from llamapool.config import PoolSettings, parse_config
from llamapool.pool.supervisor import FlapPolicy, Supervisor


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
    sup = _supervisor(tiny_gguf, 2)
    sup.cpus = [0, 1, 2, 3]
    assert sup._threads_for(sup.models["m0"].spec) == 2
    sup = _supervisor(tiny_gguf, 1)
    sup.cpus = [0, 1, 2, 3]
    assert sup._threads_for(sup.models["m0"].spec) == 4
    sup = _supervisor(tiny_gguf, 4, 4)
    sup.cpus = [0, 1]
    assert sup._threads_for(sup.models["m0"].spec) == 1


def test_cores_are_least_loaded_first(tiny_gguf):
    sup = _supervisor(tiny_gguf, 2)
    sup.cpus = [0, 1, 2, 3]
    assert sup._pick_cores(2) == [0, 1]
    assert sup._pick_cores(8) == [0, 1, 2, 3]
