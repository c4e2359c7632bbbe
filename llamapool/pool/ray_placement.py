"""Where a worker's Ray actor goes: its Ray options, and which nodes fit it now.

Pure functions over `ray.nodes()`-shaped data (no Ray import), used by
`pool/ray_launcher.py`: the options a model's placement becomes, and the live nodes with
room for one more actor, in the order the memory budget tries them.
"""

from __future__ import annotations

from typing import Any

from llamapool.config import ModelPlacement

# Ray labels every node with its id; a selector on it keeps workers off suspect nodes.
NODE_ID_LABEL = "ray.io/node-id"


def demand(options: dict[str, Any]) -> dict[str, float]:
    """What an actor with these options reserves: CPU, GPU and custom resources."""
    wanted = {"CPU": float(options.get("num_cpus", 0)), "GPU": float(options.get("num_gpus", 0))}
    wanted.update(options.get("resources", {}))
    return {k: v for k, v in wanted.items() if v}


def fitting_nodes(
    nodes: list[dict[str, Any]],
    options: dict[str, Any],
    held: dict[str, dict[str, float]],
    avoid: set[str],
    siblings: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Of Ray's nodes (`ray.nodes()`), the live ones outside `avoid` whose labels match the
    actor's selector and whose resources, less what this router's actors `held` there,
    fit it: those with the fewest `siblings` (the model's instances) first, so one node's
    loss takes only some of them, then the most CPUs left."""
    siblings = siblings or {}
    needs = demand(options)
    wanted = {
        k: v
        for k, v in options.get("label_selector", {}).items()
        if k != NODE_ID_LABEL and not v.startswith(("!", "in("))  # plain equality only
    }
    fits: list[tuple[int, float, str, dict[str, Any]]] = []
    for node in nodes:
        node_id = node.get("NodeID")
        labels = node.get("Labels") or {}
        if not node.get("Alive") or node_id in avoid:
            continue
        if any(labels.get(k) != v for k, v in wanted.items()):
            continue
        used = held.get(node_id, {})
        free = {k: node["Resources"].get(k, 0.0) - used.get(k, 0.0) for k in {*needs, "CPU"}}
        if all(free[k] >= v for k, v in needs.items()):
            fits.append((siblings.get(node_id, 0), -free["CPU"], node_id, node))
    return [f[-1] for f in sorted(fits, key=lambda f: f[:3])]


def pick_node(
    nodes: list[dict[str, Any]],
    options: dict[str, Any],
    held: dict[str, dict[str, float]],
    avoid: set[str],
    siblings: dict[str, int] | None = None,
) -> str | None:
    """The first of `fitting_nodes`, or None when none fits (Ray then decides)."""
    fits = fitting_nodes(nodes, options, held, avoid, siblings)
    return fits[0]["NodeID"] if fits else None


def actor_options(
    n_threads: int, placement: ModelPlacement | None, avoid: list[str] | None = None
) -> dict[str, Any]:
    """The host actor's Ray options: the worker's CPUs, the model's resources and labels,
    and no node in `avoid` (suspects), unless the model names nodes by id itself."""
    p = placement or ModelPlacement()
    options: dict[str, Any] = {
        "num_cpus": n_threads,
        "max_restarts": 0,
        "max_task_retries": 0,
        # Instances spread over the nodes, so one node's loss takes only some of a
        # model's; Ray's default packs a node until it is half full.
        "scheduling_strategy": "SPREAD",
    }
    if p.num_gpus:
        options["num_gpus"] = p.num_gpus
    if p.resources:
        options["resources"] = dict(p.resources)
    labels = dict(p.labels)
    if avoid and NODE_ID_LABEL not in labels:
        labels[NODE_ID_LABEL] = f"!in({','.join(sorted(avoid))})"
    if labels:
        options["label_selector"] = labels
    return options
