"""The model registry: which models this server serves, each with its runtime, batcher and explainer.

Why apart from the core: loading is the slow, start-up-only part (model files, warm-up inferences,
the batchers' first throughput estimate, explanation graphs), and it changes for different reasons
than admission or health. The core asks the registry for a model by name and for the packing an
image gets; it never touches a model file itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import PackingConfig
from model.packing import PackedImage, pack
from service.batcher import Batcher, BatchInfo
from service.errors import ScoringError
from service.explain import RolloutRuntime, rollout_path
from service.metrics import ServiceMetrics
from service.runtime import ModelRuntime, Prediction, RuntimeOptions
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

# How a model file becomes a runtime; tests substitute runtimes that fail or hang (a test seam).
RuntimeFactory = Callable[[Path, RuntimeOptions], ModelRuntime]


@dataclass
class ServedModel:
    runtime: ModelRuntime
    batcher: Batcher[PackedImage, Prediction]
    explainer: RolloutRuntime | None = None  # its NAME.rollout.onnx, when one lies beside it
    explain_problem: str = "no explanation graph (NAME.rollout.onnx) was found beside the model"


class ModelRegistry:
    """Every configured model, loaded and proven by `load`; `get` finds one by name (or the default).

    `on_batch(name)` gives each model's batcher its after-batch hook (metrics and health, which the
    core wires up), and `upstream` is the batchers' count of requests still being decoded (see
    `Batcher`); the registry only passes them on.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        runtime_factory: RuntimeFactory = ModelRuntime,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime_factory = runtime_factory
        self.models: dict[str, ServedModel] = {}
        self.default = ""

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            intra_op_threads=self.settings.intra_op_threads,
            spin_threads=self.settings.spin_threads,
            providers=tuple(self.settings.providers),
            pad_multiple=self.settings.pad_multiple,
            io_binding=self.settings.io_binding,
            split_encoder=self.settings.split_encoder,
            encoder_chunk=self.settings.encoder_chunk,
        )

    async def load(
        self,
        on_batch: Callable[[str], Callable[[BatchInfo], None]],
        upstream: Callable[[], int] | None,
    ) -> None:
        """Loads every model, proves each with a warm-up inference, then starts its batcher."""
        options = self.runtime_options()
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
                self.settings.batcher_config(runtime.providers[0]),
                on_batch=on_batch(runtime.name),
                upstream=upstream,
            )
            batcher.seed_rate(warm_tokens / max(warm_s, 1e-6))
            cfg = batcher.config
            logger.info(
                "model %s on %s: batches of <= %d images, <= %d tokens, %.1f ms queue delay, "
                "lengths padded to a multiple of %d, inputs by %s",
                runtime.name, runtime.providers[0], cfg.max_batch_size, cfg.max_batch_tokens,
                cfg.max_queue_delay_s * 1e3, runtime.pad_multiple, runtime.host_memory,
            )  # fmt: skip
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

    def choose_default(self) -> None:
        """The configured default model, or the first one loaded."""
        self.default = self.settings.default_model or next(iter(self.models))
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not among {sorted(self.models)}")

    async def stop(self) -> None:
        """Each batcher scores what it had accepted, then stops."""
        for served in self.models.values():
            await served.batcher.stop()

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

    def get(self, name: str | None) -> ServedModel:
        """The model called `name` (None or "": the default); an unknown name is `unknown_model`."""
        name = name or self.default
        try:
            return self.models[name]
        except KeyError:
            raise ScoringError(
                "unknown_model", f"no model named {name!r}; serving {sorted(self.models)}"
            ) from None

    def packing_for(self, served: ServedModel, max_native_tokens: int | None) -> PackingConfig:
        """The model's packing with the native-resolution token cap this request may use: the
        smaller of the server's and the model's cap, or the request's own if it is within them."""
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
