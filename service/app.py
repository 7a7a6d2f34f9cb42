"""The composition root: settings -> one scoring core -> the REST app and the gRPC server over it.

Why here: the transports are adapters over the core and must not start one another (REST's lifespan
used to start gRPC, so REST sat above gRPC in the import graph). This module is the only one that
imports both; `musiq serve` and the tests' servers are built by it.

Start order: the core (models loaded and warmed up), then gRPC, whose port is logged as
"gRPC server running on HOST:PORT" before uvicorn's own line. Stop order, on SIGTERM: readiness drops
at once (`drain`: REST 503, gRPC health NOT_SERVING, new calls refused), uvicorn lets running HTTP
requests finish, then gRPC stops taking calls and lets running ones finish, then the batchers score
what they had queued and stop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import rest
from service.core import RuntimeFactory, ScoringCore
from service.grpc_server import start_grpc, stop_grpc
from service.settings import ServiceSettings


def build_core(settings: ServiceSettings, runtime_factory: RuntimeFactory | None = None) -> ScoringCore:
    """`runtime_factory` replaces ModelRuntime (tests inject failing or hanging models)."""
    if runtime_factory is None:
        return ScoringCore(settings)
    return ScoringCore(settings, runtime_factory=runtime_factory)


@asynccontextmanager
async def both_transports(app: FastAPI) -> AsyncIterator[None]:
    """The REST app's lifespan: the core, and gRPC beside REST when enabled."""
    core = rest.core_of(app)
    settings = core.settings
    await core.start()
    grpc_server = None
    try:
        if settings.grpc_enabled:
            grpc_server, app.state.grpc_port = await start_grpc(core, settings.host, settings.grpc_port)
            # Beside uvicorn's "Uvicorn running on ..." line, in its format: with --grpc-port 0 this
            # is how a user (and tests/reliability/serve.py) learns the port.
            logging.getLogger("uvicorn.error").info(
                "gRPC server running on %s:%d", settings.host, app.state.grpc_port
            )
        yield
    finally:
        if grpc_server is not None:
            await stop_grpc(grpc_server, settings.shutdown_grace_s)
        await core.stop()


def create_app(
    settings: ServiceSettings | None = None, runtime_factory: RuntimeFactory | None = None
) -> FastAPI:
    """The whole service as one ASGI app: REST routes, with gRPC run by its lifespan.

    `app.state.core` is the core; `app.state.grpc_port` the gRPC port once started."""
    core = build_core(settings or ServiceSettings(), runtime_factory)
    return rest.create_app(core=core, lifespan=both_transports)


def serve(settings: ServiceSettings) -> None:
    """Runs the service until SIGTERM / SIGINT (`musiq serve`)."""
    import uvicorn

    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM / SIGINT readiness drops and new requests (REST and gRPC) get 503 at once,
        while uvicorn stops accepting connections and lets running requests finish within
        MUSIQ_SHUTDOWN_GRACE_S; then the lifespan drains the gRPC server and the batchers."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            rest.core_of(app).drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_level="info",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
    )
    DrainingServer(config).run()
