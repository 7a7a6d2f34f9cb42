"""Test seams for the deadline and overload tests: a model held behind a gate, a real server over it,
and a reader of /metrics.

`Gated.factory` is a `runtime_factory` for `create_app`: the real model, whose warm-up inferences
take `warm_up_s` (so the batcher's seeded throughput, which deadline-aware admission divides by,
is slow and known), and whose later inferences wait while the gate is held. So a test can keep a
request in inference for as long as it needs, without sleeping for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from model.packing import PackedImage
from musiq_client.gen import quality_pb2_grpc
from service.runtime import ModelRuntime, Prediction, RuntimeOptions
from service.settings import ServiceSettings
from tests.helpers import jpeg, start_server


@dataclass
class Gated:
    warm_up_s: float = 0.5
    serving: bool = False  # set once the server is ready: from then on inferences wait at the gate
    _open: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._open.set()

    def factory(self, path: Path, options: RuntimeOptions) -> ModelRuntime:
        runtime = ModelRuntime(path, options)
        real = runtime.predict

        def predict(items: Sequence[PackedImage]) -> list[Prediction]:
            if not self.serving:
                time.sleep(self.warm_up_s)
            elif not self._open.wait(60):
                raise RuntimeError("the test never opened the gate")
            return real(items)

        # A test seam: the real model behind the injected behaviour (mypy refuses method assignment).
        runtime.predict = predict  # type: ignore[method-assign]
        return runtime

    @contextmanager
    def closed(self) -> Iterator[None]:
        """While inside, every inference waits at the gate."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    @contextmanager
    def holding(self, core: Any, send: Callable[[], Any]) -> Iterator[Future[Any]]:
        """Closes the gate, runs `send` (a request) in a thread until its image is in inference,
        yields its future, then opens the gate again."""
        batcher = core.models[core.default].batcher
        self._open.clear()
        pool = ThreadPoolExecutor(1)
        try:
            future = pool.submit(send)
            deadline = time.monotonic() + 30
            while batcher.in_flight == 0:
                assert time.monotonic() < deadline, "the held request never reached inference"
                assert not future.done(), future.result()
                time.sleep(0.01)
            yield future
        finally:
            self._open.set()
            pool.shutdown(wait=True)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


BIG = jpeg(800, 1000, seed=3)  # at the server's 512 native-token cap: as much work as one image gets


@dataclass
class GatedServer:
    """A real server (REST and gRPC on 127.0.0.1) over the gated model; `core` is its ScoringCore."""

    url: str
    target: str
    core: Any
    gated: Gated
    stub: quality_pb2_grpc.QualityStub

    def rest(self, data: bytes, timeout: float = 60) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/score", content=data, headers={"Content-Type": "image/jpeg"}, timeout=timeout
        )

    def hold(self) -> Any:
        """While inside: one big image is in inference, held there by the gate."""
        return self.gated.holding(self.core, lambda: self.rest(BIG))


@contextmanager
def gated_server(**overrides: Any) -> Iterator[GatedServer]:
    """One inference at a time, no queue delay, a 30 s request timeout; `overrides` are settings."""
    settings = ServiceSettings(
        **{
            "grpc_port": 0,
            "host": "127.0.0.1",
            "max_batch_size": 1,
            "max_queue_delay_s": 0.0,
            "request_timeout_s": 30.0,
            **overrides,
        }
    )
    gated = Gated()
    srv, thread, url = start_server(settings, runtime_factory=gated.factory)
    gated.serving = True
    try:
        target = f"127.0.0.1:{srv.config.app.state.grpc_port}"
        with grpc.insecure_channel(target) as channel:
            stub = quality_pb2_grpc.QualityStub(channel)
            yield GatedServer(url, target, srv.config.app.state.core, gated, stub)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
