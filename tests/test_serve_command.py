"""`musiq serve` as a user starts it: its flags reach the servers it runs."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import free_port


def test_serve_flags_choose_the_rest_and_grpc_ports() -> None:
    http_port, grpc_port = free_port(), free_port()
    args = ["--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "musiq serve exited"
            time.sleep(0.2)
        else:
            raise AssertionError("musiq serve did not become ready")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        proc.wait(timeout=60)
