"""Deadlines on a real server on 127.0.0.1 (issue 16): a gRPC client's deadline reaches the core and
its deadline-aware admission, admission refuses before any decoding, the in-progress limit refuses
at once, and a 504 comes when the deadline passes, not when the batch would have left.

The model is held behind a gate (tests/gated.py), so "work is running ahead" lasts exactly as long
as a test needs; its slow warm-up seeds the batcher with a slow, known throughput.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from musiq_client.gen import quality_pb2
from service.settings import ServiceSettings
from tests.gated import GatedServer, gated_server
from tests.helpers import jpeg, start_server


@pytest.fixture(scope="module")
def server() -> Iterator[GatedServer]:
    with gated_server() as running:
        yield running


def test_admission_refuses_before_decoding(server: GatedServer) -> None:
    """Under overload a refusal costs no decoding: an undecodable image is refused `overloaded`,
    not reported as undecodable (which would mean it was decoded first)."""
    batcher = server.core.models[server.core.default].batcher
    with server.hold() as held:
        deadline = 1.5 * batcher.expected_wait_s(0)
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Score(quality_pb2.ScoreRequest(image=b"not an image"), timeout=deadline)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert (err.value.details() or "").startswith("overloaded: "), err.value.details()
    assert held.result().status_code == 200


def test_the_in_progress_limit_refuses_at_once() -> None:
    """Past `max_in_progress` a request is refused (429 `overloaded`) before it is decoded or queued,
    however long its deadline: it is not left to wait behind the work in progress."""
    with gated_server(max_in_progress=1) as server:
        with server.hold() as held:
            t0 = time.monotonic()
            refused = server.rest(jpeg(seed=5), timeout=10)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            assert "in progress" in refused.json()["error"]["message"]
            assert int(refused.headers["Retry-After"]) >= 1
            assert time.monotonic() - t0 < 2.0
        assert held.result().status_code == 200


def test_504_comes_at_the_deadline_not_when_the_batch_would_leave() -> None:
    """A batch waits a full second for company; the request's deadline is 0.2 s. The 504 must come
    at about 0.2 s: the caller's wait is bounded by its deadline, not by the batch's departure
    (a `submit` that ignored its timeout would answer 504 only at 1.0 s, when the worker expires
    the item)."""
    srv, thread, url = start_server(
        ServiceSettings(
            grpc_port=0,
            host="127.0.0.1",
            max_queue_delay_s=1.0,
            always_wait_queue_delay=True,
            request_timeout_s=0.2,
        )
    )
    try:
        data = jpeg()
        with httpx.Client(timeout=30) as client:
            client.get(f"{url}/readyz")  # the connection is open before the clock starts
            t0 = time.monotonic()
            r = client.post(f"{url}/v1/score", content=data, headers={"Content-Type": "image/jpeg"})
            elapsed = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
        assert elapsed < 0.8, f"504 after {elapsed:.2f} s; the deadline was 0.2 s and the batch left at 1 s"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
