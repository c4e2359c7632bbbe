"""The GPU readers: NVML through a stand-in for nvidia-ml-py (CI has neither GPU nor NVML)."""

from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

from fakegpu import DATA, load_reading

from llamapool.pool.gpus import NvmlReader, open_reader

MiB = 1 << 20


class _NVMLError(Exception):
    pass


def _fake_nvml(devices, processes, *, init_error=None):
    """The part of pynvml the reader uses, answering from a recorded reading."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError

    def init():
        if init_error:
            raise _NVMLError(init_error)

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        total=devices[h].total, used=devices[h].used, free=devices[h].free
    )
    m.nvmlDeviceGetName = lambda h: devices[h].name.encode()  # older bindings give bytes
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        SimpleNamespace(pid=pid, usedGpuMemory=on[h]) for pid, on in processes.items() if h in on
    ]
    return m


def test_nvml_reader_reads_devices_and_processes():
    recorded = load_reading(DATA / "nvml-2xh200.json")
    processes = {4242: {0: 700 * MiB, 1: 300 * MiB}, 4343: {1: None}}  # None: not available
    reader = NvmlReader(_fake_nvml(recorded.devices, processes))
    reading = reader.read()
    assert reading.devices == recorded.devices
    assert reading.device(1).name == "NVIDIA H200" and reading.device(7) is None
    assert reading.processes == {4242: {0: 700 * MiB, 1: 300 * MiB}}


def test_open_reader_without_nvidia_ml_py_says_so_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    with caplog.at_level(logging.INFO, logger="llamapool.supervisor"):
        assert open_reader() is None
    assert caplog.text.count("no VRAM accounting: nvidia-ml-py is not installed") == 1


def test_open_reader_without_a_driver_or_gpu(monkeypatch, caplog):
    recorded = load_reading(DATA / "nvml-2xh200.json")
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml((), {}, init_error="Driver Not Loaded"))
    with caplog.at_level(logging.INFO, logger="llamapool.supervisor"):
        assert open_reader() is None
    assert "NVML is not available here (Driver Not Loaded)" in caplog.text
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml((), {}))
    assert open_reader() is None
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(recorded.devices, {}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llamapool.supervisor"):
        assert isinstance(open_reader(), NvmlReader)
    assert "VRAM accounting on 2 GPU(s): 0: NVIDIA H200 (143771 MiB)" in caplog.text
