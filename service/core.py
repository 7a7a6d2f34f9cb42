"""The protocol-independent core: bytes -> decode -> pack -> batcher -> ONNX Runtime -> result.

The REST and gRPC handlers call `ScoringCore.score`; every failure is a `ScoringError` with a
stable code (`service/errors.py` maps it onto HTTP and gRPC), so the protocol layers only translate.

`ScoringCore` composes three parts that change for different reasons, each in its own module:
`service/registry.py` (which models are served: loading, warm-up, explainers, packing limits),
`service/health.py` (readiness, draining, failing models and the probe that sees them recover) and
`service/admission.py` (what may start: serving or not, the in-progress limit, deadline-aware
admission, the explanation queue). What stays here is the request path itself: decode and pack (in
worker processes, `service/prepare_pool.py`, or with `decode_processes=0` in a thread pool), queue on
the model's batcher, map each failure onto its error code, record the score.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from model.config import PackingConfig
from model.decode import ImageDecodeError
from service.admission import Admission, ExplainQueue
from service.batcher import (
    BatchInfo,
    DeadlineExceeded,
    InferenceTimeout,
    ItemTooLarge,
    ModelStuck,
    QueueFull,
    ShuttingDown,
    WouldMissDeadline,
)
from service.errors import ScoringError, decode_error_code
from service.explain import ScaleExplanation, explain_scales
from service.health import Health
from service.heap import keep_freed_memory
from service.metrics import ServiceMetrics
from service.prepare import Prepared, ScoreInput, prepare_image
from service.prepare_pool import PreparePool, WorkerDied
from service.registry import ModelRegistry, ServedModel
from service.registry import RuntimeFactory as RuntimeFactory  # re-exported: `service/app.py` and tests
from service.runtime import ModelRuntime
from service.settings import ServiceSettings

_P = TypeVar("_P", Prepared, ScoreInput)


@dataclass
class ScoreResult:
    score: float
    model: str
    model_version: str
    tokens: int
    timings: dict[str, float]
    distribution: tuple[float, ...] | None = None


@dataclass
class ExplainResult:
    result: ScoreResult  # the same score /v1/score gives for these bytes
    scales: list[ScaleExplanation]


class ScoringCore:
    """Composes the parts and runs the pipeline: `ModelRegistry` (the models), `Health` (readiness
    and its probe), `Admission` and `ExplainQueue` (what may start); `score` and `explain` decode in
    the decode pool, queue on the model's batcher and turn every failure into a `ScoringError`.

    The attributes the transports and tests read (`models`, `default`, `ready`, `draining`,
    `unhealthy`, `in_progress`, `health_listeners`) are views onto those parts."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        metrics: ServiceMetrics | None = None,
        runtime_factory: RuntimeFactory = ModelRuntime,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.registry = ModelRegistry(settings, self.metrics, runtime_factory)
        self.health = Health()
        self.admission = Admission(settings, self.health)
        self.explain_queue = ExplainQueue(settings)
        self.pool: ThreadPoolExecutor | None = None  # rendering explanations; decoding too without processes
        self.prepare_pool: PreparePool | None = None  # decode + pack processes (decode_processes > 0)
        self.dispatch: ThreadPoolExecutor | None = None  # threads that wait on those processes, one each
        self.preparing = 0  # requests being decoded and packed: the batchers' possible company

    # --- views onto the parts (the transports' and tests' API) ----------------------------------

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.registry.models

    @property
    def default(self) -> str:
        return self.registry.default

    @property
    def ready(self) -> bool:
        return self.health.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.health.ready = value

    @property
    def draining(self) -> bool:
        return self.health.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.health.draining = value

    @property
    def unhealthy(self) -> dict[str, str]:
        return self.health.unhealthy

    @property
    def health_listeners(self) -> list[Callable[[bool], None]]:
        return self.health.listeners

    @property
    def in_progress(self) -> int:
        return self.admission.in_progress

    @property
    def _probe(self) -> asyncio.Task[None] | None:
        """The health probe's task (tests reach the server's event loop through it)."""
        return self.health.probe_task

    @property
    def serving(self) -> bool:
        """Readiness: started, not draining, and every model's last inference succeeded."""
        return self.health.serving

    def not_serving_reason(self) -> str:
        return self.health.not_serving_reason()

    def drain(self) -> None:
        """Called on SIGTERM: readiness drops and new requests get 503 while accepted ones finish."""
        self.health.drain()

    def model(self, name: str | None) -> ServedModel:
        return self.registry.get(name)

    def packing_for(self, served: ServedModel, max_native_tokens: int | None) -> PackingConfig:
        return self.registry.packing_for(served, max_native_tokens)

    def check_batch(self, count: int) -> None:
        """A batch request must hold 1 to `max_batch_items` images; REST and gRPC refuse alike."""
        if count == 0:
            raise ScoringError("empty_batch", "the batch has no images")
        limit = self.settings.max_batch_items
        if count > limit:
            raise ScoringError("too_many_items", f"{count} images; at most {limit} per request")

    # --- lifecycle ------------------------------------------------------------------------------

    def _on_batch(self, name: str) -> Callable[[BatchInfo], None]:
        """After each batch of model `name`: its metrics, and its health (a failed batch makes the
        model unhealthy, a good one healthy again)."""
        record = self.metrics.batch_hook(name)

        def on_batch(info: BatchInfo) -> None:
            record(info)
            self.health.set_model_health(name, info.error)

        return on_batch

    async def start(self) -> None:
        """Loads every model, proves each with a warm-up inference, then starts its batcher."""
        keep_freed_memory(self.settings.heap_keep_mb)
        self.pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="musiq-decode")
        processes = self.settings.decode_processes
        if processes > 0:  # started first: the workers import numpy and Pillow while the models load
            self.prepare_pool = PreparePool(
                processes,
                max_pixels=self.settings.max_pixels,
                drop_padding_rows=self.settings.drop_padding_rows,
                slab_bytes=self.settings.decode_slab_mb * 2**20,
                task_timeout_s=self.settings.request_timeout_s,
                heap_keep_mb=self.settings.heap_keep_mb,
                on_replace=self.metrics.decode_worker_restarts.inc,
            )
            self.prepare_pool.start()
            self.dispatch = ThreadPoolExecutor(processes, thread_name_prefix="musiq-prepare")
        try:
            await self.registry.load(
                self._on_batch,
                upstream=None if self.settings.always_wait_queue_delay else (lambda: self.preparing),
            )
            if self.prepare_pool is not None:  # ready once the workers are (they started before the models)
                await asyncio.get_running_loop().run_in_executor(self.dispatch, self.prepare_pool.wait_ready)
        except BaseException:  # a start that fails leaves no worker process behind (stop() never runs)
            if self.dispatch:
                self.dispatch.shutdown(wait=True)
            if self.prepare_pool:
                self.prepare_pool.close()
            raise
        self.explain_queue.start()
        self.registry.choose_default()
        self.health.ready = True
        self.health.start_probing(self.registry.models, self.settings)

    async def stop(self) -> None:
        """Refuses new work, finishes what was accepted."""
        self.health.ready = False
        await self.health.stop_probing()
        await self.registry.stop()
        if self.pool:
            self.pool.shutdown(wait=True)
        if self.dispatch:
            self.dispatch.shutdown(wait=True)
        if self.prepare_pool:  # after its callers: no worker is mid-task
            self.prepare_pool.close()
        self.explain_queue.stop()

    # --- the pipeline ---------------------------------------------------------------------------

    def _decode_and_pack(self, data: bytes, packing: PackingConfig) -> Prepared:
        """Runs in the decode thread pool (`service.prepare.prepare_image` with this server's limits)."""
        return prepare_image(
            data,
            packing,
            max_pixels=self.settings.max_pixels,
            drop_padding_rows=self.settings.drop_padding_rows,
        )

    def _score_input(self, data: bytes, packing: PackingConfig) -> ScoreInput:
        return self._decode_and_pack(data, packing).score_input()

    async def _prepare_score(
        self, data: bytes, served: ServedModel, max_native_tokens: int | None
    ) -> ScoreInput:
        """What scoring needs (no pixels, no padding rows: they would cross processes for nothing)."""
        if self.prepare_pool is not None:
            pool = self.prepare_pool
            return await self._run_prepare(self.dispatch, pool.score_input, data, served, max_native_tokens)
        return await self._run_prepare(self.pool, self._score_input, data, served, max_native_tokens)

    async def _prepare(self, data: bytes, served: ServedModel, max_native_tokens: int | None) -> Prepared:
        """Everything of a prepared image: the pixels and official layout explanations map back onto."""
        if self.prepare_pool is not None:
            pool = self.prepare_pool
            return await self._run_prepare(self.dispatch, pool.prepare, data, served, max_native_tokens)
        return await self._run_prepare(self.pool, self._decode_and_pack, data, served, max_native_tokens)

    async def _run_prepare(
        self,
        executor: ThreadPoolExecutor | None,
        fn: Callable[[bytes, PackingConfig], _P],
        data: bytes,
        served: ServedModel,
        max_native_tokens: int | None,
    ) -> _P:
        """Decodes and packs off the event loop; undecodable input becomes a 4xx ScoringError, a decode
        worker that died on it a retryable 503 (the worker is replaced)."""
        packing = self.packing_for(served, max_native_tokens)
        if not data:
            raise ScoringError("empty_body", "the request carries no image bytes")
        loop = asyncio.get_running_loop()
        self.preparing += 1
        try:
            prepared = await loop.run_in_executor(executor, fn, data, packing)
        except ImageDecodeError as exc:
            raise ScoringError(decode_error_code(exc), str(exc)) from exc
        except WorkerDied as exc:
            raise ScoringError("decode_failed", str(exc), retry_after_s=1) from exc
        finally:
            self.preparing -= 1  # from here the image is in the queue (submit enqueues at once)
        self.metrics.decode_seconds.observe(prepared.timings["decode_s"])
        self.metrics.pack_seconds.observe(prepared.timings["pack_s"])
        return prepared

    async def _infer(self, served: ServedModel, prepared: ScoreInput, timeout_s: float | None) -> ScoreResult:
        """Queues a packed image on the model's batcher and waits for its score."""
        timings = prepared.timings
        tokens = served.runtime.padded_length(prepared.compute.num_tokens)
        try:
            prediction = await served.batcher.submit(
                prepared.compute,
                tokens,
                timeout_s=timeout_s,
                timings=timings,
            )
        except WouldMissDeadline as exc:
            raise ScoringError("overloaded", str(exc), retry_after_s=exc.retry_after_s) from exc
        except QueueFull as exc:
            raise ScoringError("queue_full", str(exc), retry_after_s=exc.retry_after_s) from exc
        except ShuttingDown as exc:
            raise ScoringError("shutting_down", str(exc), retry_after_s=1) from exc
        except DeadlineExceeded as exc:
            raise ScoringError("deadline_exceeded", str(exc)) from exc
        except ItemTooLarge as exc:
            raise ScoringError("too_many_tokens", str(exc)) from exc
        except InferenceTimeout as exc:
            raise ScoringError("inference_timeout", str(exc), retry_after_s=1) from exc
        except ModelStuck as exc:
            raise ScoringError("model_unavailable", str(exc), retry_after_s=1) from exc
        except Exception as exc:  # the model itself failed
            raise ScoringError(
                "inference_failed", f"inference failed: {type(exc).__name__}: {exc}", retry_after_s=1
            ) from exc
        meta = served.runtime.metadata
        self.metrics.observe_score(meta.name, prediction.score, meta.score_range)
        return ScoreResult(
            score=prediction.score,
            model=meta.name,
            model_version=meta.version,
            tokens=prepared.tokens,  # the official count, padding rows included
            timings=timings,
            distribution=prediction.distribution,
        )

    async def score(
        self,
        data: bytes,
        *,
        model: str | None = None,
        max_native_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> ScoreResult:
        """Scores one encoded image; `timeout_s` (default: the configured one) bounds the wait."""
        self.admission.check_ready()
        served = self.model(model)
        timeout_s = self.settings.request_timeout_s if timeout_s is None else timeout_s
        with self.admission.admitted(served.batcher, timeout_s):
            prepared = await self._prepare_score(data, served, max_native_tokens)
            return await self._infer(served, prepared, timeout_s)

    async def explain(
        self,
        data: bytes,
        *,
        model: str | None = None,
        max_native_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> ExplainResult:
        """The score (through the batcher, as `score` gives it) plus the per-scale attention rollout.

        Bounded apart from scoring: `explain_concurrency` rollouts run at once, at most
        `explain_max_waiting` wait (beyond: 429), and an image over `explain_max_tokens` is refused.
        """
        self.admission.check_ready()
        served = self.model(model)
        if served.explainer is None:
            raise ScoringError("no_explanations", f"model {served.runtime.name!r}: {served.explain_problem}")
        with self.explain_queue.waiting():
            timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + timeout
            with self.admission.admitted(served.batcher, timeout):
                prepared = await self._prepare(data, served, max_native_tokens)
                pixels, packed = prepared.pixels, prepared.packed
                if packed.num_tokens > self.settings.explain_max_tokens:
                    raise ScoringError(
                        "too_many_tokens",
                        f"{packed.num_tokens} tokens; explanations take at most "
                        f"{self.settings.explain_max_tokens} (lower max_native_tokens)",
                    )
                result = await self._infer(served, prepared.score_input(), timeout)
            await self.explain_queue.acquire(deadline)
        try:
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            rollout = await loop.run_in_executor(self.explain_queue.pool, served.explainer.rollout, packed)
            t1 = time.perf_counter()
            scales = await loop.run_in_executor(
                self.pool, explain_scales, pixels, packed, rollout, self.settings.explain_display_side
            )
        except Exception as exc:
            raise ScoringError("explain_failed", f"explanation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.explain_queue.release()
        result.timings["rollout_s"] = t1 - t0
        result.timings["render_s"] = time.perf_counter() - t1
        return ExplainResult(result, scales)
