"""/admin: inspect the pool, scale models, load/unload, restart workers, reload the config.

Bearer-token protected by `BearerAuth`; every route calls one broker operation, the
same functions the CLI wrappers reach over HTTP.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llamapool import errors
from llamapool.pool.broker import Broker
from llamapool.router.openai import read_body
from llamapool.router.schemas import parse_body

_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class ScaleRequest(msgspec.Struct, forbid_unknown_fields=True):
    instances: Annotated[int, msgspec.Meta(ge=0)]


def _broker(request: Request) -> Broker:
    return request.app.state.broker


async def pool(request: Request) -> Response:
    return JSONResponse(_broker(request).status())


async def scale(request: Request) -> Response:
    body = parse_body(await read_body(request), ScaleRequest)
    return JSONResponse(_broker(request).scale(request.path_params["model"], body.instances))


async def load(request: Request) -> Response:
    return JSONResponse(_broker(request).load(request.path_params["model"]))


async def unload(request: Request) -> Response:
    value = request.query_params.get("force", "false").lower()
    if value not in _BOOLEANS:
        raise errors.InvalidRequest(
            f"force must be true or false, not {value[:20]!r}", param="force"
        )
    force = _BOOLEANS[value]
    return JSONResponse(await _broker(request).unload(request.path_params["model"], force=force))


async def restart_worker(request: Request) -> Response:
    return JSONResponse(_broker(request).restart_worker(request.path_params["worker"]))


async def reload(request: Request) -> Response:
    # The one reload (models and API keys), as SIGHUP and `llamapool reload` do.
    return JSONResponse(_broker(request).reload())


routes = [
    Route("/admin/pool", pool, methods=["GET"]),
    Route("/admin/models/{model:path}/scale", scale, methods=["POST"]),
    Route("/admin/models/{model:path}/load", load, methods=["POST"]),
    Route("/admin/models/{model:path}/unload", unload, methods=["POST"]),
    Route("/admin/workers/{worker:path}/restart", restart_worker, methods=["POST"]),
    Route("/admin/reload", reload, methods=["POST"]),
]
