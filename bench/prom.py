"""Reads the service's own Prometheus metrics: padding efficiency, batch sizes, batch tokens.

The counters and histograms are cumulative, so a phase is measured as the difference between
a scrape before it and one after it (`Scrape.since`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper edge (+Inf last), with sum and count."""

    buckets: tuple[tuple[float, float], ...]
    total: float
    count: float

    def minus(self, other: Histogram) -> Histogram:
        before = dict(other.buckets)
        return Histogram(
            tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
            self.total - other.total,
            self.count - other.count,
        )

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def distribution(self) -> list[tuple[str, int]]:
        """Observations per bucket, as ('<= edge' label, count) for non-empty buckets."""
        out, prev, lo = [], 0.0, None
        for le, cum in self.buckets:
            n = round(cum - prev)
            if n:
                edge = "inf" if math.isinf(le) else f"{le:g}"
                label = f"> {lo:g}" if math.isinf(le) and lo is not None else f"<= {edge}"
                out.append((label, n))
            prev, lo = cum, le
        return out


@dataclass(frozen=True)
class Scrape:
    """The batching metrics of one model at one moment."""

    real_tokens: float = 0.0
    computed_tokens: float = 0.0
    batch_size: Histogram = field(default_factory=lambda: Histogram((), 0.0, 0.0))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram((), 0.0, 0.0))

    @property
    def padding_efficiency(self) -> float:
        """Real over computed tokens: the share of batch compute spent on image content."""
        return self.real_tokens / self.computed_tokens if self.computed_tokens else math.nan

    def since(self, before: Scrape) -> Scrape:
        return Scrape(
            self.real_tokens - before.real_tokens,
            self.computed_tokens - before.computed_tokens,
            self.batch_size.minus(before.batch_size),
            self.batch_tokens.minus(before.batch_tokens),
        )


def busy(text: str) -> float:
    """Images queued or in a running batch, all models (`musiq_queue_depth` + `musiq_in_flight`)."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("musiq_queue_depth", "musiq_in_flight")
    )


def parse(text: str, model: str | None = None) -> Scrape:
    """The batching metrics in a /metrics page; `model` picks one model's series (default: all summed)."""
    counters: dict[str, float] = {"musiq_real_tokens": 0.0, "musiq_computed_tokens": 0.0}
    hists: dict[str, dict[str, Any]] = {}  # {"buckets": {le: count}, "sum": float, "count": float}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if model is not None and s.labels.get("model") not in (None, model):
                continue
            if s.name in ("musiq_real_tokens_total", "musiq_computed_tokens_total"):
                counters[s.name.removesuffix("_total")] += s.value
            for h in ("musiq_batch_size", "musiq_batch_tokens"):
                entry = hists.setdefault(h, {"buckets": {}, "sum": 0.0, "count": 0.0})
                if s.name == f"{h}_bucket":
                    buckets = entry["buckets"]
                    assert isinstance(buckets, dict)
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif s.name == f"{h}_sum":
                    entry["sum"] = float(entry["sum"]) + s.value
                elif s.name == f"{h}_count":
                    entry["count"] = float(entry["count"]) + s.value

    def histogram(name: str) -> Histogram:
        entry = hists.get(name, {"buckets": {}, "sum": 0.0, "count": 0.0})
        buckets = entry["buckets"]
        assert isinstance(buckets, dict)
        return Histogram(tuple(sorted(buckets.items())), float(entry["sum"]), float(entry["count"]))

    return Scrape(
        counters["musiq_real_tokens"],
        counters["musiq_computed_tokens"],
        histogram("musiq_batch_size"),
        histogram("musiq_batch_tokens"),
    )
