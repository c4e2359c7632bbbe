"""Memory: what an instance will cost, what the pool uses, and whom to evict.

Instances of one model share its mmap'ed weights, so usage is measured as PSS
(proportional set size) where the OS reports it, and the weights are charged once
per model in estimates. The policies (`choose_evictions`, `OverLimit`) are pure and fed
numbers; `MemoryBudget` applies them to the pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from llamapool.config import ModelSpec, PoolSettings, parse_bytes
from llamapool.pool.batch import SCORED_ROWS
from llamapool.pool.gguf_header import GGUFError, GGUFHeader, read_gguf
from llamapool.pool.gguf_header import read_gguf_scalars as read_gguf_scalars  # lived here first
from llamapool.pool.gpus import GpuReader, open_reader
from llamapool.pool.lifecycle import ExitCause, WorkerState
from llamapool.pool.vram import Shortfall, VramBudget, offload, open_budget

if TYPE_CHECKING:
    from llamapool.pool.handle import WorkerHandle
    from llamapool.pool.launcher import NodeRoom
    from llamapool.pool.runtime import ModelRuntime
    from llamapool.pool.supervisor import Supervisor

log = logging.getLogger("llamapool.supervisor")

MiB = 1 << 20
# A worker's interpreter, llama.cpp's libraries and buffers, measured at ~30-50 MiB
# USS on x86-64 Linux with a tiny model.
PROCESS_BASE = 48 * MiB

# -- estimates ----------------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of a model: weights (shared by instances when mmap'ed) + per instance,
    in RAM; and what each instance puts on its GPU(s) (`vram`: never shared, as every
    process uploads its own copy)."""

    weights: int
    kv_cache: int
    overhead: int
    shared_weights: bool
    vram: int = 0
    prompt_cache: int = 0  # the RAM prompt cache's limit (prompt_cache_bytes)

    @property
    def per_instance(self) -> int:
        weights = 0 if self.shared_weights else self.weights
        return self.kv_cache + self.overhead + self.prompt_cache + weights

    def cost(self, running_instances: int) -> int:
        """What one more instance adds, given how many of this model already run."""
        if self.shared_weights and running_instances == 0:
            return self.weights + self.per_instance
        return self.per_instance


def estimate(spec: ModelSpec, *, gpu: bool = False) -> Footprint:
    """Estimate a model's memory from its GGUF header, n_ctx and n_parallel; with `gpu`
    (a GPU is there to take them), n_gpu_layers' share goes to `vram` (see vram.offload)."""
    cfg = spec.config
    weights = os.path.getsize(cfg.model_path)
    if cfg.mmproj_path:
        weights += os.path.getsize(cfg.mmproj_path)
    header = _header(cfg.model_path)
    meta = header.meta if header else {}
    kv = _kv_bytes(meta, cfg.n_ctx * cfg.n_parallel)
    # Compute buffers: the graph is reserved for a full n_batch ubatch, whose logits
    # alone are n_batch × n_vocab floats (96 MiB for SmolLM2 at 512); a small share of
    # the weights covers the rest.
    overhead = PROCESS_BASE + weights // 20 + cfg.n_batch * _n_vocab(meta) * 4
    # ... and llama.cpp's output buffer, which keeps the logits of the most rows one
    # decode asked for (it grows, never shrinks): every generating slot's token and drafts,
    # or a scored prompt's chunk.
    drafts = cfg.speculative.draft_max if cfg.speculative is not None else 0
    output_rows = min(cfg.n_batch, max(SCORED_ROWS, cfg.n_parallel * (1 + drafts)))
    overhead += output_rows * _n_vocab(meta) * 4
    draft = cfg.speculative.draft_model_path if cfg.speculative is not None else None
    if draft is not None:  # a second model, context and compute buffer in the same worker
        draft_weights = os.path.getsize(draft)
        draft_header = _header(draft)
        draft_meta = draft_header.meta if draft_header else {}
        weights += draft_weights
        kv += _kv_bytes(draft_meta, cfg.n_ctx * cfg.n_parallel)
        overhead += draft_weights // 20 + cfg.n_batch * _n_vocab(draft_meta) * 4
    fp = Footprint(
        weights=weights,
        kv_cache=kv,
        overhead=overhead,
        shared_weights=cfg.use_mmap,
        prompt_cache=cfg.prompt_cache_limit(),
    )
    return offload(fp, cfg, header) if gpu and header is not None else fp


def _header(path: str) -> GGUFHeader | None:
    try:
        return read_gguf(path)
    except (OSError, GGUFError):
        return None


def _kv_bytes(meta: Mapping[str, Any], cells: int) -> int:
    """f16 K and V of every layer for `cells` positions, from a GGUF's key/values."""
    arch = meta.get("general.architecture")
    if not arch:
        return 0
    n_layer = int(meta.get(f"{arch}.block_count", 0))
    n_embd = int(meta.get(f"{arch}.embedding_length", 0))
    n_head = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
    head_dim = n_embd // n_head if n_head else 0
    k_len = int(meta.get(f"{arch}.attention.key_length", head_dim))
    v_len = int(meta.get(f"{arch}.attention.value_length", head_dim))
    return cells * n_layer * n_head_kv * (k_len + v_len) * 2


def _n_vocab(meta: Mapping[str, Any]) -> int:
    arch = meta.get("general.architecture")
    return int(meta.get("tokenizer.ggml.tokens#count") or meta.get(f"{arch}.vocab_size") or 0)


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
    vram: Mapping[int, int] = field(default_factory=dict)  # what it holds on each GPU


def choose_evictions(
    candidates: Iterable[Candidate], needed: int, needed_vram: Mapping[int, int] | None = None
) -> list[Candidate] | None:
    """Least recently used first, until `needed` bytes of RAM and `needed_vram` bytes on
    each GPU are freed, skipping any that frees nothing still lacking (an instance on
    another GPU); None if they cannot be."""
    lacking = {d: n for d, n in (needed_vram or {}).items() if n > 0}
    chosen: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: c.last_used):
        if needed <= 0 and not lacking:
            break
        if not (needed > 0 and cand.charge > 0) and not any(cand.vram.get(d) for d in lacking):
            continue
        chosen.append(cand)
        needed -= cand.charge
        for d, n in cand.vram.items():
            if d in lacking:
                lacking[d] -= n
                if lacking[d] <= 0:
                    del lacking[d]
    return chosen if needed <= 0 and not lacking else None


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
        gpu_reader: Callable[[], GpuReader | None] = open_reader,
    ):
        self.pool = pool
        self.setting = settings.memory_budget
        self.limit = budget_bytes(settings.memory_budget)
        # Model id → the node its next instance goes to, where the launcher places workers
        # on several machines: chosen here, taken by the spawn that follows.
        self.planned: dict[str, str] = {}
        worker_limit = settings.max_worker_memory
        self.over_limit = OverLimit(
            budget_bytes(worker_limit) if worker_limit is not None else None
        )
        self.interval = settings.memory_check_interval
        self.sample_router = sample_router
        self.available = available
        self.router: Sample | None = sample_router()
        # None without NVIDIA GPUs or nvidia-ml-py: then RAM is the only budget.
        self.vram: VramBudget | None = open_budget(gpu_reader, settings.gpu_memory_budget)
        self._next_check = 0.0

    def used(self) -> int:
        """The pool's use: the router plus every live worker (its estimate until measured)."""
        return (self.router.charge if self.router else 0) + self._workers_use(None)

    def node_used(self, node: str) -> int:
        """What the pool's live workers on `node` use (their estimates until measured)."""
        return self._workers_use(node)

    def _workers_use(self, node: str | None) -> int:
        """Live workers' use, each measured or estimated; only those on `node` unless None."""
        used = 0
        counted: dict[str, int] = {}
        for w in self.pool.live_workers():
            if node is not None and w.process.node != node:
                continue
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
        rooms = self.pool.launcher.nodes_for(runtime.spec)
        if rooms is not None:
            return self._make_room_on_a_node(runtime, rooms)
        model_id = runtime.id
        needed = runtime.footprint.cost(len(self.pool.workers_of(model_id)))
        free = min(self.limit - self.used(), self.available())
        short: list[Shortfall] = []
        if self.vram is not None:
            gpu_needs = self.vram.estimate(
                runtime.footprint, runtime.spec, self.pool.gpu_for(model_id)
            )
            short = self.vram.shortfalls(gpu_needs, self.vram_used())
        if needed <= free and not short:
            runtime.memory_blocked = None
            return True
        lacking_vram = {s.device: s.lacking for s in short}
        victims = choose_evictions(self.eviction_candidates(model_id), needed - free, lacking_vram)
        if victims is None:
            if needed > free:
                reason = (
                    f"model {model_id!r} needs ~{fmt_bytes(needed)} for another instance but only "
                    f"{fmt_bytes(max(0, free))} of the {fmt_bytes(self.limit)} memory budget is "
                    "free, and no idle instance of another model can be evicted; raise "
                    "pool.memory_budget or unload a model"
                )
            elif self.vram is not None and self.vram.reading.device(short[0].device) is None:
                seen = ", ".join(map(str, self.vram.devices))
                reason = (
                    f"model {model_id!r} is placed on GPU {short[0].device} (gpus), but NVML "
                    f"sees only GPU {seen}; fix the model's gpus"
                )
            else:
                s = short[0]
                reason = (
                    f"model {model_id!r} needs ~{fmt_bytes(s.needed)} of VRAM on GPU {s.device} "
                    f"for another instance but only {fmt_bytes(max(0, s.free))} of its "
                    f"{fmt_bytes(s.limit)} gpu_memory_budget is free, and no idle instance of "
                    "another model there can be evicted; raise pool.gpu_memory_budget, lower "
                    "n_gpu_layers, n_ctx or n_parallel, or unload a model"
                )
            return _refuse(runtime, reason)
        self._evict(runtime, victims)
        return False

    def _evict(self, runtime: ModelRuntime, victims: list[Candidate]) -> None:
        for victim in victims:
            w = self.pool.workers[victim.worker_id]
            other = self.pool.models[w.model_id]
            # Those already leaving (an earlier victim in this loop) are not counted again.
            other.target = max(other.spec.min_instances, len(self.pool.serving(w.model_id)) - 1)
            other.evictions += 1
            self.pool.observer.evicted(w.model_id)
            runtime.evicting.add(w.id)
            reason = f"evicted (idle, least recently used) to make room for {runtime.id}"
            self.pool.stop_gracefully(w, ExitCause.EVICTED, reason)
            other.settle(reason)

    def _make_room_on_a_node(self, runtime: ModelRuntime, rooms: list[NodeRoom]) -> bool:
        """The budget per node, for workers on several machines: the first node (in the
        launcher's order) with room takes the next instance; else idle instances of other
        models on one node are evicted; else the refusal names every node's numbers."""
        model_id = runtime.id
        assert runtime.footprint is not None
        if not rooms:  # no node has the CPUs or resources now: the launcher's queue waits
            runtime.memory_blocked = None
            return True
        seen = []
        needed = 0
        for room in rooms:
            here = sum(1 for w in self.pool.workers_of(model_id) if w.process.node == room.node)
            needed = runtime.footprint.cost(here)
            free = parse_bytes(self.setting, total=room.memory) - self.node_used(room.node)
            if room.available is not None:
                free = min(free, room.available)
            if needed <= free:
                self.planned[model_id] = room.node
                runtime.memory_blocked = None
                return True
            on_node = [
                c
                for c in self.eviction_candidates(model_id)
                if self.pool.workers[c.worker_id].process.node == room.node
            ]
            victims = choose_evictions(on_node, needed - free)
            if victims is not None:
                self._evict(runtime, victims)
                return False
            seen.append(f"{room.node[:8]} {fmt_bytes(max(0, free))}")
        reason = (
            f"model {model_id!r} needs ~{fmt_bytes(needed)} for another instance but no node "
            f"has that much of its memory budget free ({', '.join(seen)}), and no idle "
            "instance of another model there can be evicted; raise pool.memory_budget, add a "
            "node or unload a model"
        )
        return _refuse(runtime, reason)

    def vram_shortfall(self, runtime: ModelRuntime, more: int) -> Shortfall | None:
        """What `more` instances of a model would lack on the first GPU short of VRAM,
        placed as they would be (round-robin over its gpus); None if they fit or there
        is no VRAM accounting."""
        if self.vram is None or runtime.footprint is None or more <= 0:
            return None
        needs: dict[int, int] = {}
        planned: dict[int, int] = {}
        for _ in range(more):
            gpu = self.pool.gpu_for(runtime.id, planned)
            if gpu is not None:
                planned[gpu] = planned.get(gpu, 0) + 1
            for d, n in self.vram.estimate(runtime.footprint, runtime.spec, gpu).items():
                needs[d] = needs.get(d, 0) + n
        short = self.vram.shortfalls(needs, self.vram_used())
        return short[0] if short else None

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
                vram = self.vram_of(w)
                out.append(Candidate(w.id, w.model_id, charge, w.last_used, vram))
        return out

    def _estimate_of(self, w: WorkerHandle) -> int:
        runtime = self.pool.models.get(w.model_id) or self.pool.removed.get(w.model_id)
        return runtime.footprint.per_instance if runtime and runtime.footprint else 0

    def vram_of(self, w: WorkerHandle) -> dict[int, int]:
        """What a worker holds on each GPU (measured once it is up, else estimated)."""
        runtime = self.pool.models.get(w.model_id) or self.pool.removed.get(w.model_id)
        if self.vram is None or runtime is None:
            return {}
        return self.vram.charge(w, runtime.footprint, runtime.spec)

    def vram_used(self) -> dict[int, int]:
        """The pool's use of each GPU: its live workers' VRAM."""
        if self.vram is None:
            return {}
        return self.vram.used(self.vram_of(w) for w in self.pool.live_workers())

    def check(self, now: float) -> None:
        """Sample every live worker; drain and restart one that stays above its limit."""
        if now < self._next_check:
            return
        self._next_check = now + self.interval
        self.router = self.sample_router()
        if self.vram is not None:
            self.vram.refresh()
        for w in self.pool.live_workers():
            if self.vram is not None:
                w.vram = self.vram.measured(w.pid)
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


def _refuse(runtime: ModelRuntime, reason: str) -> bool:
    """The model cannot have another instance now: say why once (not on every retry), keep
    the reason for /admin/pool and the queue's 503, and return False."""
    if reason != runtime.memory_blocked:
        log.error("%s", reason)
    runtime.memory_blocked = reason
    return False
