"""The protocol-independent core: bytes -> decode -> pack -> batcher -> ONNX Runtime -> result.

The REST and gRPC handlers call `ScoringCore.score`; every failure is a `ScoringError` with a
stable code (`service/errors.py` maps it onto HTTP and gRPC), so the protocol layers only translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import PackingConfig
from model.decode import ImageDecodeError, ImageTooLargeError, decode_image
from model.packing import PackedImage, compact, pack
from service.batcher import (
    Batcher,
    BatchInfo,
    DeadlineExceeded,
    InferenceTimeout,
    ItemTooLarge,
    ModelStuck,
    QueueFull,
    ShuttingDown,
    WouldMissDeadline,
)
from service.errors import ScoringError
from service.explain import RolloutRuntime, ScaleExplanation, explain_scales, rollout_path
from service.heap import keep_freed_memory
from service.metrics import ServiceMetrics
from service.runtime import ModelRuntime, Prediction, RuntimeOptions
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

# How a model file becomes a runtime; tests substitute runtimes that fail or hang (a test seam).
RuntimeFactory = Callable[[Path, RuntimeOptions], ModelRuntime]


@dataclass(frozen=True)
class Prepared:
    """A decoded, packed image: `packed` is the official layout (explanations map it back onto the
    image), `compute` the rows inference needs (the same, or with padding rows dropped)."""

    pixels: np.ndarray
    packed: PackedImage
    compute: PackedImage
    timings: dict[str, float]


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


@dataclass
class ServedModel:
    runtime: ModelRuntime
    batcher: Batcher[PackedImage, Prediction]
    explainer: RolloutRuntime | None = None  # its NAME.rollout.onnx, when one lies beside it
    explain_problem: str = "no explanation graph (NAME.rollout.onnx) was found beside the model"


@dataclass
class ScoringCore:
    settings: ServiceSettings
    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str = ""
    ready: bool = False
    pool: ThreadPoolExecutor | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    explain_pool: ThreadPoolExecutor | None = None
    explain_waiting: int = 0
    explain_slots: asyncio.Semaphore | None = None
    runtime_factory: RuntimeFactory = ModelRuntime
    # Models whose last inference failed, with the reason; readiness is down while any is listed.
    unhealthy: dict[str, str] = field(default_factory=dict)
    draining: bool = False  # SIGTERM received: new work is refused, accepted work finishes
    in_progress: int = 0  # requests between admission and answer (decode, queue, inference)
    # Called with the new serving state whenever it changes (the gRPC health service listens).
    health_listeners: list[Callable[[bool], None]] = field(default_factory=list)
    _probe: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        """Readiness: started, not draining, and every model's last inference succeeded."""
        return self.ready and not self.draining and not self.unhealthy

    def not_serving_reason(self) -> str:
        if self.draining:
            return "the server is shutting down"
        if not self.ready:
            return "models are loading or the server is stopping"
        return "; ".join(f"model {name} is failing: {why}" for name, why in sorted(self.unhealthy.items()))

    def _set_health(self, model: str, error: str | None) -> None:
        before = self.serving
        if error is None:
            self.unhealthy.pop(model, None)
        else:
            if model not in self.unhealthy:
                logger.warning("model %s is unhealthy: %s", model, error)
            self.unhealthy[model] = error
        if self.serving != before:
            self._notify()

    def _notify(self) -> None:
        for listener in self.health_listeners:
            listener(self.serving)

    def drain(self) -> None:
        """Called on SIGTERM: readiness drops and new requests get 503 while accepted ones finish."""
        self.draining = True
        self._notify()

    def _on_batch(self, name: str) -> Callable[[BatchInfo], None]:
        record = self.metrics.batch_hook(name)

        def on_batch(info: BatchInfo) -> None:
            record(info)
            self._set_health(name, info.error)

        return on_batch

    async def _probe_unhealthy(self) -> None:
        """While a model is unhealthy, a warm-up inference now and then tells when it recovered.

        Readiness drops, so a load balancer sends no traffic that could prove recovery. One probe
        per model at a time, bounded by the inference timeout; none while a hung batch holds the
        model, so a model that hangs never gets more than one thread.
        """
        running: dict[str, asyncio.Future[Prediction]] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.health_probe_interval_s)
            for name in list(self.unhealthy):
                served = self.models[name]
                if served.batcher.stuck or (name in running and not running[name].done()):
                    continue
                running[name] = probe = loop.run_in_executor(None, served.runtime.warm_up)
                probe.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late result is nobody's
                try:
                    await asyncio.wait_for(asyncio.shield(probe), self.settings.inference_timeout_s)
                except Exception as exc:
                    self._set_health(name, f"health probe: {type(exc).__name__}: {exc}")
                else:
                    self._set_health(name, None)

    preparing: int = 0  # requests being decoded and packed: the batchers' possible company

    async def start(self) -> None:
        """Loads every model, proves each with a warm-up inference, then starts its batcher."""
        options = RuntimeOptions(
            intra_op_threads=self.settings.intra_op_threads,
            spin_threads=self.settings.spin_threads,
            providers=tuple(self.settings.providers),
            pad_multiple=self.settings.pad_multiple,
        )
        keep_freed_memory(self.settings.heap_keep_mb)
        self.pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="musiq-decode")
        for path in self.settings.model_paths():
            runtime = await asyncio.to_thread(self.runtime_factory, path, options)
            if runtime.name in self.models:
                raise ValueError(
                    f"two models are named {runtime.name!r}: {path} and {self.models[runtime.name].runtime.path}"
                )
            await asyncio.to_thread(runtime.warm_up)
            # A second, timed warm-up gives the batcher a first throughput estimate, so that even
            # the first burst of requests is admitted only as far as it can meet its deadline.
            warm_tokens = pack(np.full((64, 64, 3), 128, np.uint8), runtime.packing).num_tokens
            start = time.perf_counter()
            await asyncio.to_thread(runtime.warm_up)
            warm_s = time.perf_counter() - start
            batcher: Batcher[PackedImage, Prediction] = Batcher(
                runtime.predict,
                self.settings.batcher_config(),
                on_batch=self._on_batch(runtime.name),
                upstream=None if self.settings.always_wait_queue_delay else (lambda: self.preparing),
            )
            batcher.seed_rate(warm_tokens / max(warm_s, 1e-6))
            await batcher.start()
            self.models[runtime.name] = served = ServedModel(runtime, batcher)
            await asyncio.to_thread(self._load_explainer, served, path, options)
            meta = runtime.metadata
            self.metrics.model_info.labels(meta.name, meta.version, meta.precision, runtime.providers[0]).set(
                1
            )
        self.metrics.watch_queues(
            lambda: [
                (name, s.batcher.depth, s.batcher.in_flight, s.batcher.config.max_queue_items)
                for name, s in self.models.items()
            ]
        )
        self.explain_pool = ThreadPoolExecutor(
            max(1, self.settings.explain_concurrency), thread_name_prefix="musiq-explain"
        )
        self.explain_slots = asyncio.Semaphore(max(1, self.settings.explain_concurrency))
        self.default = self.settings.default_model or next(iter(self.models))
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not among {sorted(self.models)}")
        self.ready = True
        self._probe = asyncio.create_task(self._probe_unhealthy(), name="musiq-health-probe")

    async def stop(self) -> None:
        """Refuses new work, finishes what was accepted."""
        self.ready = False
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        for served in self.models.values():
            await served.batcher.stop()
        for pool in (self.pool, self.explain_pool):
            if pool:
                pool.shutdown(wait=True)

    def _load_explainer(self, served: ServedModel, path: Path, options: RuntimeOptions) -> None:
        """Loads NAME.rollout.onnx if present and made from the same checkpoint as the model."""
        candidate = rollout_path(path)
        if not candidate.is_file():
            return
        explainer = RolloutRuntime(candidate, options)
        mine, theirs = served.runtime.metadata.source_sha256, explainer.metadata.source_sha256
        if mine != theirs:
            served.explain_problem = (
                f"{candidate} was exported from another checkpoint (sha256 {theirs[:12]}, model {mine[:12]}); "
                "re-export it with `musiq export --rollout`"
            )
            logger.warning("explanations disabled for %s: %s", served.runtime.name, served.explain_problem)
            return
        explainer.warm_up()  # proves the file runs before the server says ready
        served.explainer = explainer

    def model(self, name: str | None) -> ServedModel:
        name = name or self.default
        try:
            return self.models[name]
        except KeyError:
            raise ScoringError(
                "unknown_model", f"no model named {name!r}; serving {sorted(self.models)}"
            ) from None

    def check_batch(self, count: int) -> None:
        """A batch request must hold 1 to `max_batch_items` images; REST and gRPC refuse alike."""
        if count == 0:
            raise ScoringError("empty_batch", "the batch has no images")
        limit = self.settings.max_batch_items
        if count > limit:
            raise ScoringError("too_many_items", f"{count} images; at most {limit} per request")

    def packing_for(self, served: ServedModel, max_native_tokens: int | None) -> PackingConfig:
        cap = self.settings.max_native_tokens
        model_cap = served.runtime.packing.max_native_tokens
        limits = [c for c in (cap, model_cap) if c >= 0]
        limit = min(limits) if limits else -1
        if max_native_tokens is not None:
            if max_native_tokens < 0 or (limit >= 0 and max_native_tokens > limit):
                raise ScoringError("bad_request", f"max_native_tokens must be between 0 and {limit}")
            limit = max_native_tokens
        p = served.runtime.packing
        return PackingConfig(p.patch_size, p.grid_size, p.longer_sides, limit, pad_native=False)

    def _decode_and_pack(self, data: bytes, packing: PackingConfig) -> Prepared:
        """Runs in the decode pool; the rows to compute drop the padding rows (see `compact`: the
        same score for less work)."""
        t0 = time.perf_counter()
        pixels = decode_image(data, max_pixels=self.settings.max_pixels)
        t1 = time.perf_counter()
        packed = pack(pixels, packing)
        compute = compact(packed) if self.settings.drop_padding_rows else packed
        return Prepared(pixels, packed, compute, {"decode_s": t1 - t0, "pack_s": time.perf_counter() - t1})

    async def _prepare(self, data: bytes, served: ServedModel, max_native_tokens: int | None) -> Prepared:
        """Decodes and packs in the thread pool; undecodable input becomes a 4xx ScoringError."""
        packing = self.packing_for(served, max_native_tokens)
        if not data:
            raise ScoringError("empty_body", "the request carries no image bytes")
        loop = asyncio.get_running_loop()
        self.preparing += 1
        try:
            prepared = await loop.run_in_executor(self.pool, self._decode_and_pack, data, packing)
        except ImageTooLargeError as exc:
            raise ScoringError("image_too_large", str(exc)) from exc
        except ImageDecodeError as exc:
            raise ScoringError(f"image_{exc.reason}", str(exc)) from exc
        finally:
            self.preparing -= 1  # from here the image is in the queue (submit enqueues at once)
        self.metrics.decode_seconds.observe(prepared.timings["decode_s"])
        self.metrics.pack_seconds.observe(prepared.timings["pack_s"])
        return prepared

    async def _infer(self, served: ServedModel, prepared: Prepared, timeout_s: float | None) -> ScoreResult:
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
            tokens=prepared.packed.num_tokens,  # the official count, padding rows included
            timings=timings,
            distribution=prediction.distribution,
        )

    def _check_ready(self) -> None:
        if self.draining:
            raise ScoringError("shutting_down", "the server is shutting down", retry_after_s=1)
        if not self.ready:
            raise ScoringError("not_ready", "the service is not ready", retry_after_s=1)

    @contextlib.contextmanager
    def _admitted(self, served: ServedModel, timeout_s: float) -> Iterator[None]:
        """Admission comes first: past `max_in_progress` requests, or when the work ahead would
        miss this request's deadline, a new one is refused (429) before it costs any decoding, so
        overload grows neither memory nor the decode pool's backlog."""
        if self.in_progress >= self.settings.max_in_progress:
            raise ScoringError(
                "overloaded",
                f"{self.in_progress} requests in progress, the limit is {self.settings.max_in_progress}",
                retry_after_s=served.batcher.retry_after_s(),
            )
        try:
            served.batcher.check_deadline(0, timeout_s)
        except WouldMissDeadline as exc:
            raise ScoringError("overloaded", str(exc), retry_after_s=exc.retry_after_s) from exc
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1

    async def score(
        self,
        data: bytes,
        *,
        model: str | None = None,
        max_native_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> ScoreResult:
        """Scores one encoded image; `timeout_s` (default: the configured one) bounds the wait."""
        self._check_ready()
        served = self.model(model)
        timeout_s = self.settings.request_timeout_s if timeout_s is None else timeout_s
        with self._admitted(served, timeout_s):
            prepared = await self._prepare(data, served, max_native_tokens)
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
        self._check_ready()
        served = self.model(model)
        if served.explainer is None:
            raise ScoringError("no_explanations", f"model {served.runtime.name!r}: {served.explain_problem}")
        if self.explain_waiting >= self.settings.explain_max_waiting:
            raise ScoringError("queue_full", "too many explanations are waiting", retry_after_s=1)
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        self.explain_waiting += 1
        try:
            with self._admitted(served, timeout):
                prepared = await self._prepare(data, served, max_native_tokens)
                pixels, packed = prepared.pixels, prepared.packed
                if packed.num_tokens > self.settings.explain_max_tokens:
                    raise ScoringError(
                        "too_many_tokens",
                        f"{packed.num_tokens} tokens; explanations take at most "
                        f"{self.settings.explain_max_tokens} (lower max_native_tokens)",
                    )
                result = await self._infer(served, prepared, timeout)
            assert self.explain_slots is not None
            try:
                await asyncio.wait_for(self.explain_slots.acquire(), max(0.0, deadline - time.monotonic()))
            except TimeoutError as exc:
                raise ScoringError("deadline_exceeded", "no explanation slot before the deadline") from exc
        finally:
            self.explain_waiting -= 1
        try:
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            rollout = await loop.run_in_executor(self.explain_pool, served.explainer.rollout, packed)
            t1 = time.perf_counter()
            scales = await loop.run_in_executor(
                self.pool, explain_scales, pixels, packed, rollout, self.settings.explain_display_side
            )
        except Exception as exc:
            raise ScoringError("explain_failed", f"explanation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.explain_slots.release()
        result.timings["rollout_s"] = t1 - t0
        result.timings["render_s"] = time.perf_counter() - t1
        return ExplainResult(result, scales)
