"""Many concurrent streams over several instances, with real llama.cpp and a real model."""

from __future__ import annotations

import asyncio

import openai
from serverutil import SMOLLM2_EOG, model_entry


async def _stream_chat(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[str, int, str]:
    raw = await client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Tell me fact number {i} about the sea."},
        ],
        max_tokens=max_tokens,
        temperature=0.7,
        seed=i,
        logit_bias=SMOLLM2_EOG,
        stream=True,
        stream_options={"include_usage": True},
    )
    worker = raw.headers["x-llamapool-worker"]
    text, usage, finish = [], None, None
    async for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "length"
    return worker, usage, "".join(text)


def test_16_concurrent_streams_on_two_instances(serve, smollm2_gguf):
    server = serve([model_entry("smollm2", smollm2_gguf, min_instances=2)])
    pids = {p.pid for p in server.workers()}
    assert len(pids) == 2

    async def run() -> list[tuple[str, int, str]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(_stream_chat(client, i, 48) for i in range(16)))

    results = asyncio.run(run())
    assert [usage for _, usage, _ in results] == [48] * 16
    assert all(text for _, _, text in results)
    served_by = {int(worker.split("pid=")[1]) for worker, _, _ in results}
    assert served_by == pids, "both instances must have served work"
    log = server.log_text()
    assert "inconsistent sequence positions" not in log
    assert "DEAD" not in log


def test_one_batching_instance_serves_its_streams_together(serve, smollm2_gguf):
    server = serve(
        [model_entry("smollm2", smollm2_gguf, min_instances=1, config={"n_parallel": 4})]
    )
    (worker,) = server.pool()["workers"]
    assert worker["capacity"] == 4

    async def timed(client: openai.AsyncOpenAI, i: int) -> tuple[float, float, int]:
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
            max_tokens=64,
            seed=i,
            logit_bias=SMOLLM2_EOG,
            stream=True,
            stream_options={"include_usage": True},
        )
        first, usage = None, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = asyncio.get_running_loop().time()
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return first, asyncio.get_running_loop().time(), usage

    async def run() -> list[tuple[float, float, int]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(timed(client, i) for i in range(8)))

    results = asyncio.run(run())
    assert [usage for _, _, usage in results] == [64] * 8
    # Four slots: four streams were producing before the first of them finished.
    first_end = min(end for _, end, _ in results)
    assert sum(1 for first, _, _ in results if first < first_end) >= 4
    assert "DEAD" not in server.log_text()
