"""A worker actor's Ray options and the nodes that fit it (pure: no Ray needed)."""

from __future__ import annotations

from llamapool.config import ModelPlacement
from llamapool.pool.ray_placement import actor_options, pick_node


def test_actor_options_carry_threads_resources_labels_and_avoid_suspects():
    assert actor_options(2, None) == {
        "num_cpus": 2,
        "max_restarts": 0,
        "max_task_retries": 0,
        "scheduling_strategy": "SPREAD",
    }
    p = ModelPlacement(resources={"big": 1}, labels={"zone": "a"}, num_gpus=0.5)
    options = actor_options(1, p, avoid=["n2", "n1"])
    assert options["resources"] == {"big": 1} and options["num_gpus"] == 0.5
    assert options["label_selector"] == {"zone": "a", "ray.io/node-id": "!in(n1,n2)"}
    pinned = ModelPlacement(labels={"ray.io/node-id": "n2"})  # the model's own choice wins
    assert actor_options(1, pinned, avoid=["n2"])["label_selector"] == {"ray.io/node-id": "n2"}


def _node(node_id, cpus, alive=True, **labels):
    resources = {"CPU": float(cpus), f"node:{node_id}": 1.0, **labels.pop("resources", {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources, "Labels": labels}


def test_after_a_loss_a_live_node_with_room_is_named():
    nodes = [
        _node("head", 0),
        _node("a", 3, zone="a"),
        _node("b", 4, zone="b"),
        _node("c", 8, alive=False),
        _node("d", 2, zone="a", resources={"big": 1.0}),
    ]
    options = actor_options(1, None, avoid=["b"])
    assert pick_node(nodes, options, {}, {"b"}) == "a"  # most CPUs left, b presumed lost
    assert pick_node(nodes, options, {"a": {"CPU": 2.0}}, {"b"}) == "d"  # a has 1 left now
    big = actor_options(2, ModelPlacement(resources={"big": 1}, labels={"zone": "a"}))
    assert pick_node(nodes, big, {}, set()) == "d"
    assert pick_node(nodes, big, {"d": {"big": 1.0}}, set()) is None  # Ray decides (waits)
    assert pick_node(nodes, actor_options(5, None), {}, {"b"}) is None
    # A model's instances spread: a node holding fewer of them comes first.
    assert pick_node(nodes, options, {}, set(), siblings={"b": 1}) == "a"
