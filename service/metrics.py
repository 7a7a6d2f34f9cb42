"""Prometheus metrics (prefix `musiq_`, base units), one registry per service instance.

Padding efficiency is exported as two counters, real and computed tokens, so dashboards take
`rate(real) / rate(computed)` over any window; queue depth and in-flight items are read from the
batchers at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.batcher import BatchInfo

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


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
        self.model_info = Gauge(
            "musiq_model_info",
            "Loaded models (value 1).",
            ["model", "version", "precision", "provider"],
            registry=r,
        )

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
