"""Where a new instance runs on this host: its thread count, its cores, its GPU.

Pure functions of the pool's state, so the rules are testable alone and a launcher for
other machines can apply them per node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from llamapool.config import ModelSpec


def threads_for(spec: ModelSpec, cpus: Sequence[int], instances_wanted: int) -> int:
    """`n_threads` as configured, else the host's cores split between the wanted instances."""
    if spec.config.n_threads is not None:
        return spec.config.n_threads
    return max(1, len(cpus) // max(1, instances_wanted))


def pick_cores(cpus: Sequence[int], taken: Iterable[Sequence[int]], n: int) -> list[int]:
    """`n` cores, least loaded first, so instances never share a core while cores are free.

    `taken`: the cores of every live worker.
    """
    load = dict.fromkeys(cpus, 0)
    for cores in taken:
        for c in cores:
            if c in load:
                load[c] += 1
    ranked = sorted(cpus, key=lambda c: (load[c], c))
    return sorted(ranked[: min(n, len(ranked))])


def gpu_for(
    gpus: Sequence[int] | None,
    serving: Iterable[int | None],
    planned: Mapping[int, int] | None = None,
) -> int | None:
    """Of a model's `gpus`, the one with the fewest of its instances (first listed on a tie).

    Instances go 0, 1, 0, 1 and a replacement takes the place of the one it replaces; None
    without `gpus`. `serving`: the GPUs of the model's serving instances; `planned`:
    instances per GPU about to be added (a scale's check).
    """
    if not gpus:
        return None
    count = {g: (planned or {}).get(g, 0) for g in gpus}
    for gpu in serving:
        if gpu in count:
            count[gpu] += 1
    return min(gpus, key=lambda g: count[g])
