"""Starlette application factory; its lifespan owns the pool (broker + supervisor)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
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
        await broker.start()
        try:
            yield
        finally:
            await broker.stop()

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
    auth = BearerAuth(app, admin_token=admin_token, api_keys=config.api_keys)
    app.state.auth = auth  # reload updates its API keys
    return auth
