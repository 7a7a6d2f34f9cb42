"""The protocol-independent core: bytes -> decode -> pack -> batcher -> ONNX Runtime -> result.

The REST and gRPC handlers call `ScoringCore.score`; every failure is a `ScoringError` with
a stable code and the HTTP status it maps to, so the protocol layers only translate.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.config import PackingConfig
from model.decode import ImageDecodeError, ImageTooLargeError, decode_image
from model.packing import PackedImage, compact, pack
from service.batcher import Batcher, DeadlineExceeded, ItemTooLarge, QueueFull, ShuttingDown
from service.metrics import ServiceMetrics
from service.runtime import ModelRuntime, Prediction, RuntimeOptions
from service.settings import ServiceSettings


class ScoringError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class ScoreResult:
    score: float
    model: str
    model_version: str
    tokens: int
    timings: dict[str, float]
    distribution: tuple[float, ...] | None = None


@dataclass
class ServedModel:
    runtime: ModelRuntime
    batcher: Batcher[PackedImage, Prediction]


@dataclass
class ScoringCore:
    settings: ServiceSettings
    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str = ""
    ready: bool = False
    pool: ThreadPoolExecutor | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    preparing: int = 0  # requests being decoded and packed: the batchers' possible company

    async def start(self) -> None:
        """Loads every model, proves each with a warm-up inference, then starts its batcher."""
        options = RuntimeOptions(
            intra_op_threads=self.settings.intra_op_threads,
            spin_threads=self.settings.spin_threads,
            providers=tuple(self.settings.providers),
            pad_multiple=self.settings.pad_multiple,
        )
        self.pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="musiq-decode")
        for path in self.settings.model_paths():
            runtime = await asyncio.to_thread(ModelRuntime, path, options)
            if runtime.name in self.models:
                raise ValueError(
                    f"two models are named {runtime.name!r}: {path} and {self.models[runtime.name].runtime.path}"
                )
            await asyncio.to_thread(runtime.warm_up)
            batcher: Batcher[PackedImage, Prediction] = Batcher(
                runtime.predict,
                self.settings.batcher_config(),
                on_batch=self.metrics.batch_hook(runtime.name),
                upstream=None if self.settings.always_wait_queue_delay else (lambda: self.preparing),
            )
            await batcher.start()
            self.models[runtime.name] = ServedModel(runtime, batcher)
            meta = runtime.metadata
            self.metrics.model_info.labels(meta.name, meta.version, meta.precision, runtime.providers[0]).set(
                1
            )
        self.metrics.watch_queues(
            lambda: [(name, s.batcher.depth, s.batcher.in_flight) for name, s in self.models.items()]
        )
        self.default = self.settings.default_model or next(iter(self.models))
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not among {sorted(self.models)}")
        self.ready = True

    async def stop(self) -> None:
        """Refuses new work, finishes what was accepted."""
        self.ready = False
        for served in self.models.values():
            await served.batcher.stop()
        if self.pool:
            self.pool.shutdown(wait=True)

    def model(self, name: str | None) -> ServedModel:
        name = name or self.default
        try:
            return self.models[name]
        except KeyError:
            raise ScoringError(
                404, "unknown_model", f"no model named {name!r}; serving {sorted(self.models)}"
            ) from None

    def packing_for(self, served: ServedModel, max_native_tokens: int | None) -> PackingConfig:
        cap = self.settings.max_native_tokens
        model_cap = served.runtime.packing.max_native_tokens
        limits = [c for c in (cap, model_cap) if c >= 0]
        limit = min(limits) if limits else -1
        if max_native_tokens is not None:
            if max_native_tokens < 0 or (limit >= 0 and max_native_tokens > limit):
                raise ScoringError(400, "bad_request", f"max_native_tokens must be between 0 and {limit}")
            limit = max_native_tokens
        p = served.runtime.packing
        return PackingConfig(p.patch_size, p.grid_size, p.longer_sides, limit, pad_native=False)

    def _decode_and_pack(self, data: bytes, packing: PackingConfig) -> tuple[PackedImage, int, float, float]:
        """The packed image to compute (padding rows dropped, see `compact`), its official token
        count, and the decode and pack seconds."""
        t0 = time.perf_counter()
        pixels = decode_image(data, max_pixels=self.settings.max_pixels)
        t1 = time.perf_counter()
        packed = pack(pixels, packing)
        official = packed.num_tokens
        if self.settings.drop_padding_rows:
            packed = compact(packed)
        return packed, official, t1 - t0, time.perf_counter() - t1

    async def score(
        self,
        data: bytes,
        *,
        model: str | None = None,
        max_native_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> ScoreResult:
        """Scores one encoded image; `timeout_s` (default: the configured one) bounds the wait."""
        if not self.ready:
            raise ScoringError(503, "not_ready", "the service is not ready", retry_after_s=1)
        served = self.model(model)
        packing = self.packing_for(served, max_native_tokens)
        if not data:
            raise ScoringError(400, "empty_body", "the request carries no image bytes")
        loop = asyncio.get_running_loop()
        self.preparing += 1
        try:
            packed, official_tokens, decode_s, pack_s = await loop.run_in_executor(
                self.pool, self._decode_and_pack, data, packing
            )
        except ImageTooLargeError as exc:
            raise ScoringError(413, "image_too_large", str(exc)) from exc
        except ImageDecodeError as exc:
            status = 415 if exc.reason == "unrecognised" else 400
            raise ScoringError(status, f"image_{exc.reason}", str(exc)) from exc
        finally:
            self.preparing -= 1  # from here the image is in the queue (submit enqueues at once)
        self.metrics.decode_seconds.observe(decode_s)
        self.metrics.pack_seconds.observe(pack_s)
        tokens = served.runtime.padded_length(packed.num_tokens)
        timings: dict[str, float] = {"decode_s": decode_s, "pack_s": pack_s}
        try:
            prediction = await served.batcher.submit(
                packed,
                tokens,
                timeout_s=self.settings.request_timeout_s if timeout_s is None else timeout_s,
                timings=timings,
            )
        except QueueFull as exc:
            raise ScoringError(429, "queue_full", str(exc), retry_after_s=exc.retry_after_s) from exc
        except ShuttingDown as exc:
            raise ScoringError(503, "shutting_down", str(exc), retry_after_s=1) from exc
        except DeadlineExceeded as exc:
            raise ScoringError(504, "deadline_exceeded", str(exc)) from exc
        except ItemTooLarge as exc:
            raise ScoringError(413, "too_many_tokens", str(exc)) from exc
        except Exception as exc:  # the model itself failed
            raise ScoringError(
                503, "inference_failed", f"inference failed: {type(exc).__name__}: {exc}"
            ) from exc
        meta = served.runtime.metadata
        return ScoreResult(
            score=prediction.score,
            model=meta.name,
            model_version=meta.version,
            tokens=official_tokens,
            timings=timings,
            distribution=prediction.distribution,
        )
