"""The sweep as a PNG: throughput and p95 latency against concurrency, one line per target."""

from __future__ import annotations

import pathlib
from typing import Any


def plot_sweep(report: dict[str, Any], path: pathlib.Path) -> bool:
    """Draw the plot to `path`; False if no target has a level to draw."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only, and safe from any thread
    import matplotlib.pyplot as plt

    series = {
        name: entry["levels"]
        for name, entry in report["targets"].items()
        if not entry.get("error") and entry.get("levels")
    }
    if not series:
        return False
    fig, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    levels: set[int] = set()
    for name, rows in series.items():
        rows = [row for row in rows if row["ok"]]
        x = [row["concurrency"] for row in rows]
        levels.update(x)
        style = {"marker": "o", "label": name}
        if len(x) == 1:
            style["linestyle"] = "none"  # `direct` is one stream: a point, not a line
        throughput.plot(x, [row["aggregate_tok_s"] for row in rows], **style)
        latency.plot(x, [row["e2e_s"]["p95"] for row in rows], **style)
    config = report["config"]
    for axis, ylabel in ((throughput, "generated tokens / s (all streams)"),
                         (latency, "end-to-end latency p95 (s)")):  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(levels), [str(level) for level in sorted(levels)])
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend()
    machine = report["machine"]
    fig.suptitle(
        f"{pathlib.Path(config['model_path']).name}, {config['max_tokens']} tokens/request, "
        f"{machine['cpu_usable']} cores, {machine.get('effective_cores', '?')} effective "
        f"({machine['cpu_model'] or machine['platform']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
