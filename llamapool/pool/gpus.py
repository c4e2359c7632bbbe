"""What the GPUs report: each device's VRAM and each process's share, through a reader.

The supervisor reads GPUs only through a `GpuReader`, so the VRAM accounting is tested
with readings recorded on a real machine (tests/fakegpu.py) and nothing in CI loads NVML.
`NvmlReader` asks NVIDIA's NVML through nvidia-ml-py (`pynvml`), imported only when a
pool starts; without the package, the driver or a GPU, `open_reader` says so once and the
pool runs without VRAM accounting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("llamapool.supervisor")


@dataclass(frozen=True)
class DeviceReading:
    """One GPU as NVML numbers it (the order nvidia-smi shows: PCI bus order)."""

    index: int
    name: str
    total: int
    used: int
    free: int


@dataclass(frozen=True)
class GpuReading:
    """One moment of every GPU: the devices, and VRAM per process per device.

    `processes` maps a pid to {device index: bytes}; a pid NVML lists without a number
    (some drivers, or a process in another PID namespace) is absent.
    """

    devices: tuple[DeviceReading, ...]
    processes: dict[int, dict[int, int]]

    def device(self, index: int) -> DeviceReading | None:
        return next((d for d in self.devices if d.index == index), None)


class GpuReader(Protocol):
    """Reads the GPUs; `read` is called from the supervisor's tick, every few seconds."""

    def read(self) -> GpuReading:
        """The devices and per-process VRAM now; raise OSError when they cannot be read."""


class NvmlReader:
    """A GpuReader over NVML (nvidia-ml-py), initialised once for the router's lifetime."""

    def __init__(self, nvml: Any):
        self.nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def read(self) -> GpuReading:
        """Memory info and compute processes of every device."""
        nvml = self.nvml
        devices, processes = [], {}
        try:
            for index, handle in enumerate(self.handles):
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                devices.append(DeviceReading(index, name, info.total, info.used, info.free))
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.usedGpuMemory is not None:
                        on = processes.setdefault(proc.pid, {})
                        on[index] = on.get(index, 0) + proc.usedGpuMemory
        except nvml.NVMLError as exc:
            raise OSError(f"NVML: {exc}") from None
        return GpuReading(tuple(devices), processes)


def open_reader() -> GpuReader | None:
    """An NVML reader if this machine has NVIDIA GPUs and nvidia-ml-py; else None, logged once."""
    try:
        import pynvml
    except ImportError:
        log.info(
            "no VRAM accounting: nvidia-ml-py is not installed (`make serve GPU=cuda` "
            "installs it; `pip install nvidia-ml-py`)"
        )
        return None
    try:
        pynvml.nvmlInit()
        reader = NvmlReader(pynvml)
    except pynvml.NVMLError as exc:
        log.info("no VRAM accounting: NVML is not available here (%s)", exc)
        return None
    if not reader.handles:
        log.info("no VRAM accounting: NVML reports no GPU")
        return None
    try:
        reading = reader.read()
    except OSError as exc:
        log.info("no VRAM accounting: %s", exc)
        return None
    names = ", ".join(f"{d.index}: {d.name} ({d.total >> 20} MiB)" for d in reading.devices)
    log.info("VRAM accounting on %d GPU(s): %s", len(reading.devices), names)
    return reader
