"""Queue wait as the server saw it, from its Prometheus /metrics (optional).

A level's queue wait is the difference of the queue-wait histogram before and after the
level. Servers without /metrics, or without such a histogram, give None.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import httpx

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_samples(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments and malformed lines skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(match.group(3) or ""))
        samples.append(Sample(match.group(1), labels, value))
    return samples


@dataclass
class Histogram:
    """One histogram summed over the series that match a model: buckets, sum and count."""

    name: str
    buckets: dict[float, float]
    total: float
    count: float

    def minus(self, earlier: Histogram) -> Histogram:
        buckets = {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return Histogram(self.name, buckets, self.total - earlier.total, self.count - earlier.count)

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for le in sorted(self.buckets):
            cumulative = self.buckets[le]
            if cumulative >= rank:
                if math.isinf(le):
                    return lower_bound
                span = cumulative - lower_count
                fraction = (rank - lower_count) / span if span > 0 else 1.0
                return lower_bound + (le - lower_bound) * fraction
            lower_bound, lower_count = le, cumulative
        return lower_bound


def find_queue_wait(samples: list[Sample], model: str | None) -> Histogram | None:
    """The queue-wait histogram (a name with 'queue' and 'wait'), limited to `model` if labelled."""
    families: dict[str, Histogram] = {}
    for sample in samples:
        if "queue" not in sample.name or "wait" not in sample.name:
            continue
        labelled_model = sample.labels.get("model")
        if model is not None and labelled_model is not None and labelled_model != model:
            continue
        for suffix in ("_bucket", "_sum", "_count"):
            if sample.name.endswith(suffix):
                base = sample.name[: -len(suffix)]
                break
        else:
            continue
        hist = families.setdefault(base, Histogram(base, {}, 0.0, 0.0))
        if suffix == "_bucket":
            le = float(sample.labels.get("le", "+Inf"))
            hist.buckets[le] = hist.buckets.get(le, 0.0) + sample.value
        elif suffix == "_sum":
            hist.total += sample.value
        else:
            hist.count += sample.value
    if not families:
        return None
    # Prefer a name in seconds if the server exports several.
    return families[min(families, key=lambda name: ("seconds" not in name, name))]


async def scrape(client: httpx.AsyncClient, base_url: str, model: str | None) -> Histogram | None:
    """The server's queue-wait histogram now, or None if it has no such metric."""
    try:
        response = await client.get(f"{base_url}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return find_queue_wait(parse_samples(response.text), model)


def level_queue_wait(before: Histogram | None, after: Histogram | None) -> dict[str, Any] | None:
    """Mean and quantiles of the waits observed between two scrapes."""
    if before is None or after is None:
        return None
    delta = after.minus(before)
    if delta.count <= 0:
        return None
    return {
        "metric": delta.name,
        "count": delta.count,
        "mean": delta.total / delta.count,
        "p50": delta.quantile(0.50),
        "p95": delta.quantile(0.95),
        "p99": delta.quantile(0.99),
    }
