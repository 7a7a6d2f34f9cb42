"""Prometheus metrics (prefix `musiq_`, base units), one registry per service instance.

Padding efficiency is exported as two counters, real and computed tokens, so dashboards take
`rate(real) / rate(computed)` over any window; queue depth and in-flight items are read from the
batchers at scrape time, so they are never stale.

Served scores are a histogram per model (`musiq_score`) whose buckets cover that model's declared
score range (its metadata) in 20 equal steps, so the score-shift alert and the dashboard read any
model's distribution at the same resolution; the range itself is exported beside it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.batcher import BatchInfo

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
SCORE_STEPS = 20  # buckets across a model's score range: every 5 points on 0..100
DEFAULT_SCORE_RANGE = (0.0, 100.0)


def score_buckets(score_range: tuple[float, float], steps: int = SCORE_STEPS) -> tuple[float, ...]:
    """Bucket bounds from the range's low end to its high end in `steps` equal steps. The first
    bound (the low end itself) and +Inf hold the scores outside the declared range."""
    low, high = score_range
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        low, high = DEFAULT_SCORE_RANGE
    return tuple(round(low + (high - low) * i / steps, 6) for i in range(steps + 1))


class _QueueCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("musiq_queue_depth", "Images waiting for a batch.", labels=["model"])
        flight = GaugeMetricFamily("musiq_in_flight", "Images in a running batch.", labels=["model"])
        # Exported so that alerts compare the depth with the configured bound, whatever it is.
        capacity = GaugeMetricFamily(
            "musiq_queue_capacity", "Images the queue holds before refusing (429).", labels=["model"]
        )
        for model, waiting, running, places in self.read():
            depth.add_metric([model], waiting)
            flight.add_metric([model], running)
            capacity.add_metric([model], places)
        yield depth
        yield flight
        yield capacity


class _ScoreCollector(Collector):
    """`musiq_score`: one histogram per model, each with buckets over that model's score range
    (one prometheus_client Histogram has one bucket layout for all its labels), plus
    `musiq_score_range_lower` / `_upper`, the declared range the alert scales its threshold by."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, tuple[tuple[float, float], Histogram]] = {}

    def observe(self, model: str, score: float, score_range: tuple[float, float]) -> None:
        entry = self._models.get(model)
        if entry is None:
            with self._lock:
                entry = self._models.get(model)
                if entry is None:
                    buckets = score_buckets(score_range)
                    histogram = Histogram("musiq_score", "", buckets=buckets, registry=None)
                    entry = self._models[model] = ((buckets[0], buckets[-1]), histogram)
        entry[1].observe(score)

    def collect(self) -> Iterable[Metric]:
        scores = Metric(
            "musiq_score", "Scores served, per model (buckets over its score range).", "histogram"
        )
        lower = GaugeMetricFamily(
            "musiq_score_range_lower", "Low end of the model's declared score range.", labels=["model"]
        )
        upper = GaugeMetricFamily(
            "musiq_score_range_upper", "High end of the model's declared score range.", labels=["model"]
        )
        with self._lock:
            models = sorted(self._models.items())
        for model, ((low, high), histogram) in models:
            for metric in histogram.collect():
                for sample in metric.samples:
                    scores.add_sample(
                        sample.name, {"model": model, **sample.labels}, sample.value, sample.timestamp
                    )
            lower.add_metric([model], low)
            upper.add_metric([model], high)
        yield scores
        yield lower
        yield upper


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "musiq_requests",
            "Requests by protocol, route and status code.",
            ["protocol", "route", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "musiq_request_duration_seconds",
            "Request duration.",
            ["protocol", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "musiq_decode_duration_seconds", "Image decoding time.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.pack_seconds = Histogram(
            "musiq_pack_duration_seconds", "Multi-scale packing time.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "musiq_queue_wait_seconds",
            "Time an image waited for its batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "musiq_inference_duration_seconds",
            "Batch inference time.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "musiq_batch_size", "Images per batch.", ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "musiq_batch_tokens",
            "Tokens computed per batch (size x padded length).",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.real_tokens = Counter(
            "musiq_real_tokens", "Tokens of real image content computed.", ["model"], registry=r
        )
        self.computed_tokens = Counter(
            "musiq_computed_tokens", "Tokens computed, padding included.", ["model"], registry=r
        )
        self.batch_errors = Counter(
            "musiq_batch_errors", "Batches whose inference failed.", ["model"], registry=r
        )
        self.rejected = Counter(
            "musiq_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r
        )
        # A decode worker that keeps dying (a decoder crash, the memory limit) shows here before
        # its 503s pile up; service/prepare_pool.py calls back, it does not import this module.
        self.decode_worker_restarts = Counter(
            "musiq_decode_worker_restarts",
            "Decode worker processes replaced after dying or overrunning their time limit.",
            registry=r,
        )
        self.model_info = Gauge(
            "musiq_model_info",
            "Loaded models (value 1).",
            ["model", "version", "precision", "provider"],
            registry=r,
        )

        self._scores = _ScoreCollector()
        r.register(self._scores)

    def observe_score(self, model: str, score: float, score_range: tuple[float, float]) -> None:
        """One served score (every successfully scored image, whichever protocol or call asked);
        `score_range` is the model's declared one, which sets the buckets on its first score."""
        if math.isfinite(score):  # a NaN would poison the sum and land in no bucket
            self._scores.observe(model, score, score_range)

    def watch_queues(self, read: Callable[[], Iterable[tuple[str, int, int, int]]]) -> None:
        """`read` gives (model, queued, in flight, queue capacity) at each scrape."""
        self.registry.register(_QueueCollector(read))

    def batch_hook(self, model: str) -> Callable[[BatchInfo], None]:
        def record(info: BatchInfo) -> None:
            self.batch_size.labels(model).observe(info.size)
            self.batch_tokens.labels(model).observe(info.size * info.padded_length)
            self.real_tokens.labels(model).inc(info.real_tokens)
            self.computed_tokens.labels(model).inc(info.size * info.padded_length)
            self.inference_seconds.labels(model).observe(info.run_s)
            for wait in info.queue_waits_s:
                self.queue_seconds.labels(model).observe(wait)
            if info.error:
                self.batch_errors.labels(model).inc()

        return record
