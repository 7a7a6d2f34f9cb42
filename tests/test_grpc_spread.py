"""Issue 14: gRPC calls spread over replicas. HTTP/2 keeps one connection per client, so a client
balancing `pick_first` (gRPC's default) sends every call to one server; `GrpcClient` balances
`round_robin` over every address its target resolves to, and the server's maximum connection age
makes clients reconnect (and re-resolve) now and then.

Two real `musiq serve` processes on 127.0.0.1 and one `GrpcClient` naming both: both get calls;
one stops (SIGTERM, graceful) while calls go on and none is lost."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from musiq_client import GrpcClient, ScoreResult
from service import grpc_server
from service.settings import ServiceSettings
from tests.helpers import jpeg
from tests.reliability.serve import ServerProcess, serve_process

# Small requests: the test is about where calls go, not about scoring.
IMAGE = jpeg(64, 96, seed=14)


def grpc_scores(server: ServerProcess) -> int:
    """Score calls the server answered OK, from its own /metrics (read over REST)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return round(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "musiq_requests_total"
            and sample.labels == {"protocol": "grpc", "route": "Score", "code": "OK"}
        )
    )


def scored(result: Any) -> bool:
    return isinstance(result, ScoreResult) and math.isfinite(result.score)


def test_round_robin_spreads_calls_and_loses_none_when_a_replica_stops() -> None:
    started = time.monotonic()
    env = {"MUSIQ_SHUTDOWN_GRACE_S": "5"}
    with ExitStack() as stack:
        a = stack.enter_context(serve_process(env, ready_timeout_s=40))
        b = stack.enter_context(serve_process(env, ready_timeout_s=40))
        client = stack.enter_context(GrpcClient(f"ipv4:{a.grpc_target},{b.grpc_target}", timeout_s=20))

        # 1. Both replicas get calls. With pick_first, all 20 would go to the first address.
        first = [client.score(IMAGE) for _ in range(20)]
        assert all(map(scored, first))
        on_a, on_b = grpc_scores(a), grpc_scores(b)
        assert on_a + on_b == 20
        assert on_a >= 5 and on_b >= 5, f"calls not spread: {on_a} on one server, {on_b} on the other"

        # 2. `a` stops gracefully while two threads keep calling: every call still gets a score
        # (a draining server answers UNAVAILABLE, which the client retries on the next replica).
        results: list[Any] = []
        sent = threading.Semaphore(0)

        def call() -> Any:
            sent.release()
            try:
                return client.score(IMAGE)
            except Exception as exc:  # reported below, with the others
                return exc

        with futures.ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(call) for _ in range(20)]
            for _ in range(6):  # a few calls are under way, on both replicas
                sent.acquire()
            a.sigterm()
            assert not all(f.done() for f in pending)  # it stops while calls are still to come
            results = [f.result(timeout=30) for f in pending]
        assert a.proc.wait(timeout=20) in (0, -15), a.log()[-2000:]  # uvicorn re-raises SIGTERM
        lost = [r for r in results if not scored(r)]
        assert not lost, f"{len(lost)} of 20 calls got no score: {lost[:3]}"

        # 3. `a` is gone: the remaining replica takes the later calls, all of them.
        before = grpc_scores(b)
        later = [client.score(IMAGE) for _ in range(5)]
        assert all(map(scored, later))
        assert grpc_scores(b) - before == 5
    assert time.monotonic() - started < 60


# --- the server's maximum connection age -------------------------------------------------------


def test_server_options_carry_the_connection_age_in_ms() -> None:
    options = dict(grpc_server.server_options(ServiceSettings()))
    assert options["grpc.max_connection_age_ms"] == 300_000  # 5 min
    assert options["grpc.max_connection_age_grace_ms"] == 600_000  # 10 min
    assert options["grpc.max_receive_message_length"] == ServiceSettings().max_body_bytes
    short = dict(
        grpc_server.server_options(
            ServiceSettings(grpc_max_connection_age_s=0.25, grpc_max_connection_age_grace_s=1.5)
        )
    )
    assert (short["grpc.max_connection_age_ms"], short["grpc.max_connection_age_grace_ms"]) == (250, 1500)
    never = dict(grpc_server.server_options(ServiceSettings(grpc_max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in never and "grpc.max_connection_age_grace_ms" not in never


def test_start_grpc_uses_the_server_options(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServiceSettings(grpc_max_connection_age_s=7)
    seen: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def fake_server(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(grpc_server.grpc.aio, "server", fake_server)
    with pytest.raises(Captured):
        # A stand-in for the core: the server options come from its settings alone.
        asyncio.run(grpc_server.start_grpc(SimpleNamespace(settings=settings), "127.0.0.1", 0))  # type: ignore[arg-type]
    assert seen["options"] == grpc_server.server_options(settings)


@contextmanager
def plain_server(settings: ServiceSettings, name: str, behavior: Any) -> Iterator[grpc.Channel]:
    """A bare gRPC server built with `server_options(settings)`, one bytes-in bytes-out method
    `/t.T/<name>` running `behavior`, and a channel to it (no model: cheap)."""
    server = grpc.server(futures.ThreadPoolExecutor(2), options=grpc_server.server_options(settings))
    handler = grpc.unary_unary_rpc_method_handler(behavior)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {name: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        server.stop(None)


def peers_seen(settings: ServiceSettings, seconds: float) -> set[str]:
    """Client addresses (ip:port, a new port per connection) the server sees from one channel
    making a unary call every 20 ms."""
    with plain_server(settings, "Peer", lambda request, context: context.peer().encode()) as channel:
        get = channel.unary_unary("/t.T/Peer")
        seen = set()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seen.add(get(b"", timeout=5).decode())
            time.sleep(0.02)
        return seen


def test_a_short_connection_age_makes_the_client_reconnect() -> None:
    """The age is honoured, and a connection with no call running closes at once after its GOAWAY,
    long before the grace (60 s here) ends: a long grace does not delay rebalancing."""
    aged = ServiceSettings(grpc_max_connection_age_s=0.2, grpc_max_connection_age_grace_s=60)
    assert len(peers_seen(aged, 1.5)) >= 3
    assert len(peers_seen(ServiceSettings(grpc_max_connection_age_s=0), 1.0)) == 1


def test_a_call_outliving_age_and_grace_is_cut() -> None:
    """Why the grace is long (service/settings.py): a call still running when it ends fails, as a
    long ScoreStream would; within the grace it finishes."""

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(0.8)
        return b"done"

    for grace_s, cut in ((0.2, True), (3.0, False)):
        settings = ServiceSettings(grpc_max_connection_age_s=0.2, grpc_max_connection_age_grace_s=grace_s)
        with plain_server(settings, "Slow", slow) as channel:
            call = channel.unary_unary("/t.T/Slow")
            if cut:
                with pytest.raises(grpc.RpcError) as err:
                    call(b"", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            else:
                assert call(b"", timeout=10) == b"done"
