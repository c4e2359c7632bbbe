"""The broker in this process, with a real worker on the tiny model."""

from __future__ import annotations

import asyncio
import time

from llamapool import errors
from llamapool.config import Config, parse_config
from llamapool.ipc import protocol as P
from llamapool.pool.broker import Broker


async def _ready(broker: Broker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not broker.ready()[0]:
        assert time.monotonic() < deadline, broker.ready()
        await asyncio.sleep(0.05)


# The tiny model's end-of-generation tokens (</s>, <|im_end|>): biased away, a request
# generates exactly max_tokens.
_NO_EOG = {2: -100.0, 4: -100.0}


def _config(tiny_gguf, **pool) -> Config:
    return parse_config(
        {
            "pool": pool,
            "models": [{"id": "m", "config": {"model_path": str(tiny_gguf), "n_ctx": 256}}],
        }
    )


def _request(max_tokens: int = 2, seed: int = 7) -> P.Request:
    params = P.SamplingParams(max_tokens=max_tokens, seed=seed, logit_bias=_NO_EOG)
    return P.Request(request_id="", kind="completion", prompt="x", params=params)


async def _final(job) -> object:
    while True:
        event = await asyncio.wait_for(job.events.get(), 30)
        if not isinstance(event, P.Chunk):
            return event


def test_a_request_that_cannot_be_sent_fails_alone(tiny_gguf):
    # The HTTP schemas bound every integer, so this takes a request built past them: one
    # that cannot be encoded for the worker used to stay booked to it, a slot lost for good.
    config = parse_config(
        {"models": [{"id": "m", "config": {"model_path": str(tiny_gguf), "n_ctx": 256}}]}
    )

    def request(seed: int) -> P.Request:
        params = P.SamplingParams(max_tokens=2, seed=seed)
        return P.Request(request_id="", kind="completion", prompt="x", params=params)

    async def scenario() -> None:
        broker = Broker(config)
        await broker.start()
        try:
            await _ready(broker)
            bad = await _final(broker.submit("m", request(2**70)))
            assert isinstance(bad, errors.LlamapoolError)
            assert "could not be sent" in bad.message
            (worker,) = broker.supervisor.live_workers()
            assert not worker.in_flight and not broker.scheduler.running
            good = await _final(broker.submit("m", request(7)))
            assert isinstance(good, P.Done) and good.usage.completion_tokens == 2
        finally:
            await broker.stop(grace=5)

    asyncio.run(scenario())


def test_a_refusal_past_max_requeues_is_a_retryable_503(tiny_gguf):
    # A worker refuses a request (`worker_busy`) when it is draining or full. With no
    # requeue left, the client used to get 500 generation_failed for the pool's own churn.
    async def scenario() -> None:
        broker = Broker(_config(tiny_gguf, max_requeues=0))
        await broker.start()
        try:
            await _ready(broker)
            (worker,) = broker.supervisor.live_workers()
            # The router believes in a second slot the worker lacks: the worker refuses the
            # second request as it would while draining, deterministically.
            worker.capacity = 2
            running = broker.submit("m", _request(max_tokens=200))
            refused = await _final(broker.submit("m", _request()))
            assert isinstance(refused, errors.LlamapoolError), refused
            assert (refused.status, refused.code) == (503, "worker_busy")
            assert "Retry-After" in refused.headers()
            assert "retry" in refused.message
            broker.release(running)
        finally:
            await broker.stop(grace=5)

    asyncio.run(scenario())
