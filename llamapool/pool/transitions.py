"""The check every lifecycle table goes through (models, workers, cores, decode threads).

Apart from lifecycle.py so that engine-side modules can use it: lifecycle.py imports
worker.py, which imports the engines.
"""

from __future__ import annotations

import enum


class IllegalTransition(RuntimeError):
    """A state change the lifecycle's table does not allow: a bug in the caller."""


def check(table: dict, kind: str, name: str, old: enum.Enum, new: enum.Enum, reason: str) -> None:
    """Raise IllegalTransition unless `old` → `new` is in `table`."""
    if new not in table[old]:
        raise IllegalTransition(f"{kind} {name}: {old.value} → {new.value} ({reason})")
