"""The test servers take their own ports: no gap between choosing a port and listening on it
(issue 16, port races).

A port picked by binding and closing a socket (`free_port`) can be taken by another process before the
server binds it; the readiness probe then talks to that other process. Here an impostor that answers
every GET with 200 holds the port `free_port` would hand out: a server helper that still used it would
return the impostor's address.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

import tests.helpers
import tests.reliability.serve
from service.settings import ServiceSettings
from tests.helpers import start_server
from tests.reliability.serve import serve_process


class Impostor(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "ready", "default": "impostor", "models": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def taken_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A port held by an impostor, handed out by every `free_port` the helpers may call."""
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    port = impostor.server_address[1]
    monkeypatch.setattr(tests.helpers, "free_port", lambda: port)
    monkeypatch.setattr(tests.reliability.serve, "free_port", lambda: port, raising=False)
    yield port
    impostor.shutdown()
    impostor.server_close()


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["default"]


def test_start_server_listens_on_a_socket_it_holds(taken_port: int) -> None:
    srv, thread, url = start_server(ServiceSettings(host="127.0.0.1", grpc_enabled=False))
    try:
        assert not url.endswith(f":{taken_port}")
        assert served_model(url) == "musiq-clive-small"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_serve_process_learns_its_ports_from_the_server(taken_port: int) -> None:
    with serve_process(ready_timeout_s=60) as srv:
        assert not srv.url.endswith(f":{taken_port}") and not srv.grpc_target.endswith(f":{taken_port}")
        assert served_model(srv.url) == "musiq-clive-small"
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(srv.grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
