"""Memory: what an instance will cost, what the pool uses, and whom to evict.

Instances of one model share its mmap'ed weights, so usage is measured as PSS
(proportional set size) where the OS reports it, and the weights are charged once
per model in estimates. Policies here are pure: the supervisor feeds them numbers.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

import psutil

from llamapool.config import ModelSpec, parse_bytes

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
