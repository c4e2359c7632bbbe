"""The seed's design as a baseline: one process, one `Llama`, a lock around every request.

Run: python -m benchmarks.baselines.mutex_server --model PATH --port P --n-ctx N --n-threads T

Each request waits for the lock, calls `reset()` (the seed's fix for the shared KV cache),
then generates on a plain thread that hands chunks to the event loop. A thread per request,
not Starlette's threadpool: with more waiters than pool threads, the holder of the lock
could not get a thread to continue and the server would deadlock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from benchmarks.generation import ChatParams, TokenCounter, stream_chat

_END = object()


def _error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class MutexModel:
    """One `Llama` behind one `threading.Lock`."""

    def __init__(self, llm: Any, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name
        self.lock = threading.Lock()

    def generate(self, params: ChatParams, emit: Any, cancelled: threading.Event) -> None:
        """Run one request under the lock, passing ("chunk"|"error"|"usage", obj) to `emit`."""
        with self.lock:
            if cancelled.is_set():
                return
            self.llm.reset()
            counter = TokenCounter(params.logit_bias)
            finish_reason = None
            try:
                for chunk in stream_chat(self.llm, params, counter):
                    if cancelled.is_set():
                        return
                    finish_reason = chunk["choices"][0].get("finish_reason") or finish_reason
                    emit("chunk", chunk)
            except Exception as exc:  # llama.cpp errors (context overflow, ...) go to the client
                emit("error", str(exc))
                return
            emit("usage", counter.usage(finish_reason))


def create_app(model: MutexModel) -> Starlette:
    """The OpenAI-compatible app around `model`."""

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
            params = ChatParams.from_body(body)
        except (ValueError, TypeError, AttributeError) as exc:
            message = f"invalid request: {exc}"
            return _error(400, message, "invalid_request_error", "invalid_request")
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        name = body.get("model") or model.model_name

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(kind: str, obj: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, obj))
            except RuntimeError:  # the loop is gone: the server is shutting down
                cancelled.set()

        def work() -> None:
            try:
                model.generate(params, emit, cancelled)
            finally:
                emit("end", _END)

        threading.Thread(target=work, daemon=True).start()

        if not stream:
            return await _collect(queue, cancelled, name)
        return StreamingResponse(
            _events(queue, cancelled, name, include_usage), media_type="text/event-stream"
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        entry = {"id": model.model_name, "object": "model", "owned_by": "mutex-baseline"}
        return JSONResponse({"object": "list", "data": [entry]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/ready", health),
        ]
    )


async def _events(
    queue: asyncio.Queue[tuple[str, Any]],
    cancelled: threading.Event,
    name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    try:
        while True:
            kind, obj = await queue.get()
            if kind == "chunk":
                obj["id"], obj["model"] = chunk_id, name
                yield _sse(obj)
            elif kind == "error":
                error = {"message": obj, "type": "server_error", "code": "internal_error"}
                yield _sse({"error": error})
            elif kind == "usage" and include_usage:
                usage_chunk = {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": obj,
                }
                yield _sse(usage_chunk)
            elif kind == "end":
                yield "data: [DONE]\n\n"
                return
    finally:
        # Client gone (or done): stop the generating thread at its next token.
        cancelled.set()


async def _collect(
    queue: asyncio.Queue[tuple[str, Any]], cancelled: threading.Event, name: str
) -> Response:
    text: list[str] = []
    finish_reason = None
    usage = None
    try:
        while True:
            kind, obj = await queue.get()
            if kind == "chunk":
                choice = obj["choices"][0]
                text.append(choice.get("delta", {}).get("content") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
            elif kind == "error":
                return _error(500, obj, "server_error", "internal_error")
            elif kind == "usage":
                usage = obj
            elif kind == "end":
                break
    finally:
        cancelled.set()
    message = {"role": "assistant", "content": "".join(text)}
    return JSONResponse(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage,
        }
    )


def _exit_with_parent() -> None:
    """Exit when the process that started us is gone: a killed harness leaves no server."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Load the model, then serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines.mutex_server")
    parser.add_argument("--model", required=True, help="path to a GGUF file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-threads", type=int, default=None)
    parser.add_argument("--model-name", default="bench")
    args = parser.parse_args(argv)

    import llama_cpp
    import uvicorn

    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_threads_batch=args.n_threads,
        verbose=False,
    )
    app = create_app(MutexModel(llm, args.model_name))
    _exit_with_parent()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
