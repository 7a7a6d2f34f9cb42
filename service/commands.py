"""`musiq serve`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="serve models over REST (settings also from MUSIQ_* variables)")
    s.add_argument(
        "--model", action="append", default=None, help="ONNX file to serve (repeatable; default: embedded)"
    )
    s.add_argument("--host", help="bind address (default 0.0.0.0)")
    s.add_argument("--port", type=int, help="REST port (default 8000)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0: any free port)")
    s.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import serve
    from service.settings import ServiceSettings

    given = {"models": args.model, "host": args.host, "http_port": args.port, "grpc_port": args.grpc_port}
    settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    serve(settings)
    return 0
