"""Starlette application factory; its lifespan owns the pool (broker + supervisor)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import IO

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llamapool import errors
from llamapool.config import Config
from llamapool.pool.broker import Broker
from llamapool.router import admin, openai
from llamapool.router.auth import BearerAuth
from llamapool.router.metrics import Metrics, metrics_route

log = logging.getLogger("llamapool.router")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    ok, detail = request.app.state.broker.ready()
    return JSONResponse(
        {"status": "ready" if ok else "not_ready", "models": detail},
        status_code=200 if ok else 503,
    )


async def _llamapool_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.LlamapoolError)
    return openai.error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        err: errors.LlamapoolError = errors.NotFound(
            f"no route for {request.method} {request.url.path}"
        )
    elif exc.status_code == 405:
        err = errors.MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        err = errors.InvalidRequest(str(exc.detail))
        err.status = exc.status_code
    return openai.error_response(err)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Log the traceback here; the client gets a clean message, never a stack trace.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return openai.error_response(
        errors.LlamapoolError(f"internal error: {type(exc).__name__}; see the server log")
    )


def reload_logged(broker: Broker) -> None:
    """Reload the config for SIGHUP; a rejected file is logged, changes nothing, and the
    server keeps serving."""
    try:
        broker.reload()  # logs what it changed
    except errors.LlamapoolError as exc:
        log.error("SIGHUP: %s", exc.message)
    except Exception:
        log.exception("SIGHUP: reload failed; nothing changed")


def _reload_on_sighup(loop: asyncio.AbstractEventLoop, broker: Broker) -> bool:
    """SIGHUP → reload, as nginx, gunicorn and Prometheus do; False where no handler can be
    installed (a loop outside the main thread, as under a test client)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    # The handler only schedules the reload; the loop runs it like any other callback.
    loop.add_signal_handler(signal.SIGHUP, loop.call_soon, reload_logged, broker)
    return True


def _sighup_while_stopping() -> None:
    log.warning("SIGHUP ignored: the server is shutting down")


def create_app(
    config: Config,
    *,
    admin_token: str,
    log_level: str = "INFO",
    worker_log: IO | None = None,
) -> BearerAuth:
    """The router app behind bearer auth; the pool starts and stops with its lifespan."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        broker = Broker(config, log_level=log_level, worker_log=worker_log, observer=metrics)
        app.state.broker = broker
        metrics.set_pool_source(broker.metrics_snapshot)
        metrics.set_gpu_source(broker.gpu_snapshot)
        await broker.start()
        loop = asyncio.get_running_loop()
        on_sighup = _reload_on_sighup(loop, broker)
        try:
            yield
        finally:
            if on_sighup:
                # Not the default action while the pool drains: a reload racing a stop
                # (`systemctl reload` during a restart) would kill the router mid-drain.
                loop.add_signal_handler(signal.SIGHUP, _sighup_while_stopping)
            await broker.stop()
            if on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        metrics_route(metrics),
        *openai.routes,
        *admin.routes,
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            errors.LlamapoolError: _llamapool_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.metrics = metrics
    app.state.max_body_bytes = config.server.max_body_bytes
    app.state.max_choices = config.server.max_choices

    def api_keys() -> Sequence[str] | None:
        # The running config's: a reload swaps the broker's config, keys included.
        broker = getattr(app.state, "broker", None)
        return (broker.config if broker is not None else config).api_keys

    return BearerAuth(app, admin_token=admin_token, api_keys=api_keys)
