"""The HTTP floor: a Starlette app on uvicorn that answers a streamed chat at once.

Its time to first token, seen by the benchmark's own client, is what the HTTP stack alone
(client, uvicorn, Starlette, SSE) costs on this machine; the pool's routing overhead
above it is what llamapool itself adds.
"""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

_CHUNK = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
_FINISH = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}


async def chat(request: Request) -> Response:
    json.loads(await request.body())  # parse it, as any server must

    async def events():
        for payload in (_CHUNK, _FINISH):
            yield f"data: {json.dumps(payload)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def ready(request: Request) -> Response:
    return Response("ok")


app = Starlette(
    routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/ready", ready, methods=["GET"]),
    ]
)
