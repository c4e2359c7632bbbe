"""The four targets (mutex, pool, direct, url) behind one interface: run a batch of requests.

`open_target` starts what the target needs (a server subprocess or an in-process model),
hands back something with `run_level`, and always tears it down.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from benchmarks import queue_wait
from benchmarks.client import ChatRequest, RequestResult, send_chat
from benchmarks.direct import DirectModel
from benchmarks.servers import (
    POOL_MODEL_ID,
    ServerProcess,
    free_port,
    loopback_base_url,
    mutex_command,
    pool_command,
    write_pool_config,
)
from benchmarks.stats import distribution

TARGET_NAMES = ("mutex", "pool", "direct", "url")
OnResult = Callable[[RequestResult], None]


@dataclass(frozen=True)
class TargetSettings:
    """What a target needs to start: the model, thread counts and the pool's queue limits."""

    model_path: pathlib.Path
    n_ctx: int
    instances: int
    threads_per_instance: int
    parallel: int
    mutex_threads: int
    direct_threads: int
    max_queue: int
    queue_timeout: float
    ready_timeout: float
    url: str | None = None
    model_name: str | None = None
    prompt_cache_bytes: str | None = None  # the pool's RAM prompt cache (None: its default)


class Target(Protocol):
    name: str

    async def run_level(
        self, requests: Sequence[ChatRequest], concurrency: int, timeout: float, on_result: OnResult
    ) -> tuple[list[RequestResult], float]:
        """Run `requests` with `concurrency` in flight; (results by index, wall seconds)."""

    async def queue_histogram(self) -> queue_wait.Histogram | None: ...

    async def healthy(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class HttpTarget:
    """An OpenAI-compatible server on loopback, started by us (`server`) or not (--url)."""

    name: str
    base_url: str
    model_name: str
    client: httpx.AsyncClient
    server: ServerProcess | None = None
    settings: dict[str, Any] | None = None

    async def run_level(
        self, requests: Sequence[ChatRequest], concurrency: int, timeout: float, on_result: OnResult
    ) -> tuple[list[RequestResult], float]:
        url = f"{self.base_url}/v1/chat/completions"
        pending = iter(requests)
        results: list[RequestResult] = []
        origin = time.perf_counter()

        async def lane() -> None:
            # Closed loop: each lane sends its next request as soon as the previous one ends.
            for request in pending:
                result = await send_chat(
                    self.client, url, request.body(self.model_name), request.index, timeout, origin
                )
                results.append(result)
                on_result(result)

        await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, len(requests))))))
        wall = time.perf_counter() - origin
        if self.server is not None:
            self.server.note_descendants()
        return sorted(results, key=lambda r: r.index), wall

    async def send(
        self, body: dict[str, Any], index: int, timeout: float, clock_origin: float
    ) -> RequestResult:
        """One streamed chat request with `body` as is, its answer's text kept."""
        url = f"{self.base_url}/v1/chat/completions"
        result = await send_chat(
            self.client, url, body, index, timeout, clock_origin, keep_content=True
        )
        if self.server is not None:
            self.server.note_descendants()
        return result

    async def queue_histogram(self) -> queue_wait.Histogram | None:
        return await queue_wait.scrape(self.client, self.base_url, self.model_name)

    async def healthy(self) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                response = await self.client.get(f"{self.base_url}{path}", timeout=10.0)
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                return True
        return False

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"url": self.base_url, "model_name": self.model_name}
        if self.server is not None:
            info.update(self.server.describe())
        info.update(self.settings or {})
        return info


@dataclass
class DirectTarget:
    """llama-cpp-python in this process: one stream at a time, whatever the concurrency."""

    model: DirectModel
    settings: dict[str, Any]
    name: str = "direct"

    async def run_level(
        self, requests: Sequence[ChatRequest], concurrency: int, timeout: float, on_result: OnResult
    ) -> tuple[list[RequestResult], float]:
        origin = time.perf_counter()

        def work() -> list[RequestResult]:
            results = []
            for request in requests:
                result = self.model.run(request, origin)
                results.append(result)
                on_result(result)
            return results

        results = await asyncio.to_thread(work)
        return results, time.perf_counter() - origin

    async def queue_histogram(self) -> queue_wait.Histogram | None:
        return None

    async def healthy(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return dict(self.settings)


def _client(connections: int, timeout: float) -> httpx.AsyncClient:
    # trust_env=False: a proxy from the environment must never see loopback benchmark traffic.
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(timeout, connect=10.0),
        trust_env=False,
    )


@asynccontextmanager
async def open_target(
    name: str,
    settings: TargetSettings,
    workdir: pathlib.Path,
    connections: int,
    request_timeout: float,
) -> AsyncIterator[Target]:
    """Start target `name`, yield it ready to serve, and stop everything it started."""
    if name == "direct":
        model = await asyncio.to_thread(
            DirectModel, settings.model_path, settings.n_ctx, settings.direct_threads
        )
        try:
            yield DirectTarget(model, {"threads": settings.direct_threads, "instances": 1})
        finally:
            model.close()
        return

    async with _client(connections, request_timeout) as client:
        if name == "url":
            if settings.url is None:
                raise ValueError("the url target needs --url")
            base_url = loopback_base_url(settings.url)
            model_name = settings.model_name or await _first_model(client, base_url)
            yield HttpTarget("url", base_url, model_name, client)
            return

        port = free_port()
        if name == "mutex":
            command = mutex_command(
                settings.model_path, port, settings.n_ctx, settings.mutex_threads
            )
            extra = {"threads": settings.mutex_threads, "instances": 1}
            model_name = settings.model_name or POOL_MODEL_ID
        elif name == "pool":
            config_path = workdir / "pool.yaml"
            write_pool_config(
                config_path,
                settings.model_path,
                settings.instances,
                settings.n_ctx,
                settings.threads_per_instance,
                settings.max_queue,
                settings.queue_timeout,
                settings.parallel,
                settings.prompt_cache_bytes,
            )
            command = pool_command(config_path, port)
            extra = {
                "threads": settings.threads_per_instance,
                "instances": settings.instances,
                "parallel": settings.parallel,
                "max_queue": settings.max_queue,
                "queue_timeout": settings.queue_timeout,
                "config_yaml": config_path.read_text(),
            }
            model_name = POOL_MODEL_ID
        else:
            raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGET_NAMES)}")

        server = ServerProcess(name, command, port, workdir / f"{name}.log")
        try:
            server.start()
            await server.wait_ready(client, settings.ready_timeout)
            yield HttpTarget(name, server.base_url, model_name, client, server, extra)
        finally:
            await asyncio.to_thread(server.stop)


async def _first_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model a server lists, for --url without --model-name."""
    try:
        response = await client.get(f"{base_url}/v1/models", timeout=10.0)
        data = response.json().get("data") or []
        if data and data[0].get("id"):
            return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return "default"


FloorRequest = Callable[[int], Awaitable[RequestResult]]


@asynccontextmanager
async def open_floor(workdir: pathlib.Path) -> AsyncIterator[FloorRequest]:
    """A server that answers a streamed chat at once (see echo_server); yields `ask(i)`."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "benchmarks.baselines.echo_server:app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    server = ServerProcess("http-floor", command, port, workdir / "http-floor.log")
    async with _client(1, 30.0) as client:
        try:
            server.start()
            await server.wait_ready(client, 30.0)
            body = ChatRequest(0, 1, 0.0, 0, {}).body("floor")
            url = f"{server.base_url}/v1/chat/completions"
            yield lambda index: send_chat(client, url, body, index, 30.0)
        finally:
            await asyncio.to_thread(server.stop)


async def http_floor(workdir: pathlib.Path, requests: int = 40) -> dict[str, Any]:
    """The benchmark client's TTFT against a server that answers at once (see echo_server)."""
    async with open_floor(workdir) as ask:
        results = [await ask(i) for i in range(requests)]
    ok = [r for r in results[5:] if r.ok]  # the first few warm the connection up
    return {"requests": len(ok), "ttft_s": distribution(r.ttft_s for r in ok)}
