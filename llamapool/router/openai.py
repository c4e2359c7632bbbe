"""OpenAI-compatible endpoints: chat and text completions (streamed or not), embeddings, models."""

from __future__ import annotations

import asyncio
import base64
import functools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llamapool import errors
from llamapool.config import ModelSpec
from llamapool.ipc import protocol as P
from llamapool.pool.broker import Broker
from llamapool.pool.job import JobState
from llamapool.pool.prepare import chats_through_handler
from llamapool.pool.scheduler import Job
from llamapool.router import structured, tools
from llamapool.router.render import Shape, merged_usage, sse
from llamapool.router.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    message_dicts,
    parse_body,
)

MAX_BODY_BYTES = 1 << 20
# Which worker served a response: for debugging, and for tests that check spreading.
WORKER_HEADER = "x-llamapool-worker"
_json = msgspec.json.Encoder()


def broker_of(request: Request) -> Broker:
    return request.app.state.broker


def error_response(exc: errors.LlamapoolError) -> JSONResponse:
    response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
    response.error_code = exc.code  # type: ignore[attr-defined]  # for the request counter
    return response


def _counted(handler: Callable[[Request], Awaitable[Response]]) -> Callable:
    """Count every response of an endpoint by model and status in the metrics."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        metrics = getattr(request.app.state, "metrics", None)
        try:
            response = await handler(request)
        except errors.LlamapoolError as exc:
            if metrics is not None:
                metrics.request_finished(_model_label(request), exc.status, exc.code)
            raise
        except ClientDisconnect:  # the client left mid-body: nobody to answer, no bug
            raise
        except Exception:  # a bug: app's handler logs it and answers 500
            if metrics is not None:
                metrics.request_finished(_model_label(request), 500, errors.LlamapoolError.code)
            raise
        if metrics is not None:
            code = getattr(response, "error_code", None)
            metrics.request_finished(_model_label(request), response.status_code, code)
        return response

    return wrapper


def _checked_model(request: Request, model: str) -> ModelSpec:
    spec = broker_of(request).check_model(model)
    request.state.model = model
    return spec


def _model_label(request: Request) -> str:
    # Only configured ids become label values, so clients cannot grow the label set.
    return getattr(request.state, "model", "") or "unknown"


async def read_body(request: Request) -> bytes:
    """The request body, refusing more than the configured limit with a 413."""
    limit = getattr(request.app.state, "max_body_bytes", MAX_BODY_BYTES)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.RequestTooLarge(
            f"request body is {int(declared)} bytes; the limit is {limit} bytes"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# Put in a job's event queue when the client hangs up before its answer is complete.
CLIENT_GONE = object()
# nginx's "client closed request": nobody reads it, but the request counter does.
CLIENT_CLOSED = 499


async def _release_on_disconnect(request: Request, broker: Broker, jobs: list[Job]) -> None:
    """Watch the connection; when the client leaves, drop or cancel its jobs at once."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                broker.release(job)
                job.events.put_nowait(CLIENT_GONE)
            return


async def _until_final(
    job: Job, event: Any, logprobs: list[P.TokenLogprob] | None = None
) -> tuple[list[str], Any]:
    """The texts of `event` and the chunks after it, and the event that ended them; their
    logprob entries are added to `logprobs`."""
    parts: list[str] = []
    while isinstance(event, P.Chunk):
        parts.append(event.text)
        if logprobs is not None and event.logprobs:
            logprobs.extend(event.logprobs)
        event = await job.events.get()
    return parts, event


def _unfinished(event: Any) -> Response | None:
    """The response for a job that ended without DONE (client gone, or an error)."""
    if event is CLIENT_GONE:
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(event, errors.LlamapoolError):
        return error_response(event)
    return None


class _EventStream(Response):
    """A text/event-stream response written straight to ASGI `send`.

    Starlette's StreamingResponse starts a task group per response to watch for the
    disconnect; here the job's own watcher, started before the first token, keeps doing
    that (it queues CLIENT_GONE, which ends `events`). Closing releases the job.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: dict[str, str],
        close: Callable[[], None],
    ):
        self.status_code = 200
        self.background = None
        self.events = events
        self.close = close
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.close()


def _still_queued(job: Job) -> bool:
    """The job waits for a worker and nothing has happened to it yet."""
    return job.state is JobState.QUEUED and job.events.empty()


def _submit_all(broker: Broker, model: str, requests: list[P.Request], stream: bool) -> list[Job]:
    """Queue every choice's request; if one is refused (a full queue), none stays queued.

    Only the first choice has a queue_timeout: the others may wait for it and each other
    (more choices than slots), and while none runs, the first one's expiry ends them all.
    """
    jobs: list[Job] = []
    try:
        for req in requests:
            jobs.append(broker.submit(model, req, stream=stream, expires=not jobs))
    except errors.LlamapoolError:
        for job in jobs:
            broker.release(job)
        raise
    return jobs


async def _respond(
    request: Request,
    broker: Broker,
    jobs: list[Job],
    shape: Shape,
    *,
    stream: bool,
    include_usage: bool,
    plan: tools.ToolPlan | None = None,
    n: int = 1,
) -> Response:
    """The response to the jobs of a request's choices (one, or prompts × `n` in order).

    The first event of every choice on a worker comes before the response starts, so a
    refusal of any of them (a bad prompt, a full context) is a plain HTTP error. A stream
    does not wait for choices still queued behind the others (they may wait for whole
    choices to end): their events, a refusal too, come in the stream.
    """
    watcher = asyncio.create_task(_release_on_disconnect(request, broker, jobs))

    def close() -> None:
        watcher.cancel()
        for job in jobs:
            broker.release(job)

    streaming = False
    try:
        firsts = [
            None if stream and i and _still_queued(job) else await job.events.get()
            for i, job in enumerate(jobs)
        ]
        for first in firsts:
            if first is CLIENT_GONE:
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(first, errors.LlamapoolError):
                return error_response(first)
        headers = {WORKER_HEADER: jobs[0].served_by or ""}
        if stream:
            if len(jobs) == 1:
                events = _stream(jobs[0], shape, firsts[0], include_usage, plan)
            else:
                events = _stream_many(jobs, shape, firsts, include_usage, plan, n)
            response = _EventStream(
                events,
                {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
                close,
            )
            streaming = True  # from here the response closes the jobs when it ends
            return response
        choices, usages = [], []
        for index, (job, first) in enumerate(zip(jobs, firsts, strict=True)):
            logprobs: list[P.TokenLogprob] = []
            parts, event = await _until_final(job, first, logprobs)
            if (unfinished := _unfinished(event)) is not None:
                return unfinished
            text = "".join(parts)
            calls = tools.parse_calls(text, plan) if plan is not None else None
            if len(jobs) == 1:
                body = shape.whole(text, event, calls, logprobs)
                return Response(_json.encode(body), media_type="application/json", headers=headers)
            choices.append(shape.choice(text, event, calls, index=index, logprobs=logprobs))
            usages.append(event.usage)
        body = shape.whole_many(choices, merged_usage(usages, n))
        return Response(_json.encode(body), media_type="application/json", headers=headers)
    finally:
        if not streaming:
            close()


async def _stream(
    job: Job, shape: Shape, first: Any, include_usage: bool, plan: tools.ToolPlan | None
) -> AsyncIterator[bytes]:
    """The SSE bytes of a job's events; whatever is already queued goes out in one write."""
    reader = tools.CallReader(plan) if plan is not None else None
    # The role delta rides with the first token: one write, one packet, one client wake-up.
    data = shape.delta(None, role=True) if shape.kind == "chat" else b""
    event = first
    while True:
        if isinstance(event, P.Chunk):
            data += _chunk_delta(shape, reader, event)
        elif event is CLIENT_GONE:
            return
        elif isinstance(event, P.Done):
            data += _done_delta(shape, reader, event, timings=True)
            if include_usage:
                data += shape.usage_chunk(event.usage)
            yield data + b"data: [DONE]\n\n"
            return
        else:
            # Output already went out, so the status is 200: the error travels in-band.
            yield data + sse(event.body()) + b"data: [DONE]\n\n"
            return
        if job.events.empty():
            if data:
                yield data
                data = b""
            event = await job.events.get()
        else:
            event = job.events.get_nowait()


def _chunk_delta(
    shape: Shape, reader: tools.CallReader | None, event: P.Chunk, index: int = 0
) -> bytes:
    """A choice's CHUNK as a delta (nothing while a tool call may be forming)."""
    text = event.text if reader is None else reader.feed(event.text)
    if text or event.logprobs:
        return shape.delta(text, index=index, logprobs=event.logprobs)
    return b""


def _done_delta(
    shape: Shape,
    reader: tools.CallReader | None,
    event: P.Done,
    *,
    index: int = 0,
    timings: bool = False,
) -> bytes:
    """A choice's last deltas: its tool calls or held text, then its finish_reason."""
    data, finish = b"", event.finish_reason
    if reader is not None:
        calls, held = reader.finish()
        if calls:
            data += shape.tool_calls_delta(calls, index=index)
            finish = "tool_calls"
        elif held:
            data += shape.delta(held, index=index)
    end = None if shape.kind == "chat" else ""
    return data + shape.delta(end, finish=finish, index=index, done=event if timings else None)


async def _stream_many(
    jobs: list[Job],
    shape: Shape,
    firsts: list[Any],
    include_usage: bool,
    plan: tools.ToolPlan | None,
    n: int,
) -> AsyncIterator[bytes]:
    """The SSE bytes of several choices' jobs, each chunk marked with its choice's index, as
    they come; usage (summed) and `[DONE]` once every choice has finished."""
    merged: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        while True:
            event = await job.events.get()
            merged.put_nowait((index, event))
            if not isinstance(event, P.Chunk):
                return

    pumps = []
    for index, (job, first) in enumerate(zip(jobs, firsts, strict=True)):
        if first is not None:  # None: still queued, all its events come through its pump
            merged.put_nowait((index, first))
        if first is None or isinstance(first, P.Chunk):
            pumps.append(asyncio.create_task(pump(index, job)))
    readers = [tools.CallReader(plan) if plan is not None else None for _ in jobs]
    started = [False] * len(jobs)
    usages: list[P.Usage | None] = [None] * len(jobs)
    try:
        while True:
            index, event = await merged.get()
            data = b""
            if shape.kind == "chat" and not started[index]:
                data += shape.delta(None, role=True, index=index)
            started[index] = True
            reader = readers[index]
            if isinstance(event, P.Chunk):
                data += _chunk_delta(shape, reader, event, index)
            elif event is CLIENT_GONE:
                return
            elif isinstance(event, P.Done):
                data += _done_delta(shape, reader, event, index=index)
                usages[index] = event.usage
                if all(u is not None for u in usages):
                    if include_usage:
                        data += shape.usage_chunk(merged_usage(usages, n))  # type: ignore[arg-type]
                    yield data + b"data: [DONE]\n\n"
                    return
            else:
                yield data + sse(event.body()) + b"data: [DONE]\n\n"
                return
            if data:
                yield data
    finally:
        for task in pumps:
            task.cancel()


def _check_scoring(spec: ModelSpec, param: str) -> None:
    """Refuse logprobs and echo for models the one-at-a-time engine serves."""
    cfg = spec.config
    if cfg.embedding or chats_through_handler(cfg):
        raise errors.InvalidRequest(
            f"model {spec.id!r} cannot return `{param}` (it runs through llama-cpp-python's "
            "own generation, as embedding and multimodal models do)",
            param=param,
        )


def _check_choices(request: Request, spec: ModelSpec, n_prompts: int, n: int) -> None:
    """Refuse more choices (prompts × n) than `server.max_choices`, or than the model's
    slots and queue could ever hold at once (a 503 queue_full would invite a retry that
    cannot succeed), naming the field."""
    limit = getattr(request.app.state, "max_choices", 64)
    why = f"the limit is {limit} (server.max_choices)"
    room = spec.max_queue + spec.instance_limit * spec.config.n_parallel
    if room < limit:
        limit = room
        why = (
            f"model {spec.id!r} holds at most {room} at once ({spec.instance_limit} "
            f"instance(s) × n_parallel {spec.config.n_parallel}, and max_queue {spec.max_queue})"
        )
    if n_prompts * n <= limit:
        return
    param = "prompt" if n_prompts > limit or n == 1 else "n"
    raise errors.InvalidRequest(
        f"the request asks for {n_prompts} prompt(s) × n={n} = {n_prompts * n} choices; {why}",
        param=param,
    )


async def chat_completions(request: Request) -> Response:
    broker = broker_of(request)
    body = parse_body(await read_body(request), ChatCompletionRequest)
    spec = _checked_model(request, body.model)
    messages = message_dicts(body.messages, images=spec.config.mmproj_path is not None)
    params = body.sampling(body.max_completion_tokens or body.max_tokens)
    params.grammar = structured.response_grammar(body.response_format)
    if params.grammar is not None:
        structured.check_constrainable(spec, "response_format")
    plan = tools.plan(body)
    req = P.Request(
        request_id="", kind="chat", messages=messages, params=params, logprobs=body.scores
    )
    if plan is not None:
        if params.grammar is not None:
            raise errors.InvalidRequest(
                "`response_format` cannot be combined with `tools` (unless `tool_choice` is "
                "`none`)",
                param="response_format",
            )
        if plan.grammar is not None:
            structured.check_constrainable(spec, "tool_choice")
        params.grammar = plan.grammar
        req.tools, req.tool_prompt = plan.tools, plan.instructions
    if body.scores is not None:
        _check_scoring(spec, "logprobs")
    n = body.n or 1
    _check_choices(request, spec, 1, n)
    requests = [req]
    for j in range(1, n):
        copy = msgspec.structs.replace(req, params=msgspec.structs.replace(params))
        copy.params.seed = body.sampling(sample=j, model_seed=spec.config.seed).seed
        requests.append(copy)
    jobs = _submit_all(broker, body.model, requests, bool(body.stream))
    shape = Shape("chat", body.model, logprobs=body.scores is not None)
    return await _respond(
        request,
        broker,
        jobs,
        shape,
        stream=bool(body.stream),
        include_usage=body.include_usage,
        plan=plan,
        n=n,
    )


async def completions(request: Request) -> Response:
    broker = broker_of(request)
    body = parse_body(await read_body(request), CompletionRequest)
    spec = _checked_model(request, body.model)
    if body.logprobs is not None or body.echo:
        _check_scoring(spec, "logprobs" if body.logprobs is not None else "echo")
    prompts, n = body.prompts, body.n or 1
    _check_choices(request, spec, len(prompts), n)
    requests = [
        P.Request(
            request_id="",
            kind="completion",
            prompt=prompt,
            params=body.sampling(sample=j, model_seed=spec.config.seed),
            logprobs=body.logprobs,
            echo=bool(body.echo),
        )
        for prompt in prompts
        for j in range(n)
    ]
    jobs = _submit_all(broker, body.model, requests, bool(body.stream))
    shape = Shape("completion", body.model, logprobs=body.logprobs is not None)
    return await _respond(
        request,
        broker,
        jobs,
        shape,
        stream=bool(body.stream),
        include_usage=body.include_usage,
        n=n,
    )


def _encode_vector(vector: list[float], fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def embeddings(request: Request) -> Response:
    broker = broker_of(request)
    body = parse_body(await read_body(request), EmbeddingRequest)
    spec = _checked_model(request, body.model)
    if not spec.config.embedding:
        raise errors.InvalidRequest(
            f"model {body.model!r} does not serve embeddings (set `embedding: true` in its config)",
            param="model",
        )
    job = broker.submit(
        body.model, P.Request(request_id="", kind="embedding", inputs=body.inputs), stream=False
    )
    watcher = asyncio.create_task(_release_on_disconnect(request, broker, [job]))
    try:
        _, event = await _until_final(job, await job.events.get())
    finally:
        watcher.cancel()
        broker.release(job)
    if (unfinished := _unfinished(event)) is not None:
        return unfinished
    vectors = event.embeddings or []
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    payload = {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {
            "prompt_tokens": event.usage.prompt_tokens,
            "total_tokens": event.usage.prompt_tokens,
        },
    }
    return Response(_json.encode(payload), media_type="application/json")


def _model_object(model_id: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "llamapool",
        "status": info["state"].lower(),
    }


async def list_models(request: Request) -> Response:
    _, detail = broker_of(request).ready()
    data = [_model_object(model_id, info) for model_id, info in detail.items()]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    broker = broker_of(request)
    model_id = request.path_params["model"]
    _, detail = broker.ready()
    if model_id not in detail:
        broker.check_model(model_id)  # raises the 404 that names the models there are
    return JSONResponse(_model_object(model_id, detail[model_id]))


routes = [
    Route("/v1/chat/completions", _counted(chat_completions), methods=["POST"]),
    Route("/v1/completions", _counted(completions), methods=["POST"]),
    Route("/v1/embeddings", _counted(embeddings), methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
