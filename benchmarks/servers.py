"""The HTTP servers under test: started as subprocesses by the harness, and stopped for sure.

A server runs in its own session; stopping it is polite, then forced, each with a deadline
(SIGTERM → SIGKILL of its process group → SIGKILL of any descendant left), so a benchmark
never leaves a llama process behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
POOL_MODEL_ID = "bench"


class ServerStartError(Exception):
    """A server exited or did not become ready in time; the message carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_base_url(url: str) -> str:
    """Normalise `url` to scheme://host:port, refusing anything but a loopback address."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parsed.scheme not in ("http", "https") or not loopback:
        raise ValueError(
            f"--url must be an http(s) address on this machine (loopback), not {url!r}"
        )
    path = parsed.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def write_pool_config(
    path: pathlib.Path,
    model_path: pathlib.Path,
    instances: int,
    n_ctx: int,
    n_threads: int,
    max_queue: int,
    queue_timeout: float,
    n_parallel: int = 1,
    prompt_cache_bytes: str | None = None,
) -> None:
    """The models.yaml that `llamapool serve` runs for a benchmark: one model, N instances."""
    config = {
        "models": [
            {
                "id": POOL_MODEL_ID,
                "provider": "gguf",
                "min_instances": instances,
                "max_instances": instances,
                "max_queue": max_queue,
                "queue_timeout": queue_timeout,
                "config": {
                    "model_path": str(model_path.resolve()),
                    "n_ctx": n_ctx,
                    "n_threads": n_threads,
                    "n_parallel": n_parallel,
                    # None: the pool's default.
                    **(
                        {}
                        if prompt_cache_bytes is None
                        else {"prompt_cache_bytes": prompt_cache_bytes}
                    ),
                },
            }
        ]
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def mutex_command(model_path: pathlib.Path, port: int, n_ctx: int, n_threads: int) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.baselines.mutex_server",
        "--model", str(model_path), "--port", str(port),
        "--n-ctx", str(n_ctx), "--n-threads", str(n_threads),
    ]  # fmt: skip


def pool_command(config_path: pathlib.Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "llamapool", "serve",
        "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


@dataclass
class ServerProcess:
    """A server subprocess with its log file; `pids` collects it and every descendant seen."""

    name: str
    command: list[str]
    port: int
    log_path: pathlib.Path
    ready_path: str = "/ready"
    process: subprocess.Popen[bytes] | None = None
    pids: set[int] = field(default_factory=set)
    startup_s: float | None = None
    # psutil handles, not bare pids: a handle refuses to signal a pid reused by another process.
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        # The servers import `benchmarks` and `llamapool` from this checkout, wherever we run.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )
        self._note(self.process.pid)

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float) -> None:
        """Poll the readiness path until 200; raise ServerStartError with the log tail."""
        assert self.process is not None
        started = time.perf_counter()
        deadline = started + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.name} server exited with status {self.process.returncode} "
                    f"before it was ready\n{self.log_tail()}"
                )
            try:
                response = await client.get(f"{self.base_url}{self.ready_path}", timeout=2.0)
                if response.status_code == 200:
                    self.startup_s = time.perf_counter() - started
                    self.note_descendants()
                    return
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise ServerStartError(
                    f"{self.name} server not ready on {self.base_url}{self.ready_path} "
                    f"after {timeout:g} s\n{self.log_tail()}"
                )
            await asyncio.sleep(0.2)

    def note_descendants(self) -> None:
        """Remember the server's current descendants (workers), so stop() can check on them."""
        if self.process is None:
            return
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            self._seen.setdefault(child.pid, child)
            self.pids.add(child.pid)

    def _note(self, pid: int) -> None:
        self.pids.add(pid)
        try:
            self._seen.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, wait `grace`, SIGKILL the group, then kill any descendant still alive."""
        if self.process is None:
            return
        self.note_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                _kill_group(self.process.pid)
                self.process.wait(5.0)
        _kill_group(self.process.pid)
        # Workers may run in their own process groups: give them a moment to see their
        # parent gone and exit by themselves, then kill what is left.
        leftovers = _alive(p for pid, p in self._seen.items() if pid != self.process.pid)
        _, alive = psutil.wait_procs(leftovers, timeout=5.0)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5.0)

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "command": self.command,
            "pids": sorted(self.pids),
            "startup_s": self.startup_s,
        }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive
