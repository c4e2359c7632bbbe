"""Memory: what an instance will cost, what the pool uses, and whom to evict.

Instances of one model share its mmap'ed weights, so usage is measured as PSS
(proportional set size) where the OS reports it, and the weights are charged once
per model in estimates. The policies (`choose_evictions`, `OverLimit`) are pure and fed
numbers; `MemoryBudget` applies them to the pool.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import psutil

from llamapool.config import ModelSpec, PoolSettings, parse_bytes
from llamapool.pool.lifecycle import ExitCause, WorkerState

if TYPE_CHECKING:
    from llamapool.pool.handle import WorkerHandle
    from llamapool.pool.runtime import ModelRuntime
    from llamapool.pool.supervisor import Supervisor

log = logging.getLogger("llamapool.supervisor")

MiB = 1 << 20
# A worker's interpreter, llama.cpp's libraries and buffers, measured at ~30-50 MiB
# USS on x86-64 Linux with a tiny model.
PROCESS_BASE = 48 * MiB

# -- GGUF metadata ------------------------------------------------------------

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
    7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF we can read the header of."""


def _read(fh: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise GGUFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_string(fh: IO[bytes]) -> str:
    n = _read(fh, "<Q")
    if n > 1 << 24:
        raise GGUFError("implausible string length in GGUF header")
    return fh.read(n).decode("utf-8", errors="replace")


def _skip_value(fh: IO[bytes], vtype: int) -> None:
    if vtype in _SCALARS:
        fh.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _STRING:
        fh.seek(_read(fh, "<Q"), os.SEEK_CUR)
    elif vtype == _ARRAY:
        etype, count = _read(fh, "<I"), _read(fh, "<Q")
        if etype in _SCALARS:
            fh.seek(struct.calcsize(_SCALARS[etype]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(fh, etype)
    else:
        raise GGUFError(f"unknown GGUF value type {vtype}")


def read_gguf_scalars(path: str) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header; an array's length as `<key>#count`."""
    out: dict[str, Any] = {}
    with open(path, "rb", buffering=1 << 16) as fh:
        if fh.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = _read(fh, "<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version}")
        _read(fh, "<Q")  # tensor count
        for _ in range(_read(fh, "<Q")):
            key = _read_string(fh)
            vtype = _read(fh, "<I")
            if vtype in _SCALARS:
                out[key] = _read(fh, _SCALARS[vtype])
            elif vtype == _STRING:
                out[key] = _read_string(fh)
            elif vtype == _ARRAY:
                start = fh.tell()
                _read(fh, "<I")  # element type
                out[f"{key}#count"] = _read(fh, "<Q")
                fh.seek(start)
                _skip_value(fh, vtype)
            else:
                _skip_value(fh, vtype)
    return out


# -- estimates ----------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of a model: weights (shared by instances when mmap'ed) + per instance."""

    weights: int
    kv_cache: int
    overhead: int
    shared_weights: bool

    @property
    def per_instance(self) -> int:
        return self.kv_cache + self.overhead + (0 if self.shared_weights else self.weights)

    def cost(self, running_instances: int) -> int:
        """What one more instance adds, given how many of this model already run."""
        if self.shared_weights and running_instances == 0:
            return self.weights + self.per_instance
        return self.per_instance


def estimate(spec: ModelSpec) -> Footprint:
    """Estimate a model's memory from its GGUF header, n_ctx and n_parallel."""
    cfg = spec.config
    weights = os.path.getsize(cfg.model_path)
    if cfg.mmproj_path:
        weights += os.path.getsize(cfg.mmproj_path)
    kv = 0
    try:
        meta = read_gguf_scalars(cfg.model_path)
    except (OSError, GGUFError):
        meta = {}
    arch = meta.get("general.architecture")
    if arch:
        n_layer = int(meta.get(f"{arch}.block_count", 0))
        n_embd = int(meta.get(f"{arch}.embedding_length", 0))
        n_head = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
        n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
        head_dim = n_embd // n_head if n_head else 0
        k_len = int(meta.get(f"{arch}.attention.key_length", head_dim))
        v_len = int(meta.get(f"{arch}.attention.value_length", head_dim))
        # f16 K and V per layer per position, n_ctx positions for each parallel request.
        kv = cfg.n_ctx * cfg.n_parallel * n_layer * n_head_kv * (k_len + v_len) * 2
    # Compute buffers: the graph is reserved for a full n_batch ubatch, whose logits
    # alone are n_batch × n_vocab floats (96 MiB for SmolLM2 at 512); a small share of
    # the weights covers the rest.
    n_vocab = int(meta.get("tokenizer.ggml.tokens#count") or meta.get(f"{arch}.vocab_size") or 0)
    overhead = PROCESS_BASE + weights // 20 + cfg.n_batch * n_vocab * 4
    return Footprint(weights=weights, kv_cache=kv, overhead=overhead, shared_weights=cfg.use_mmap)


# -- measurement ----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    rss: int
    pss: int | None

    @property
    def charge(self) -> int:
        """What this process costs the pool: PSS where known (shared pages split), else RSS."""
        return self.pss if self.pss is not None else self.rss


def sample(pid: int) -> Sample | None:
    """RSS and PSS of one process; None if it is gone."""
    try:
        proc = psutil.Process(pid)
        try:
            full = proc.memory_full_info()
            return Sample(rss=full.rss, pss=getattr(full, "pss", None))
        except psutil.AccessDenied:
            return Sample(rss=proc.memory_info().rss, pss=None)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def budget_bytes(setting: str | int) -> int:
    return parse_bytes(setting, total=psutil.virtual_memory().total)


# -- policies -------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An instance that could be evicted to make room."""

    worker_id: str
    model_id: str
    charge: int
    last_used: float


def choose_evictions(candidates: Iterable[Candidate], needed: int) -> list[Candidate] | None:
    """Least recently used first, until `needed` bytes are freed; None if they cannot be."""
    chosen: list[Candidate] = []
    freed = 0
    for cand in sorted(candidates, key=lambda c: c.last_used):
        if freed >= needed:
            break
        chosen.append(cand)
        freed += cand.charge
    return chosen if freed >= needed else None


class OverLimit:
    """Counts consecutive readings above a per-worker limit; acts only after `readings`."""

    def __init__(self, limit: int | None, readings: int = 3):
        self.limit, self.readings = limit, readings
        self.counts: dict[str, int] = {}

    def observe(self, worker_id: str, charge: int) -> bool:
        """Record one reading; True when the worker has been over the limit long enough."""
        if self.limit is None or charge <= self.limit:
            self.counts.pop(worker_id, None)
            return False
        self.counts[worker_id] = self.counts.get(worker_id, 0) + 1
        return self.counts[worker_id] >= self.readings

    def forget(self, worker_id: str) -> None:
        self.counts.pop(worker_id, None)


def fmt_bytes(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


# -- the pool's budget -------------------------------------------------------------


class MemoryBudget:
    """The pool's memory: its budget, what it uses, whom to evict, who is over its limit.

    It knows the workers through the supervisor (`pool`) and acts on them only through
    the supervisor's commands (a graceful stop), as a model runtime does.
    """

    def __init__(
        self,
        pool: Supervisor,
        settings: PoolSettings,
        *,
        sample_router: Callable[[], Sample | None] = lambda: sample(os.getpid()),
        available: Callable[[], int] = lambda: psutil.virtual_memory().available,
    ):
        self.pool = pool
        self.limit = budget_bytes(settings.memory_budget)
        worker_limit = settings.max_worker_memory
        self.over_limit = OverLimit(
            budget_bytes(worker_limit) if worker_limit is not None else None
        )
        self.interval = settings.memory_check_interval
        self.sample_router = sample_router
        self.available = available
        self.router: Sample | None = sample_router()
        self._next_check = 0.0

    def used(self) -> int:
        """The pool's use: the router plus every live worker (its estimate until measured)."""
        used = self.router.charge if self.router else 0
        counted: dict[str, int] = {}
        for w in self.pool.live_workers():
            runtime = self.pool.models.get(w.model_id)
            if w.memory is not None and w.state is not WorkerState.STARTING:
                used += w.memory.charge
            elif runtime is not None and runtime.footprint is not None:
                used += runtime.footprint.cost(counted.get(w.model_id, 0))
            counted[w.model_id] = counted.get(w.model_id, 0) + 1
        return used

    def make_room(self, runtime: ModelRuntime) -> bool:
        """True if one more instance fits; else evict idle instances of others, or say why not."""
        if runtime.footprint is None:
            return True
        if any(wid in self.pool.workers for wid in runtime.evicting):
            return False  # evictions for us are still draining
        runtime.evicting.clear()
        model_id = runtime.id
        needed = runtime.footprint.cost(len(self.pool.workers_of(model_id)))
        free = min(self.limit - self.used(), self.available())
        if needed <= free:
            runtime.memory_blocked = None
            return True
        victims = choose_evictions(self.eviction_candidates(model_id), needed - free)
        if victims is None:
            reason = (
                f"model {model_id!r} needs ~{fmt_bytes(needed)} for another instance but only "
                f"{fmt_bytes(max(0, free))} of the {fmt_bytes(self.limit)} memory budget is free, "
                "and no idle instance of another model can be evicted; raise pool.memory_budget "
                "or unload a model"
            )
            if reason != runtime.memory_blocked:
                log.error("%s", reason)
            runtime.memory_blocked = reason
            return False
        for victim in victims:
            w = self.pool.workers[victim.worker_id]
            other = self.pool.models[w.model_id]
            other.target = max(other.spec.min_instances, len(self.pool.workers_of(w.model_id)) - 1)
            other.evictions += 1
            self.pool.observer.evicted(w.model_id)
            runtime.evicting.add(w.id)
            reason = f"evicted (idle, least recently used) to make room for {model_id}"
            self.pool.stop_gracefully(w, ExitCause.EVICTED, reason)
            other.settle(reason)
        return False

    def eviction_candidates(self, model_id: str) -> list[Candidate]:
        """Idle instances of other models, least recently used first, never below a model's
        min_instances and never a busy one."""
        spare = {
            mid: len(self.pool.serving(mid)) - rt.spec.min_instances
            for mid, rt in self.pool.models.items()
        }
        idle = sorted(
            (
                w
                for w in self.pool.workers.values()
                if w.model_id != model_id and w.state is WorkerState.IDLE and not w.in_flight
            ),
            key=lambda w: w.last_used,
        )
        out = []
        for w in idle:
            if spare.get(w.model_id, 0) > 0:
                spare[w.model_id] -= 1
                charge = w.memory.charge if w.memory else self._estimate_of(w)
                out.append(Candidate(w.id, w.model_id, charge, w.last_used))
        return out

    def _estimate_of(self, w: WorkerHandle) -> int:
        runtime = self.pool.models.get(w.model_id) or self.pool.removed.get(w.model_id)
        return runtime.footprint.per_instance if runtime and runtime.footprint else 0

    def check(self, now: float) -> None:
        """Sample every live worker; drain and restart one that stays above its limit."""
        if now < self._next_check:
            return
        self._next_check = now + self.interval
        self.router = self.sample_router()
        for w in self.pool.live_workers():
            if w.state is WorkerState.STARTING:
                continue
            w.memory = w.process.memory()
            if w.memory is None or not w.ready:
                continue
            if self.over_limit.observe(w.id, w.memory.charge):
                self.over_limit.forget(w.id)
                runtime = self.pool.models.get(w.model_id)
                if runtime is not None:
                    runtime.restarts += 1
                limit = fmt_bytes(self.over_limit.limit or 0)
                self.pool.observer.worker_restarted(w.model_id, ExitCause.MEMORY_LIMIT)
                self.pool.stop_gracefully(
                    w,
                    ExitCause.MEMORY_LIMIT,
                    f"restart: memory {fmt_bytes(w.memory.charge)} above max_worker_memory "
                    f"{limit} for {self.over_limit.readings} readings in a row",
                )
