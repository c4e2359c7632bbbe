"""VRAM: what an instance puts on its GPUs, and the pool's budget of each GPU.

`offload` splits a model's estimate between RAM and VRAM by `n_gpu_layers`, from the
GGUF header. `VramBudget` holds the last `GpuReading` and answers, per GPU, what the
pool's workers use (NVML's number for a worker's process once it is up, its estimate
while it boots) and what another instance would lack; `MemoryBudget` asks it alongside
RAM, so a new instance that does not fit in VRAM evicts idle instances or is refused,
exactly as for RAM.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamapool.config import LlamaSettings, ModelSpec, parse_bytes
from llamapool.pool.gguf_header import GGUFHeader
from llamapool.pool.gpus import GpuReader, GpuReading
from llamapool.pool.lifecycle import WorkerState

if TYPE_CHECKING:
    from llamapool.pool.handle import WorkerHandle
    from llamapool.pool.memory import Footprint

log = logging.getLogger("llamapool.supervisor")

MiB = 1 << 20
# What every process holds on a GPU it uses before any tensor: the CUDA context, cuBLAS's
# workspace, llama.cpp's kernels. A first guess (CUDA 12-13 with lazy module loading);
# the GPU run (benchmarks/gpu) reports accounted against NVML to calibrate it.
CUDA_CONTEXT = 384 * MiB


def offload(fp: Footprint, cfg: LlamaSettings, header: GGUFHeader) -> Footprint:
    """`fp` with what `n_gpu_layers` puts on the GPU moved from RAM to `vram`.

    llama.cpp (the one llama-cpp-python 0.3.36 carries) counts the output layer as the
    last of n_layer + 1 and offloads from the end: n_gpu_layers N puts the output layer
    and the last N - 1 repeating layers (weights and KV cache) on the GPU; -1, or
    n_layer + 1 and above, puts them all. Its compute buffer for an n_batch step is on the
    GPU too: activations, the logits when the output layer is there, and the attention
    scores without flash attention. The logits handed back stay in RAM (fp.overhead).
    """
    meta = header.meta
    arch = meta.get("general.architecture", "")
    layer_bytes = header.layer_bytes()
    n_layer = int(meta.get(f"{arch}.block_count", 0)) or len(layer_bytes)
    if cfg.n_gpu_layers == 0 or n_layer == 0:
        return fp
    on_gpu = n_layer if cfg.n_gpu_layers < 0 else min(cfg.n_gpu_layers - 1, n_layer)
    layers = sum(layer_bytes.get(i, 0) for i in range(n_layer - on_gpu, n_layer))
    # A model without its own output matrix keeps token_embd in RAM for the input, and
    # llama.cpp copies it to the GPU for the output: only an own output matrix leaves RAM.
    output_in_file = header.tensors.get("output.weight", 0) + header.tensors.get(
        "output_norm.weight", 0
    )
    moved = layers + output_in_file
    kv = fp.kv_cache * on_gpu // n_layer
    n_embd = int(meta.get(f"{arch}.embedding_length", 0))
    n_ff = int(meta.get(f"{arch}.feed_forward_length", 0) or 4 * n_embd)
    n_head = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
    n_vocab = int(meta.get("tokenizer.ggml.tokens#count") or meta.get(f"{arch}.vocab_size") or 0)
    compute = cfg.n_batch * 4 * (n_vocab + 3 * n_ff + 4 * n_embd)
    if cfg.flash_attn == "off":
        compute += cfg.n_batch * cfg.n_ctx * n_head * 4
    return dataclasses.replace(
        fp,
        weights=max(0, fp.weights - moved),
        kv_cache=fp.kv_cache - kv,
        vram=layers + header.output_bytes() + kv + compute + CUDA_CONTEXT,
    )


def device_shares(cfg: LlamaSettings, gpu: int | None, devices: list[int]) -> dict[int, float]:
    """How an instance's VRAM divides over the GPUs, by device index.

    All on its own GPU when the model lists `gpus`; else over every GPU it sees, as
    llama.cpp splits it: all on main_gpu with split_mode none, else by tensor_split
    (evenly when unset: llama.cpp goes by free VRAM, about even on a pool's GPUs).
    """
    if gpu is not None:
        return {gpu: 1.0}
    if not devices:
        return {}
    if cfg.split_mode == "none" or len(devices) == 1:
        return {devices[min(cfg.main_gpu, len(devices) - 1)]: 1.0}
    split = list(cfg.tensor_split or [1.0] * len(devices))[: len(devices)]
    total = sum(split)
    return {d: s / total for d, s in zip(devices, split, strict=False) if s > 0}


@dataclass(frozen=True)
class Shortfall:
    """VRAM another instance would lack on one GPU."""

    device: int
    needed: int
    free: int
    limit: int

    @property
    def lacking(self) -> int:
        return self.needed - self.free


class VramBudget:
    """Each GPU's budget (`gpu_memory_budget` of its VRAM), its use, and its shortfalls."""

    def __init__(self, reader: GpuReader, setting: str | int):
        self.reader = reader
        self.setting = setting
        self.reading = GpuReading((), {})
        self.limits: dict[int, int] = {}
        self._failing = False
        self.refresh()

    @property
    def devices(self) -> list[int]:
        """The GPUs' indices, as NVML numbers them."""
        return [d.index for d in self.reading.devices]

    def refresh(self) -> None:
        """Read the GPUs again; on a failed read keep the last reading (logged once)."""
        try:
            self.reading = self.reader.read()
        except OSError as exc:
            if not self._failing:
                log.warning("cannot read the GPUs, keeping the last reading: %s", exc)
            self._failing = True
            return
        self._failing = False
        self.limits = {
            d.index: parse_bytes(self.setting, total=d.total) for d in self.reading.devices
        }

    def measured(self, pid: int) -> dict[int, int] | None:
        """What NVML says process `pid` holds on each GPU; None when it lists no number."""
        return self.reading.processes.get(pid)

    def estimate(self, fp: Footprint | None, spec: ModelSpec, gpu: int | None) -> dict[int, int]:
        """An instance's estimated VRAM on each GPU."""
        if fp is None or not fp.vram:
            return {}
        shares = device_shares(spec.config, gpu, self.devices)
        return {d: int(fp.vram * share) for d, share in shares.items()}

    def charge(self, w: WorkerHandle, fp: Footprint | None, spec: ModelSpec) -> dict[int, int]:
        """What a worker holds on each GPU: NVML's number once it is up, else its estimate."""
        measured = self.measured(w.pid)
        if measured is not None and w.state is not WorkerState.STARTING:
            return measured
        return self.estimate(fp, spec, w.gpu)

    def used(self, charges: Iterable[dict[int, int]]) -> dict[int, int]:
        """The pool's use of each GPU: the sum of its workers' charges."""
        out = dict.fromkeys(self.devices, 0)
        for charge in charges:
            for d, n in charge.items():
                out[d] = out.get(d, 0) + n
        return out

    def shortfalls(self, needs: dict[int, int], used: dict[int, int]) -> list[Shortfall]:
        """Per GPU, what `needs` would lack: within the budget, and within what NVML says is
        free (other processes use GPUs too)."""
        out = []
        for d, needed in sorted(needs.items()):
            limit = self.limits.get(d, 0)
            device = self.reading.device(d)
            free = min(limit - used.get(d, 0), device.free if device else 0)
            if needed > free:
                out.append(Shortfall(d, needed, free, limit))
        return out


def open_budget(
    reader_factory: Callable[[], GpuReader | None], setting: str | int
) -> VramBudget | None:
    """A VRAM budget when a GPU reader is available (NVML found GPUs), else None."""
    reader = reader_factory()
    return VramBudget(reader, setting) if reader is not None else None
