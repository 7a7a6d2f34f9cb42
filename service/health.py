"""Readiness: whether this server should get traffic, why not, and who is told when that changes.

Why apart from the core: readiness has three independent causes (started, draining on SIGTERM, a
model whose last inference failed) and two audiences (REST's /readyz, the gRPC health service), and
a failing model needs a background probe to notice its recovery, since a server that is not ready
gets no traffic that could prove it. Keeping that state machine here lets admission ask one
question (`serving`) and keeps the probe's timing rules in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.registry import ServedModel
from service.runtime import Prediction
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass
class Health:
    """The serving state: `ready` (models loaded, not stopped), `draining` (SIGTERM received: new
    work is refused, accepted work finishes) and `unhealthy` (models whose last inference failed,
    with the reason). Listeners hear every change of `serving` made through `set_model_health` or
    `drain`; `ready` and `draining` set directly (start, stop, tests) notify nobody."""

    ready: bool = False
    draining: bool = False
    unhealthy: dict[str, str] = field(default_factory=dict)
    # Called with the new serving state whenever it changes (the gRPC health service listens).
    listeners: list[Callable[[bool], None]] = field(default_factory=list)
    probe_task: asyncio.Task[None] | None = None

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

    def set_model_health(self, model: str, error: str | None) -> None:
        """Records the outcome of `model`'s last inference (None: it succeeded)."""
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
        for listener in self.listeners:
            listener(self.serving)

    def drain(self) -> None:
        """Called on SIGTERM: readiness drops and new requests get 503 while accepted ones finish."""
        self.draining = True
        self._notify()

    def start_probing(self, models: Mapping[str, ServedModel], settings: ServiceSettings) -> None:
        """Starts `_probe_unhealthy` as a task of the running loop (until `stop_probing`)."""
        self.probe_task = asyncio.create_task(
            self._probe_unhealthy(models, settings), name="musiq-health-probe"
        )

    async def stop_probing(self) -> None:
        if self.probe_task is not None:
            self.probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.probe_task

    async def _probe_unhealthy(self, models: Mapping[str, ServedModel], settings: ServiceSettings) -> None:
        """While a model is unhealthy, a warm-up inference now and then tells when it recovered.

        Readiness drops, so a load balancer sends no traffic that could prove recovery. One probe
        per model at a time, bounded by the inference timeout; none while a hung batch holds the
        model, so a model that hangs never gets more than one thread.
        """
        running: dict[str, asyncio.Future[Prediction]] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(settings.health_probe_interval_s)
            for name in list(self.unhealthy):
                served = models[name]
                if served.batcher.stuck or (name in running and not running[name].done()):
                    continue
                running[name] = probe = loop.run_in_executor(None, served.runtime.warm_up)
                probe.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late result is nobody's
                try:
                    await asyncio.wait_for(asyncio.shield(probe), settings.inference_timeout_s)
                except Exception as exc:
                    self.set_model_health(name, f"health probe: {type(exc).__name__}: {exc}")
                else:
                    self.set_model_health(name, None)
