"""What a run leaves behind: terminal tables, the JSON file, and the machine it ran on."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

from benchmarks.servers import REPO_ROOT, usable_cores

SCHEMA = "llamapool-bench/1"
_PACKAGES = (
    "llamapool", "llama_cpp_python", "httpx", "starlette", "uvicorn", "rich", "matplotlib",
    "numpy", "psutil", "pyzmq", "msgspec",
)  # fmt: skip


def machine_info() -> dict[str, Any]:
    """CPU, memory and OS of this machine, so numbers from two runs can be told apart."""
    cpu_model = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_logical": psutil.cpu_count(logical=True),
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_usable": usable_cores(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "llama_cpp_system_info": _llama_system_info(),
        "effective_cores": effective_cores(),
    }


_SPIN = (
    "import os, sys, time\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "t = time.perf_counter(); x = 0\n"
    "for i in range(3_000_000): x += i\n"
    "print(time.perf_counter() - t)\n"
)


def _cores(machine: dict[str, Any]) -> str:
    effective = machine.get("effective_cores")
    usable = machine.get("cpu_usable")
    return f"{usable} cores" + (f" ({effective} effective)" if effective is not None else "")


def effective_cores() -> float | None:
    """How many cores' worth of work the usable cores do at once (a busy loop on each).

    On a virtual machine whose vCPUs share physical cores (SMT siblings, an overcommitted
    host) this is well below the core count, and no server can scale past it; it is what
    tells two runs on "the same" 2-core box apart.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return None

    def spin(on: list[int]) -> list[float]:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _SPIN, str(core)], stdout=subprocess.PIPE, text=True
            )
            for core in on
        ]
        return [float(p.communicate()[0]) for p in procs]

    try:
        alone = min(spin([cores[0]])[0] for _ in range(2))
        together = spin(cores)
    except (OSError, ValueError):
        return None
    return round(sum(alone / t for t in together), 2)


def _llama_system_info() -> str | None:
    """The CPU features llama.cpp was built with and uses (AVX2, ...)."""
    try:
        import llama_cpp

        return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    except (ImportError, AttributeError):
        return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["git_commit"] = _git_commit()
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_json(path: pathlib.Path, report: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _ms1(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{key} x{n}" for key, n in errors.items()) or "-"


def render_sweep(console: Console, report: dict[str, Any]) -> None:
    """The sweep table, the pool/mutex ratios and the reported targets."""
    config = report["config"]
    table = Table(
        title=f"{pathlib.Path(config['model_path']).name}, "
        f"{config['max_tokens']} tokens per request, {_cores(report['machine'])}",
        caption="tok/s: generated tokens per second, all streams / one stream (p50); "
        "TTFT and end-to-end latency as p50 / p95 / p99",
    )
    for column in ("target", "conc", "ok/n", "tok/s", "tok/s/stream", "TTFT ms", "E2E s",
                   "queue ms mean", "errors"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("target", "errors") else "right")
    for name, entry in report["targets"].items():
        if entry.get("error"):
            table.add_row(name, *["-"] * 7, "[red]failed to run[/]")
            table.add_section()
            continue
        for level in entry["levels"]:
            ttft, e2e, queue = level["ttft_s"], level["e2e_s"], level["queue_wait_s"] or {}
            table.add_row(
                name,
                str(level["concurrency"]),
                f"{level['ok']}/{level['requests']}",
                _num(level["aggregate_tok_s"]),
                _num(level["stream_tok_s"]["p50"]),
                " / ".join(_ms(ttft[q]) for q in ("p50", "p95", "p99")),
                " / ".join(_s(e2e[q]) for q in ("p50", "p95", "p99")),
                _ms(queue.get("mean")),
                _errors(level["errors_by_type"]),
            )
        table.add_section()
    console.print(table)

    for name, entry in report["targets"].items():
        if entry.get("error"):
            console.print(f"[red]{name} failed:[/] {entry['error']}")
        elif entry.get("warmup", {}).get("errors_by_type"):
            errors = _errors(entry["warmup"]["errors_by_type"])
            console.print(f"[yellow]{name} warm-up errors:[/] {errors}")

    comparisons = report.get("comparisons") or {}
    candidate = comparisons.get("candidate")
    if candidate is None:
        return
    rows = comparisons.get(f"{candidate}_over_mutex") or []
    if any(row["aggregate_tok_s_ratio"] is not None for row in rows):
        ratios = Table(title=f"{candidate} / mutex")
        for column in ("conc", "tok/s", "TTFT p50", "E2E p95"):
            ratios.add_column(column, justify="right")
        for row in rows:
            ratios.add_row(
                str(row["concurrency"]),
                _ratio(row["aggregate_tok_s_ratio"]),
                _ratio(row["ttft_p50_ratio"]),
                _ratio(row["e2e_p95_ratio"]),
            )
        console.print(ratios)
    single = comparisons["single_stream"]
    if single["ratio"] is not None:
        console.print(
            f"single stream, {candidate} vs direct: {_num(single['candidate_tok_s'])} vs "
            f"{_num(single['direct_tok_s'])} tok/s ({_ratio(single['ratio'])}); "
            f"TTFT overhead {_ms(comparisons['ttft_overhead_s'])} ms"
        )
    if comparisons.get("routing_overhead_p50_s") is not None:
        console.print(
            f"routing overhead at concurrency 1 (client TTFT minus the worker's own), p50: "
            f"{comparisons['routing_overhead_p50_s'] * 1000:.1f} ms"
        )
    if comparisons.get("routing_beyond_http_floor_p50_s") is not None:
        console.print(
            f"HTTP floor (same client, a server that answers at once), p50: "
            f"{comparisons['http_floor_ttft_p50_s'] * 1000:.1f} ms; routing beyond it: "
            f"{comparisons['routing_beyond_http_floor_p50_s'] * 1000:.1f} ms"
        )
    paired = comparisons.get("paired")
    if paired is not None:
        console.print(
            f"paired, {paired['pairs']} turns of floor / pool / direct: single stream "
            f"{_ratio(paired['single_stream_ratio_p50'])} (p50 of the per-pair ratios); "
            f"routing overhead {_ms1(paired['routing_overhead_p50_s'])} ms, "
            f"beyond the HTTP floor {_ms1(paired['routing_beyond_http_floor_p50_s'])} ms (p50)"
        )
    if comparisons.get("aggregate_c8_ratio_vs_mutex") is not None:
        console.print(
            f"aggregate tok/s at concurrency 8, {candidate}/mutex: "
            f"{_ratio(comparisons['aggregate_c8_ratio_vs_mutex'])}"
        )


def render_stress(console: Console, report: dict[str, Any]) -> None:
    """One row per target: outcome counts and the invariant's verdict."""
    table = Table(title=f"stress: {report['config']['stress']['requests']} requests at once")
    for column in ("target", "sent", "ok", "503", "clear err", "unclear", "hung", "lost",
                   "invariant", "errors"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("target", "errors") else "right")
    for name, entry in report["targets"].items():
        if entry.get("error"):
            table.add_row(name, *["-"] * 7, "[red]not run[/]", "")
            continue
        inv = entry["invariant"]
        verdict = "[green]holds[/]" if inv["holds"] else "[red]BROKEN[/]"
        table.add_row(
            name, str(inv["sent"]), str(inv["ok"]), str(inv["rejected_503"]),
            str(inv["clear_error"]), str(inv["unclear_error"]), str(inv["hung"]),
            str(inv["lost"]), verdict, _errors(entry["errors_by_type"]),
        )  # fmt: skip
    console.print(table)
    for name, entry in report["targets"].items():
        if entry.get("error"):
            console.print(f"[red]{name} failed:[/] {entry['error']}")
        else:
            for violation in entry["invariant"]["violations"]:
                console.print(f"[red]{name}:[/] {violation}")


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def render_chat_replay(console: Console, report: dict[str, Any]) -> None:
    """One row per target and turn, and one for the whole replay: TTFT, tok/s, and the
    prompt tokens the server evaluated against those it was sent."""
    config = report["config"]
    replay = config["chat_replay"]
    table = Table(
        title=f"chat replay: {replay['conversations']} conversations x {replay['turns']} turns, "
        f"{replay['system_prompt_tokens']}-token system prompt, {config['max_tokens']} tokens "
        f"per answer, {pathlib.Path(config['model_path']).name}, {_cores(report['machine'])}",
        caption="tok/s: generated tokens per second, all streams (over the turn's span) / one "
        "stream (p50); prompt: tokens sent, evaluated by the server, cached; "
        "eval %: evaluated / sent",
    )
    for column in ("target", "turn", "ok/n", "TTFT ms p50 / p95", "tok/s", "tok/s/stream",
                   "prompt sent", "evaluated", "cached", "eval %", "errors"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("target", "errors") else "right")
    for name, entry in report["targets"].items():
        if entry.get("error"):
            table.add_row(name, *["-"] * 9, "[red]failed to run[/]")
            table.add_section()
            continue
        for turn in entry["per_turn"]:
            prompt = turn["prompt_tokens"]
            table.add_row(
                name,
                str(turn["turn"]),
                f"{turn['ok']}/{turn['requests'] + turn['skipped']}",
                " / ".join(_ms(turn["ttft_s"][q]) for q in ("p50", "p95")),
                _num(turn["aggregate_tok_s"]),
                _num(turn["stream_tok_s"]["p50"]),
                _count(prompt["sent"]),
                _count(prompt["evaluated"]),
                _count(prompt["cached"]),
                _fraction(prompt["evaluated_fraction"]),
                _errors(turn["errors_by_type"]),
            )
        prompt = entry["prompt_tokens"]
        table.add_row(
            f"[bold]{name}[/]",
            "all",
            f"{entry['ok']}/{entry['requests']}",
            " / ".join(_ms(entry["ttft_s"][q]) for q in ("p50", "p95")),
            _num(entry["aggregate_tok_s"]),
            "",
            _count(prompt["sent"]),
            _count(prompt["evaluated"]),
            _count(prompt["cached"]),
            _fraction(prompt["evaluated_fraction"]),
            _errors(entry["errors_by_type"]),
        )
        table.add_section()
    console.print(table)
    for name, entry in report["targets"].items():
        if entry.get("error"):
            console.print(f"[red]{name} failed:[/] {entry['error']}")
            continue
        late = sum(turn.get("late", 0) for turn in entry["per_turn"])
        if late:
            console.print(
                f"[yellow]{name}:[/] {late} turn(s) sent after their --turn-interval time "
                "(the previous answer ended later): their arrivals differ from the schedule"
            )
        if entry["skipped"]:
            console.print(
                f"[yellow]{name}:[/] {entry['skipped']} turn(s) not sent: their conversation "
                "had failed"
            )
        if entry["ok"] and entry["prompt_tokens"]["evaluated"] is None:
            console.print(
                f"[yellow]{name}:[/] the server reports neither timings.prompt_n nor "
                "usage.prompt_tokens_details.cached_tokens: evaluated tokens unknown"
            )
