"""Measure how fast the pool recovers from each fault, with real processes and signals.

    python -m benchmarks.recovery [--model PATH] [--rounds 3]

Prints a Markdown table (the one in docs/operations.md) and writes
benchmarks/results/recovery.json. Uses default supervision settings (heartbeat 1 s,
liveness 5, backoff 0.5 s), so the numbers are what a default deployment sees.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from benchmarks.modelfile import default_model_path

TOKEN = "recovery-bench"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
EOG = {"0": -100, "2": -100, "4": -100}


class Pool:
    """A `llamapool serve` subprocess with one model, `m`, on a free port."""

    def __init__(self, model: Path, instances: int, workdir: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = {
            "models": [
                {
                    "id": "m",
                    "min_instances": instances,
                    "config": {"model_path": str(model), "n_ctx": 2048, "n_threads": 1},
                }
            ]
        }
        path = workdir / "models.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "server.log", "wb")  # noqa: SIM115
        env = {**os.environ, "LLAMAPOOL_ADMIN_TOKEN": TOKEN}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamapool",
                "serve",
                "--config",
                str(path),
                "--port",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait(lambda: self.ready_count() == instances, 120)

    def pool(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/admin/pool", headers=HEADERS, timeout=5).json()

    def ready_count(self) -> int:
        try:
            return self.pool()["models"][0]["instances"]["ready"]
        except (httpx.HTTPError, KeyError, IndexError):
            return -1

    def pids(self) -> list[int]:
        return [w["pid"] for w in self.pool()["workers"]]

    def wait(self, cond, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if cond():
                return time.monotonic() - t0
            time.sleep(0.005)
        raise TimeoutError("condition not met")

    def chat(self, max_tokens: int, **kw: Any) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": max_tokens,
                "logit_bias": EOG,
                **kw,
            },
            timeout=120,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


def _alive(proc: psutil.Process) -> bool:
    # A zombie has exited; it only waits for init to reap it.
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _replaced_after(pool: Pool, sig: int) -> float:
    """Signal the only worker; seconds until a different worker is READY."""
    (victim,) = pool.pids()
    t0 = time.monotonic()
    os.kill(victim, sig)

    def replaced() -> bool:
        workers = pool.pool()["workers"]
        return [w["state"] for w in workers] == ["IDLE"] and workers[0]["pid"] != victim

    pool.wait(replaced, 60)
    return time.monotonic() - t0


def measure(model: Path, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        k: [] for k in ("boot", "sigkill", "sigstop", "router_kill", "cancel")
    }
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.monotonic()
            pool = Pool(model, 1, Path(d))
            out["boot"].append(time.monotonic() - t0)
            try:
                out["sigkill"].append(_replaced_after(pool, signal.SIGKILL))
                out["sigstop"].append(_replaced_after(pool, signal.SIGSTOP))
                # Cancel: stream, hang up after the first token, time until the worker is IDLE.
                with httpx.stream(
                    "POST",
                    f"{pool.url}/v1/chat/completions",
                    json={
                        "model": "m",
                        "messages": [{"role": "user", "content": "story"}],
                        "max_tokens": 1500,
                        "logit_bias": EOG,
                        "stream": True,
                    },
                    timeout=60,
                ) as r:
                    for line in r.iter_lines():
                        if '"content":"' in line and '"content":""' not in line:
                            break
                t0 = time.monotonic()
                pool.wait(lambda p=pool: p.pool()["workers"][0]["state"] == "IDLE", 30)
                out["cancel"].append(time.monotonic() - t0)
                # Router SIGKILL: seconds until no worker process is left.
                procs = [psutil.Process(p) for p in pool.pids()]
                t0 = time.monotonic()
                pool.proc.kill()
                pool.proc.wait()
                pool.wait(lambda ps=procs: not any(_alive(p) for p in ps), 30)
                out["router_kill"].append(time.monotonic() - t0)
            finally:
                pool.close()
    return out


ROWS = [
    ("boot", "start: `llamapool serve` until the first instance is READY"),
    ("sigkill", "worker SIGKILL'd / segfaults: until a replacement is READY"),
    ("sigstop", "worker hangs (SIGSTOP): detection by heartbeat + replacement READY"),
    ("cancel", "client hangs up mid-stream: until the worker is IDLE again"),
    ("router_kill", "router `kill -9`: until no worker process is left"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    model = args.model or default_model_path()
    results = measure(model, args.rounds)
    print(f"model: {model.name}, rounds: {args.rounds}\n")
    print("| fault | median s | max s |\n|---|---|---|")
    for key, label in ROWS:
        values = results[key]
        print(f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} |")
    out = Path(__file__).parent / "results" / "recovery.json"
    out.write_text(
        json.dumps({"model": str(model), "rounds": args.rounds, "seconds": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
