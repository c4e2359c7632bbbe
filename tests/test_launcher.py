"""LocalLauncher: what a worker process is started with (Popen itself is a stand-in here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llamapool.config import parse_config
from llamapool.pool import launcher as launcher_module
from llamapool.pool.launcher import LocalLauncher, WorkerLaunch


class _Popen:
    started: list[_Popen] = []

    def __init__(self, cmd, *, env, **kwargs):
        self.cmd, self.env, self.pid = cmd, env, 4242
        _Popen.started.append(self)


@pytest.fixture
def popen(monkeypatch):
    _Popen.started = []
    monkeypatch.setattr(launcher_module.subprocess, "Popen", _Popen)
    return _Popen.started


def _launch(tiny_gguf, gpu):
    spec = parse_config(
        {"models": [{"id": "m", "config": {"model_path": str(tiny_gguf), "n_threads": 1}}]}
    ).models["m"]
    return WorkerLaunch(
        worker_id="m-1",
        spec=spec,
        endpoint="ipc:///nonexistent",
        cores=[0],
        heartbeat_interval=1.0,
        heartbeat_liveness=5,
        stall_timeout=120.0,
        log_level="INFO",
        gpu=gpu,
    )


def test_a_worker_with_a_gpu_sees_only_that_gpu(tiny_gguf, popen, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    process = LocalLauncher().start(_launch(tiny_gguf, gpu=1))
    process.data.close()
    (started,) = popen
    assert started.env["CUDA_VISIBLE_DEVICES"] == "1"
    # NVML's numbering, which the config's gpus and the VRAM accounting use.
    assert started.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_worker_without_a_gpu_keeps_the_routers_view(tiny_gguf, popen, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    process = LocalLauncher().start(_launch(tiny_gguf, gpu=None))
    process.data.close()
    (started,) = popen
    assert started.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert started.env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_the_local_backend_never_imports_ray():
    # Ray is an optional extra: everything a local pool runs must work without it.
    code = (
        "import sys, llamapool.cli, llamapool.router.app, llamapool.pool.broker, "
        "llamapool.pool.worker; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
