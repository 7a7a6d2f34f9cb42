"""`musiq serve` as a user starts it: its --port and --grpc-port flags reach the servers it runs."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.reliability.serve import serve_process


def test_serve_flags_choose_the_rest_and_grpc_ports() -> None:
    # serve_process passes --port and --grpc-port and waits for /readyz on that port.
    with serve_process() as srv, grpc.insecure_channel(srv.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
