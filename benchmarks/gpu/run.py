"""The GPU run: llamapool against llama-server on one GPU, and VRAM accounted against NVML.

Each server is started once (llamapool with 1 instance × n_parallel 16, 1 × 64 and
4 × 16; llama-server -np 16 and -np 64, built from the same llama.cpp sources), and
`python -m benchmarks --url` measures it: 128-token streamed chats at c = 1 (a few
requests) and c = 16, 64. While a pool runs, its /admin/pool (each worker's VRAM as NVML
reports it for the worker's process, and the model's estimate) and NVML's device reading
are recorded. Everything lands under --out: the benchmarks' own JSON files in raw/, and
gpu-run.json with the comparisons against the targets of issue #15.

    python -m benchmarks.gpu.run --model M.gguf --llama-server build/bin/llama-server --out $OUT

Configurations run in order of importance until --budget-s is spent; the rest are listed
as skipped. `--n-gpu-layers 0 --no-llama-server` with a small model runs it on a CPU box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml

from benchmarks.report import machine_info, write_json
from benchmarks.servers import REPO_ROOT, ServerProcess, free_port, pool_command

TARGETS = {
    "c16_vs_llama_server": 1.5,  # pool-np16 / llama-server-np16, aggregate tok/s at c=16
    "c1_vs_llama_server": 0.95,  # the same at c=1
    "vram_within": 0.10,  # |accounted - NVML| / NVML per worker
}


@dataclass
class Setup:
    """One server to measure: a pool (instances × n_parallel) or llama-server (-np)."""

    label: str
    kind: str  # "pool" | "llama-server"
    parallel: int
    instances: int = 1
    levels: list[int] = field(default_factory=lambda: [1, 16, 64])


SETUPS = [
    Setup("pool-np16", "pool", 16),
    Setup("llama-server-np16", "llama-server", 16),
    Setup("pool-np64", "pool", 64),
    Setup("llama-server-np64", "llama-server", 64),
    Setup("pool-4x16", "pool", 16, instances=4, levels=[64]),
]


def cpu_threads() -> int:
    """llama.cpp threads per server: half the cores, the other half left to the router,
    the workers' I/O threads and the benchmark client. With every layer on the GPU they
    have little to do, but a thread per core spinning next to them would skew both sides."""
    return max(1, (os.cpu_count() or 2) // 2)


def pool_config(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """The models.yaml of a pool setup: one model, every layer on the GPU."""
    return {
        "pool": {"memory_check_interval": 1.0},
        "models": [
            {
                "id": "bench",
                "min_instances": setup.instances,
                "max_instances": setup.instances,
                "max_queue": 1024,
                "queue_timeout": 300,
                "config": {
                    "model_path": str(args.model),
                    "n_ctx": args.n_ctx,
                    "n_parallel": setup.parallel,
                    "n_batch": max(512, setup.parallel),
                    "n_gpu_layers": args.n_gpu_layers,
                    "n_threads": max(1, cpu_threads() // setup.instances),
                },
            }
        ],
    }


def llama_server_command(args: argparse.Namespace, setup: Setup, port: int) -> list[str]:
    """llama-server as close to the pool's instance as its flags allow: the same context
    per slot (-c is split among slots), split KV streams, flash attention, n_batch 512."""
    return [
        str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(setup.parallel), "-c", str(args.n_ctx * setup.parallel),
        "-ngl", str(args.n_gpu_layers if args.n_gpu_layers >= 0 else 999),
        "-b", "512", "-ub", "512", "-fa", "on", "--no-kv-unified", "--fit", "off",
        "-t", str(cpu_threads()),
        "--no-webui", "--metrics",
    ]  # fmt: skip


def bench(
    args: argparse.Namespace, url: str, name: str, levels: list[int], requests: int
) -> dict[str, Any] | None:
    """One `python -m benchmarks --url` run; its JSON, or None when it wrote none."""
    raw = args.out / "raw"
    cmd = [
        sys.executable, "-m", "benchmarks", "--url", url, "--targets", "url",
        "--model", str(args.model), *(["--model-name", "bench"] if "pool" in name else []),
        "--concurrency", ",".join(map(str, levels)), "--requests", str(requests),
        "--warmup", "4", "--max-tokens", str(args.max_tokens), "--pairs", "0",
        "--request-timeout", "120", "--no-plot", "--no-progress",
        "--out-dir", str(raw), "--name", name,
    ]  # fmt: skip
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO_ROOT, check=False)
    path = raw / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def level_numbers(report: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Per concurrency: aggregate tok/s, TTFT p50, E2E p95 and failures of a bench JSON."""
    out: dict[int, dict[str, Any]] = {}
    entry = (report or {}).get("targets", {}).get("url") or {}
    for level in entry.get("levels", []):
        out[level["concurrency"]] = {
            "aggregate_tok_s": level["aggregate_tok_s"],
            "ttft_p50_s": (level.get("ttft_s") or {}).get("p50"),
            "e2e_p95_s": (level.get("e2e_s") or {}).get("p95"),
            "ok": level["ok"],
            "failed": level["failed"],
        }
    if entry.get("error"):
        out[0] = {"error": entry["error"]}
    return out


def nvml_reading() -> dict[str, Any] | None:
    """NVML's devices and per-process VRAM now, in tests/data/nvml-*.json's format."""
    try:
        from llamapool.pool.gpus import open_reader
    except ImportError:
        return None
    reader = open_reader()
    if reader is None:
        return None
    reading = reader.read()
    return {
        "devices": [d.__dict__ for d in reading.devices],
        "processes": {
            str(p): {str(d): n for d, n in on.items()} for p, on in reading.processes.items()
        },
    }


def vram_check(
    pool: dict[str, Any], nvml: dict[str, Any] | None, idle: dict[str, Any] | None
) -> dict[str, Any]:
    """Each worker's estimate (what the budget accounted) against NVML's number for it.

    Where NVML gives no per-process number (a container's PID namespace hides the host's
    pids), the device's use above its idle reading, shared among the instances, stands in.
    """
    (model,) = [m for m in pool["models"] if m["id"] == "bench"]
    estimate = (model.get("estimate") or {}).get("vram")
    growth = None
    if nvml and idle:
        before = {d["index"]: d["used"] for d in idle["devices"]}
        growth = sum(d["used"] - before.get(d["index"], 0) for d in nvml["devices"])
    per_instance = growth // max(1, len(pool["workers"])) if growth is not None else None
    workers = []
    for w in pool["workers"]:
        measured = sum((w.get("vram") or {}).values()) or per_instance
        workers.append(
            {
                "worker": w["id"],
                "pid": w["pid"],
                "gpu": w.get("gpu"),
                "accounted": estimate,
                "nvml": measured,
                "error": (estimate - measured) / measured if estimate and measured else None,
            }
        )
    errors = [abs(w["error"]) for w in workers if w["error"] is not None]
    return {
        "estimate_per_instance": estimate,
        "workers": workers,
        "gpus": pool.get("gpus"),
        "device_growth_per_instance": per_instance,
        "nvml_reading": nvml,
        "max_abs_error": max(errors) if errors else None,
    }


async def wait_ready(server: ServerProcess, timeout: float) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        await server.wait_ready(client, timeout)


def run_setup(args: argparse.Namespace, setup: Setup, token: str) -> dict[str, Any]:
    """Start one server, measure it, record VRAM (pools), stop it."""
    port = free_port()
    workdir = args.out / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    if setup.kind == "pool":
        config = workdir / f"{setup.label}.yaml"
        config.write_text(yaml.safe_dump(pool_config(args, setup), sort_keys=False))
        server = ServerProcess(
            setup.label, pool_command(config, port), port, workdir / f"{setup.label}.log"
        )
    else:
        command = llama_server_command(args, setup, port)
        server = ServerProcess(
            setup.label, command, port, workdir / f"{setup.label}.log", "/health"
        )
    entry: dict[str, Any] = {"setup": setup.__dict__, "command": server.command}
    t0 = time.perf_counter()
    try:
        server.start()
        asyncio.run(wait_ready(server, args.ready_timeout))
        entry["startup_s"] = server.startup_s
        levels: dict[int, dict[str, Any]] = {}
        if 1 in setup.levels:
            report = bench(args, server.base_url, f"{setup.label}-c1", [1], args.requests_c1)
            levels |= level_numbers(report)
        rest = [c for c in setup.levels if c != 1]
        if rest:
            report = bench(
                args,
                server.base_url,
                f"{setup.label}-c{'-'.join(map(str, rest))}",
                rest,
                args.requests,
            )
            levels |= level_numbers(report)
        entry["levels"] = levels
        if setup.kind == "pool":
            response = httpx.get(
                f"{server.base_url}/admin/pool",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
                trust_env=False,
            )
            entry["vram"] = vram_check(response.json(), nvml_reading(), args.nvml_idle)
    except Exception as exc:  # one setup failing must not lose the others' numbers
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["log_tail"] = server.log_tail()
    finally:
        server.stop()
    entry["wall_s"] = time.perf_counter() - t0
    return entry


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios issue #15 sets targets for, each with its target and whether it is met."""

    def tok_s(label: str, c: int) -> float | None:
        return results.get(label, {}).get("levels", {}).get(c, {}).get("aggregate_tok_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    out: dict[str, Any] = {
        "c16_vs_llama_server": ratio(tok_s("pool-np16", 16), tok_s("llama-server-np16", 16)),
        "c1_vs_llama_server": ratio(tok_s("pool-np16", 1), tok_s("llama-server-np16", 1)),
        "c64_np64_vs_llama_server": ratio(tok_s("pool-np64", 64), tok_s("llama-server-np64", 64)),
        "c64_4x16_vs_llama_server_np64": ratio(
            tok_s("pool-4x16", 64), tok_s("llama-server-np64", 64)
        ),
    }
    errors = [
        r["vram"]["max_abs_error"]
        for r in results.values()
        if r.get("vram") and r["vram"]["max_abs_error"] is not None
    ]
    out["vram_within"] = max(errors) if errors else None
    out["targets"] = {
        key: {
            "target": target,
            "value": out[key],
            "met": None
            if out[key] is None
            else (out[key] <= target if key == "vram_within" else out[key] >= target),
        }
        for key, target in TARGETS.items()
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, required=True)
    parser.add_argument("--llama-server", type=pathlib.Path, default=None)
    parser.add_argument("--no-llama-server", action="store_true")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per request (slot)")
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=128, help="per level above c=1")
    parser.add_argument("--requests-c1", type=int, default=8)
    parser.add_argument("--ready-timeout", type=float, default=180.0)
    parser.add_argument("--budget-s", type=float, default=360.0, help="start no setup after this")
    parser.add_argument("--only", default=None, help="comma list of setup labels to run")
    args = parser.parse_args(argv)
    args.model = args.model.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_llama_server and (args.llama_server is None or not args.llama_server.exists()):
        parser.error("--llama-server PATH (built with run.sh build) or --no-llama-server")
    token = secrets.token_urlsafe(24)
    os.environ["LLAMAPOOL_ADMIN_TOKEN"] = token  # the pools' servers inherit it
    setups = [s for s in SETUPS if not (args.no_llama_server and s.kind == "llama-server")]
    if args.only:
        setups = [s for s in setups if s.label in args.only.split(",")]

    started = time.perf_counter()
    args.nvml_idle = nvml_reading()
    report: dict[str, Any] = {
        "schema": "llamapool-gpu-run/1",
        "machine": machine_info(),
        "nvml_idle": args.nvml_idle,
        "config": {
            k: str(v) if isinstance(v, pathlib.Path) else v
            for k, v in vars(args).items()
            if k != "nvml_idle"
        },
        "model_size_bytes": args.model.stat().st_size,
        "setups": {},
        "skipped": [],
    }
    path = args.out / "gpu-run.json"
    for setup in setups:
        if time.perf_counter() - started > args.budget_s:
            report["skipped"].append(setup.label)
            continue
        print(f"== {setup.label}", flush=True)
        report["setups"][setup.label] = run_setup(args, setup, token)
        report["comparisons"] = compare(report["setups"])
        write_json(path, report)  # after every setup: a run cut short keeps what it measured
    report["duration_s"] = time.perf_counter() - started
    report["comparisons"] = compare(report["setups"])
    write_json(path, report)
    print(json.dumps(report["comparisons"], indent=2))
    print(f"results: {path}")
    return 1 if any(s.get("error") for s in report["setups"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
