"""What a reload changes: the diff between the running models and a new config, as data.

`plan_reload` is a pure function, testable without processes; `Broker.reload` reads the
file with `read_config` and `apply_reload` carries the plan out on the running pool.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from llamapool import errors
from llamapool.config import Config, ConfigError, ModelSpec, load_config
from llamapool.pool.lifecycle import ModelState

if TYPE_CHECKING:
    from llamapool.pool.scheduler import Scheduler
    from llamapool.pool.supervisor import Supervisor

# Blocks read once at start; a reload reports their changes instead of applying them.
RESTART_BLOCKS = ("pool", "server", "admin")
# A model's fields that only the router's queue reads: a change to them alone takes effect
# at once, and the running instances (and their prompt caches) stay.
QUEUE_LIMITS = ("max_queue", "queue_timeout", "max_request_time")


@dataclass
class ReloadPlan:
    """Per model, what a reload does: start, drain, replace, keep, or try again."""

    added: list[ModelSpec] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[ModelSpec] = field(default_factory=list)
    # Changed in QUEUE_LIMITS alone: the new limits apply, the instances stay.
    retuned: list[ModelSpec] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # Unchanged models that are FAILED: their file may be fixed, so they are tried again.
    retried: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, list[str]]:
        """The model ids per action and the warnings: the body of POST /admin/reload."""
        return {
            "added": [spec.id for spec in self.added],
            "removed": list(self.removed),
            "changed": [spec.id for spec in self.changed + self.retuned],
            "unchanged": list(self.unchanged),
            "retried": list(self.retried),
            "warnings": list(self.warnings),
        }


def read_config(source: str | Path | None) -> Config:
    """The config at `source`, whole, or InvalidRequest naming every problem in it.

    A reload takes a file with no error or nothing: one broken model rejects it too.
    """
    if source is None:
        raise errors.InvalidRequest("this server was not started from a config file")
    try:
        new = load_config(source)
    except ConfigError as exc:
        raise errors.InvalidRequest(f"reload rejected, nothing changed: {exc}") from None
    if new.broken:
        problems = "; ".join(new.broken.values())
        raise errors.InvalidRequest(f"reload rejected, nothing changed: {problems}")
    return new


def plan_reload(
    running: Mapping[str, ModelSpec],
    new: Config,
    *,
    failed: Collection[str] = (),
    current: Config | None = None,
) -> ReloadPlan:
    """The plan that takes the `running` models to `new`'s.

    `failed`: running models that are FAILED (and not unloaded by an operator), retried when
    unchanged. `current`: the config in force, whose restart-only blocks are compared.
    """
    plan = ReloadPlan()
    for model_id, spec in new.models.items():
        if model_id not in running:
            plan.added.append(spec)
        elif running[model_id] != spec:
            # A FAILED model is replaced, whatever changed: that is its retry.
            if model_id not in failed and _only_queue_limits_differ(running[model_id], spec):
                plan.retuned.append(spec)
            else:
                plan.changed.append(spec)
        else:
            plan.unchanged.append(model_id)
            if model_id in failed:
                plan.retried.append(model_id)
    plan.removed = [model_id for model_id in running if model_id not in new.models]
    if current is not None:
        plan.warnings = [
            f"the {block}: block changed; it takes effect at the next restart"
            for block in RESTART_BLOCKS
            if getattr(new, block) != getattr(current, block)
        ]
    return plan


def _only_queue_limits_differ(old: ModelSpec, new: ModelSpec) -> bool:
    same_limits = {name: getattr(old, name) for name in QUEUE_LIMITS}
    return msgspec.structs.replace(new, **same_limits) == old


def apply_reload(
    new: Config, current: Config, supervisor: Supervisor, scheduler: Scheduler
) -> ReloadPlan:
    """Take the running pool to `new`'s models; the plan it carried out."""
    sup = supervisor
    plan = plan_reload(
        {model_id: runtime.spec for model_id, runtime in sup.models.items()},
        new,
        failed=[
            model_id
            for model_id, runtime in sup.models.items()
            if runtime.state is ModelState.FAILED and not runtime.unloaded
        ],
        current=current,
    )
    for spec in plan.added:
        sup.add_model(spec)
        scheduler.add_model(spec)
    for spec in plan.changed:
        sup.replace_spec(spec)
        scheduler.add_model(spec)  # its queue takes the new limits
    for spec in plan.retuned:
        sup.models[spec.id].spec = spec  # the instances stay: nothing they run changed
        scheduler.add_model(spec)
    for model_id in plan.retried:
        sup.load(model_id)
    for model_id in plan.removed:
        sup.remove_model(model_id)
        scheduler.fail_queued(
            model_id, errors.ModelNotFound(f"model {model_id!r} was removed by a reload")
        )
    return plan
