"""Start a real `llamapool serve` on a free port for a test, and make sure it all goes away."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

# Every process a test server starts inherits this variable, so a test can find
# leftovers even after they were re-parented away from the test process.
TAG_ENV = "LLAMAPOOL_TEST_TAG"
ADMIN_TOKEN = "test-admin-token"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>, <reponame>): with these
# biased away, a request generates exactly max_tokens.
SMOLLM2_EOG = {"0": -100, "2": -100, "4": -100}


def chat_body(model: str = "m", content: str = "hi", max_tokens: int = 4, **extra: Any) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }


def chat(url: str, model: str = "m", max_tokens: int = 4, content: str = "hi", **extra: Any):
    """POST a non-streamed chat completion; `headers=` goes to httpx, the rest to the body."""
    headers = extra.pop("headers", None)
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=chat_body(model, content, max_tokens, **extra),
        headers=headers,
        timeout=120,
    )


def is_content_line(line: str) -> bool:
    """An SSE line carrying generated text (not the role chunk's empty content)."""
    return '"content":"' in line and '"content":""' not in line


def skip_to_first_token(lines) -> None:
    """Consume SSE lines up to and including the first one with generated text."""
    for line in lines:
        if is_content_line(line):
            return
    raise AssertionError("the stream ended before any token")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes (not zombies) that carry the test tag in their environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def model_entry(model_id: str, path: Path | str, **overrides: Any) -> dict[str, Any]:
    """A models.yaml entry; keys in `config` go under `config:`, the rest beside it."""
    config = {"model_path": str(path), "n_ctx": 2048, "n_threads": 1}
    config.update(overrides.pop("config", {}))
    entry: dict[str, Any] = {"id": model_id, "provider": "gguf", "config": config}
    entry.update(overrides)
    return entry


@dataclass
class Server:
    """A running `llamapool serve` subprocess."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    tag: str
    seen_workers: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[psutil.Process]:
        """The worker processes currently alive under this server."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        self.seen_workers.update(c.pid for c in alive)
        return alive

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until GET /ready answers 200; fail with the log if the server dies."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                last = r.json()
                if r.status_code == 200:
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout} s ({last}):\n{self.log_text()}")

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.url}{path}", headers=ADMIN_HEADERS, timeout=60, **kwargs
        )

    def pool(self) -> dict[str, Any]:
        """GET /admin/pool."""
        return self.admin("GET", "/admin/pool").json()

    def model_ready(self, model: str) -> dict[str, Any]:
        """This model's entry in GET /ready (state, instances, queue depth...)."""
        return httpx.get(f"{self.url}/ready", timeout=10).json()["models"][model]

    def wait_for(
        self, predicate, timeout: float = 30.0, what: str = "condition", every: float = 0.05
    ) -> Any:
        """Poll `predicate` each `every` seconds until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
            except httpx.TransportError:  # not listening yet
                value = None
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the router, then make sure every worker it ever had is gone."""
        self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    tmp_path: Path,
    models: list[dict[str, Any]],
    *,
    pool: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    tag: str,
    wait_ready: bool = True,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Write a models.yaml and start `python -m llamapool serve` on it."""
    config: dict[str, Any] = {"models": models}
    if pool:
        config["pool"] = pool
    if extra:
        config.update(extra)
    config_path = tmp_path / f"models-{len(list(tmp_path.glob('models-*.yaml')))}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    env = {**os.environ, **(env or {})}
    env[TAG_ENV] = tag
    env.setdefault("LLAMAPOOL_ADMIN_TOKEN", ADMIN_TOKEN)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamapool",
                "serve",
                "--config",
                str(config_path),
                "--port",
                str(port),
                "--log-level",
                "info",
                *(args or []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    server = Server(proc=proc, port=port, log_path=log_path, tag=tag)
    if wait_ready:
        try:
            server.ready()
        except BaseException:
            server.stop()
            raise
    return server
