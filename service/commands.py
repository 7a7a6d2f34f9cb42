"""`musiq serve`."""

from __future__ import annotations

import argparse
import math
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve models over REST (settings also from MUSIQ_* variables)")
    s.add_argument(
        "--model", action="append", default=None, help="ONNX file to serve (repeatable; default: embedded)"
    )
    s.add_argument("--host", help="bind address (default 0.0.0.0)")
    s.add_argument("--port", type=int, help="REST port (default 8000)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0: any free port)")
    s.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.rest import create_app
    from service.settings import ServiceSettings

    class DrainingServer(uvicorn.Server):
        """On SIGTERM / SIGINT readiness drops and new requests (REST and gRPC) get 503 at once,
        while uvicorn stops accepting connections and lets running requests finish within
        MUSIQ_SHUTDOWN_GRACE_S; then the lifespan drains the gRPC server and the batchers."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.core.drain()
            super().handle_exit(sig, frame)

    given = {"models": args.model, "host": args.host, "http_port": args.port, "grpc_port": args.grpc_port}
    settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        log_level="info",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
    )
    DrainingServer(config).run()
    return 0
