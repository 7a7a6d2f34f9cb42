"""gRPC (grpcio asyncio): `musiq.v1.Quality` over the same scoring core as REST, plus the
standard health service and server reflection. Client deadlines bound the queue wait.

Refusals carry the REST API's error code in the status message (`code: message`), with the gRPC
status `service/errors.py` gives that code. Overload and "too large" share RESOURCE_EXHAUSTED,
which a client's retry policy may list as retryable; the trailing `grpc-retry-pushback-ms` tells
them apart, as gRPC's retry policy reads it (gRFC A6): the Retry-After in milliseconds when a retry
may help, a negative value (do not retry) when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from musiq_client.gen import quality_pb2, quality_pb2_grpc
from service.core import ScoreResult, ScoringCore
from service.errors import ScoringError
from service.security import ApiKeyInterceptor, ApiKeys, grpc_server_credentials
from service.settings import ServiceSettings

T = TypeVar("T")

SERVICE_NAME = quality_pb2.DESCRIPTOR.services_by_name["Quality"].full_name
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback(exc: ScoringError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that tells a retrying client when to come back, or not to.

    RESOURCE_EXHAUSTED means overload (retryable) or too large (not): the pushback tells them apart,
    in the same whole seconds REST's Retry-After says. UNAVAILABLE carries none: the client's own
    backoff retries it, on the next replica."""
    if exc.grpc_status != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ()
    if exc.retryable:
        return ((PUSHBACK_KEY, str(1000 * max(1, math.ceil(exc.retry_after_s or 1)))),)
    return ((PUSHBACK_KEY, "-1"),)


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


def _interrupted(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """How a call that did not finish on its own ended: its deadline passed, or the client left."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class QualityServicer(quality_pb2_grpc.QualityServicer):
    def __init__(self, core: ScoringCore) -> None:
        self.core = core

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The time this call may take: the client's deadline, within the server's own timeout."""
        timeout = self.core.settings.request_timeout_s
        remaining = context.time_remaining()
        return timeout if remaining is None else min(timeout, max(0.0, remaining))

    @staticmethod
    def _cap(request: quality_pb2.ScoreRequest) -> int | None:
        return request.max_native_tokens if request.HasField("max_native_tokens") else None

    async def _score(
        self, request: quality_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> ScoreResult:
        return await self.core.score(
            request.image,
            model=request.model or None,
            max_native_tokens=self._cap(request),
            timeout_s=self._timeout(context),
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

    @contextlib.asynccontextmanager
    async def _call(self, route: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Observes one call with the status it really ended with, and turns a ScoringError raised
        inside into that status (with its retry pushback)."""
        start, status = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
        except ScoringError as exc:
            self.core.metrics.rejected.labels(exc.code).inc()
            status = exc.grpc_status
            await context.abort(status, f"{exc.code}: {exc.message}", trailing_metadata=pushback(exc))
        except (asyncio.CancelledError, GeneratorExit):  # the client left, or its deadline passed
            status = _interrupted(context)
            raise
        except Exception:
            status = grpc.StatusCode.UNKNOWN
            raise
        else:
            # A stream whose requests stop because the call was cancelled or ran out its deadline
            # returns normally here; its client saw that status, not OK.
            remaining = context.time_remaining()
            if context.cancelled() or (remaining is not None and remaining <= 0):
                status = _interrupted(context)
        finally:
            self.core.metrics.requests.labels("grpc", route, status.name).inc()
            self.core.metrics.request_seconds.labels("grpc", route).observe(time.perf_counter() - start)

    async def _answer(self, route: str, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        async with self._call(route, context):
            return await work
        raise AssertionError("unreachable: a refusal aborts the call")

    async def Score(
        self, request: quality_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> quality_pb2.ScoreReply:
        return _reply(request.id, await self._answer("Score", context, self._score(request, context)))

    async def Explain(
        self, request: quality_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> quality_pb2.ExplainReply:
        explained = await self._answer(
            "Explain",
            context,
            self.core.explain(
                request.image,
                model=request.model or None,
                max_native_tokens=self._cap(request),
                timeout_s=self._timeout(context),
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

    async def ScoreBatch(
        self, request: quality_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> quality_pb2.ScoreBatchReply:
        async def score_all() -> list[quality_pb2.ScoreReply]:
            self.core.check_batch(len(request.items))  # as REST: empty 400, too many 413
            return list(await asyncio.gather(*(self._safe(item, context) for item in request.items)))

        replies = await self._answer("ScoreBatch", context, score_all())
        return quality_pb2.ScoreBatchReply(results=replies)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[quality_pb2.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[quality_pb2.ScoreReply]:
        """Scores items as they arrive, replying in completion order (each reply carries its id)."""
        done: asyncio.Queue[quality_pb2.ScoreReply | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def one(request: quality_pb2.ScoreRequest) -> None:
            await done.put(await self._safe(request, context))

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.gather(*list(pending))
            finally:
                done.put_nowait(None)  # the replies end, also when reading the requests failed

        async with self._call("ScoreStream", context):
            feeder = asyncio.create_task(feed())
            try:
                while (reply := await done.get()) is not None:
                    yield reply
                await feeder  # raises what ended the requests early, if anything did
            finally:
                feeder.cancel()
                for task in list(pending):
                    task.cancel()


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
    # generated by grpc_tools without annotations
    quality_pb2_grpc.add_QualityServicer_to_server(QualityServicer(core), server)  # type: ignore[no-untyped-call]
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
    server.musiq_health = health_servicer  # flipped to NOT_SERVING on shutdown
    return server, bound


async def stop_grpc(server: grpc.aio.Server, grace_s: float = 30.0) -> None:
    """Stops taking new calls at once (health NOT_SERVING) and lets running ones finish."""
    health_servicer = getattr(server, "musiq_health", None)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
