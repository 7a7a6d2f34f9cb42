"""gRPC (grpcio asyncio): `musiq.v1.Quality` over the same scoring core as REST, plus the
standard health service and server reflection. Client deadlines bound the queue wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.core import ScoreResult, ScoringCore, ScoringError
from service.gen import quality_pb2, quality_pb2_grpc
from service.security import ApiKeyInterceptor, ApiKeys, grpc_server_credentials
from service.settings import ServiceSettings

T = TypeVar("T")

SERVICE_NAME = quality_pb2.DESCRIPTOR.services_by_name["Quality"].full_name

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _reply(request_id: str, result: ScoreResult) -> quality_pb2.ScoreReply:
    t = result.timings
    return quality_pb2.ScoreReply(
        id=request_id,
        score=result.score,
        model=result.model,
        model_version=result.model_version,
        tokens=result.tokens,
        timings=quality_pb2.Timings(
            decode_s=t.get("decode_s", 0.0),
            pack_s=t.get("pack_s", 0.0),
            queue_s=t.get("queue_s", 0.0),
            infer_s=t.get("infer_s", 0.0),
        ),
        distribution=list(result.distribution or ()),
    )


class QualityServicer(quality_pb2_grpc.QualityServicer):
    def __init__(self, core: ScoringCore) -> None:
        self.core = core

    async def _score(
        self, request: quality_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> ScoreResult:
        remaining = context.time_remaining()
        timeout = self.core.settings.request_timeout_s
        if remaining is not None:
            timeout = min(timeout, max(0.0, remaining))
        cap = request.max_native_tokens if request.HasField("max_native_tokens") else None
        return await self.core.score(
            request.image, model=request.model or None, max_native_tokens=cap, timeout_s=timeout
        )

    async def _safe(
        self, request: quality_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> quality_pb2.ScoreReply:
        """A reply that carries its error instead of failing the call (batch and stream items)."""
        try:
            return _reply(request.id, await self._score(request, context))
        except ScoringError as exc:
            self.core.metrics.rejected.labels(exc.code).inc()
            return quality_pb2.ScoreReply(
                id=request.id, error=quality_pb2.Error(code=exc.code, message=exc.message)
            )

    async def _observe(self, route: str, code: grpc.StatusCode, start: float) -> None:
        self.core.metrics.requests.labels("grpc", route, code.name).inc()
        self.core.metrics.request_seconds.labels("grpc", route).observe(time.perf_counter() - start)

    async def _answer(self, method: str, context, work: Awaitable[T]) -> T:  # type: ignore[no-untyped-def]
        """Awaits `work`, observes the call, and turns a ScoringError into the matching status."""
        start = time.perf_counter()
        try:
            result = await work
        except ScoringError as exc:
            self.core.metrics.rejected.labels(exc.code).inc()
            status = _STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
            await self._observe(method, status, start)
            await context.abort(status, f"{exc.code}: {exc.message}")
        await self._observe(method, grpc.StatusCode.OK, start)
        return result

    async def Score(self, request, context):  # type: ignore[no-untyped-def]
        result = await self._answer("Score", context, self._score(request, context))
        return _reply(request.id, result)

    async def Explain(self, request, context):  # type: ignore[no-untyped-def]
        remaining = context.time_remaining()
        timeout = self.core.settings.request_timeout_s
        if remaining is not None:
            timeout = min(timeout, max(0.0, remaining))
        cap = request.max_native_tokens if request.HasField("max_native_tokens") else None
        explained = await self._answer(
            "Explain",
            context,
            self.core.explain(
                request.image, model=request.model or None, max_native_tokens=cap, timeout_s=timeout
            ),
        )
        return quality_pb2.ExplainReply(
            score=_reply(request.id, explained.result),
            scales=[
                quality_pb2.ScaleExplanation(
                    scale_id=s.scale_id,
                    longer_side=s.longer_side or 0,
                    height=s.height,
                    width=s.width,
                    grid_h=s.grid_h,
                    grid_w=s.grid_w,
                    weights=s.weights.ravel().tolist(),
                    share=s.share,
                    heatmap_png=s.heatmap_png,
                )
                for s in explained.scales
            ],
        )

    async def ScoreBatch(self, request, context):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        limit = self.core.settings.max_batch_items
        if len(request.items) > limit:
            await self._observe("ScoreBatch", grpc.StatusCode.RESOURCE_EXHAUSTED, start)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(request.items)} images; at most {limit}"
            )
        replies = await asyncio.gather(*(self._safe(item, context) for item in request.items))
        await self._observe("ScoreBatch", grpc.StatusCode.OK, start)
        return quality_pb2.ScoreBatchReply(results=replies)

    async def ScoreStream(self, request_iterator, context) -> AsyncIterator[quality_pb2.ScoreReply]:  # type: ignore[no-untyped-def]
        """Scores items as they arrive, replying in completion order (each reply carries its id)."""
        start = time.perf_counter()
        done: asyncio.Queue[quality_pb2.ScoreReply | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def one(request: quality_pb2.ScoreRequest) -> None:
            await done.put(await self._safe(request, context))

        async def feed() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending))
            await done.put(None)

        feeder = asyncio.create_task(feed())
        try:
            while (reply := await done.get()) is not None:
                yield reply
        finally:
            feeder.cancel()
            for task in list(pending):
                task.cancel()
            await self._observe("ScoreStream", grpc.StatusCode.OK, start)


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """gRPC server channel options: message limits, and a maximum connection age with its grace.

    The age makes every client reconnect now and then (GOAWAY), so that one long-lived HTTP/2
    connection does not pin a client to one replica forever (issue 14; the defaults are argued in
    service/settings.py). An age of 0 leaves connections unbounded, gRPC's own default."""
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.max_send_message_length", 16 * 2**20),
    ]
    if settings.grpc_max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(settings.grpc_max_connection_age_s * 1000))),
            (
                "grpc.max_connection_age_grace_ms",
                max(0, round(settings.grpc_max_connection_age_grace_s * 1000)),
            ),
        ]
    return options


async def start_grpc(core: ScoringCore, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Starts the gRPC server on (host, port) (port 0: any free port); returns it and its port."""
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(ApiKeys.from_settings(core.settings))],
        options=server_options(core.settings),
    )
    quality_pb2_grpc.add_QualityServicer_to_server(QualityServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = grpc_server_credentials(core.settings)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()

    async def publish(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    await publish(core.serving)
    # Readiness changes (a failing model, its recovery, draining) reach gRPC health checks too.
    health_tasks: set[asyncio.Task[None]] = set()

    def on_health(serving: bool) -> None:
        task = asyncio.get_running_loop().create_task(publish(serving))
        health_tasks.add(task)
        task.add_done_callback(health_tasks.discard)

    core.health_listeners.append(on_health)
    server.musiq_health = health_servicer  # type: ignore[attr-defined]  # flipped to NOT_SERVING on shutdown
    return server, bound


async def stop_grpc(server: grpc.aio.Server, grace_s: float = 30.0) -> None:
    """Stops taking new calls at once (health NOT_SERVING) and lets running ones finish."""
    health_servicer = getattr(server, "musiq_health", None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
