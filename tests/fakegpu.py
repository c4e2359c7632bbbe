"""A GpuReader that replays NVML readings (recorded as JSON), for tests without a GPU."""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace

from llamapool.pool.gpus import DeviceReading, GpuReading

DATA = pathlib.Path(__file__).parent / "data"


def load_reading(path: pathlib.Path) -> GpuReading:
    """A recorded reading: `devices` as NVML reported them, `processes` {pid: {gpu: bytes}}."""
    raw = json.loads(path.read_text())
    devices = tuple(DeviceReading(**d) for d in raw["devices"])
    processes = {
        int(pid): {int(d): n for d, n in on.items()} for pid, on in raw["processes"].items()
    }
    return GpuReading(devices, processes)


class FakeGpuReader:
    """Answers the recorded reading; the test moves VRAM between processes and devices."""

    def __init__(self, reading: GpuReading | None = None):
        self.reading = reading or load_reading(DATA / "nvml-2xh200.json")
        self.fail = False
        self.reads = 0

    def read(self) -> GpuReading:
        self.reads += 1
        if self.fail:
            raise OSError("NVML: GPU is lost")
        return self.reading

    def set_process(self, pid: int, on: dict[int, int]) -> None:
        """NVML lists process `pid` with these bytes per GPU; the devices' use follows."""
        old = self.reading.processes.get(pid, {})
        processes = {**self.reading.processes, pid: on}
        devices = []
        for d in self.reading.devices:
            delta = on.get(d.index, 0) - old.get(d.index, 0)
            devices.append(replace(d, used=d.used + delta, free=d.free - delta))
        self.reading = GpuReading(tuple(devices), processes)

    def set_free(self, index: int, free: int) -> None:
        """Another (foreign) process took VRAM on GPU `index`: NVML says only `free` is left."""
        devices = tuple(
            replace(d, used=d.total - free, free=free) if d.index == index else d
            for d in self.reading.devices
        )
        self.reading = GpuReading(devices, self.reading.processes)
