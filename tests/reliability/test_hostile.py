"""The generated hostile corpus (hostile.py) against a real `musiq serve` process, REST and gRPC.

Every case must get its expected answer: a score for legitimate-but-odd images, otherwise a 4xx
(gRPC INVALID_ARGUMENT / RESOURCE_EXHAUSTED) whose code and message say what was wrong. Never a
5xx, never a crash, and the server's RSS (sampled every 20 ms throughout) stays under RSS_LIMIT.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from musiq_client.gen import quality_pb2, quality_pb2_grpc
from tests.reliability.hostile import Case, all_cases, image_cases
from tests.reliability.serve import RssWatch, ServerProcess, rss_bytes, serve_process

# The configured memory bound for the whole run: the idle server (model loaded, ~0.3 GB) plus two
# decode threads each holding a MAX_PIXELS image several times over (Pillow, RGB array, packing).
MAX_PIXELS = 4_000_000
RSS_LIMIT = 1024 * 2**20
SERVER_ENV = {
    "MUSIQ_MAX_BODY_BYTES": "2000000",
    "MUSIQ_MAX_PIXELS": str(MAX_PIXELS),
    "MUSIQ_BODY_TIMEOUT_S": "2",
    "MUSIQ_DECODE_THREADS": "2",
    "MUSIQ_MAX_QUEUE_DELAY_S": "0.002",
}
GRPC_CODES = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ServerProcess, RssWatch]]:
    with serve_process(SERVER_ENV) as srv, RssWatch(srv.pid) as watch:
        yield srv, watch
        print(
            f"\nhostile cases tried: {TRIED}; peak server RSS {watch.peak / 2**20:.0f} MiB "
            f"({watch.samples} samples), limit {RSS_LIMIT / 2**20:.0f} MiB"
        )


def _rest_outcome(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()
    if r.status_code == 200:
        assert math.isfinite(body["score"]), body
        return 200, "ok", ""
    assert set(body) == {"error"}, body
    return r.status_code, body["error"]["code"], body["error"]["message"]


def _check(case: Case, status: int, code: str, message: str, failures: list[str]) -> None:
    if (status, code) not in case.expect:
        failures.append(f"{case.name}: got {status} {code} ({message[:120]}), expected {case.expect}")
    elif status != 200 and len(message) < 10:
        failures.append(f"{case.name}: {status} {code} without a useful message: {message!r}")


def test_rest_every_case_gets_its_answer(server: tuple[ServerProcess, RssWatch]) -> None:
    srv, watch = server
    cases = list(all_cases(seed=0))
    failures: list[str] = []
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for case in cases:
            headers = {} if case.content_type is None else {"Content-Type": case.content_type}
            r = client.post("/v1/score", content=case.body, headers=headers)
            assert r.status_code < 500, f"{case.name}: {r.status_code} {r.text[:300]}"
            _check(case, *_rest_outcome(r), failures)
    TRIED["rest"] = len(cases)
    assert not failures, "\n".join(failures)
    assert len(cases) >= 200 and srv.alive() and watch.peak < RSS_LIMIT


def test_grpc_every_image_case_gets_its_status(server: tuple[ServerProcess, RssWatch]) -> None:
    srv, watch = server
    cases = image_cases(seed=0)
    failures: list[str] = []
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = quality_pb2_grpc.QualityStub(channel)
        for case in cases:
            try:
                reply = stub.Score(quality_pb2.ScoreRequest(id=case.name, image=case.body), timeout=60)
                status, code, message = 200, "ok", ""
                assert math.isfinite(reply.score)
            except grpc.RpcError as err:
                details = err.details() or ""
                code = details.split(":", 1)[0]
                matching = [s for s, c in case.expect if c == code]
                status = matching[0] if matching and GRPC_CODES[matching[0]] == err.code() else -1
                message = f"{err.code().name} {details}"
                assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), message
            _check(case, status, code, message, failures)
    TRIED["grpc"] = len(cases)
    assert not failures, "\n".join(failures)
    assert srv.alive() and watch.peak < RSS_LIMIT


def test_grpc_message_over_the_limit_is_resource_exhausted(server: tuple[ServerProcess, RssWatch]) -> None:
    srv, _ = server
    with grpc.insecure_channel(srv.grpc_target) as channel:
        stub = quality_pb2_grpc.QualityStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(quality_pb2.ScoreRequest(image=b"\xff" * 2_100_000), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2000000" in (err.value.details() or "") or "larger than max" in (err.value.details() or "")


def test_oversized_bodies_are_413_declared_or_streamed(server: tuple[ServerProcess, RssWatch]) -> None:
    srv, watch = server
    before = rss_bytes(srv.pid)
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        declared = client.post(
            "/v1/score", content=b"\xff" * 2_000_001, headers={"Content-Type": "image/jpeg"}
        )
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
            for _ in range(40):
                yield b"\xff" * 100_000

        streamed = client.post("/v1/score", content=chunks(), headers={"Content-Type": "image/jpeg"})
        assert streamed.status_code == 413 and "2000000" in streamed.json()["error"]["message"]
        batch = client.post(
            "/v1/score:batch", content=b"[" * 2_000_001, headers={"Content-Type": "application/json"}
        )
        assert batch.status_code == 413
    assert rss_bytes(srv.pid) - before < 64 * 2**20 and watch.peak < RSS_LIMIT


def test_slow_body_is_cut_off_with_408(server: tuple[ServerProcess, RssWatch]) -> None:
    """A client that trickles its body holds a connection; the body timeout (2 s here) ends it."""
    srv, _ = server
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
        )
        start = time.monotonic()
        sock.settimeout(0.3)
        response = b""
        while time.monotonic() - start < 8 and b"\r\n\r\n" not in response:
            try:
                sock.sendall(b"\xff")
                response += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - start
        sock.settimeout(2)
        while b"}}" not in response:  # the JSON error body may come in a later segment
            more = sock.recv(4096)
            if not more:
                break
            response += more
    assert response.startswith(b"HTTP/1.1 408") and b"body_timeout" in response, response[:300]
    assert 1.5 < elapsed < 5


def test_hostile_batch_json_is_400_without_echo(server: tuple[ServerProcess, RssWatch]) -> None:
    srv, _ = server
    secret = "SECRET-BODY-MARKER-41"
    bodies = [
        b'{"items": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"items": "' + secret.encode() + b'"}',
        b'{"items": [{"id": 1, "image": 2}]}',
        b'{"items": [{"id": "a"}]}',
        b"\xff\xfe not json " + secret.encode(),
        b'{"items": [{"id": "a", "image": "AA=="}], "max_native_tokens": -5}',
    ]
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        for body in bodies:
            r = client.post("/v1/score:batch", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body[:60], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["code"] == "bad_request" and error["message"] and secret not in error["message"]
        TRIED["rest-batch"] = len(bodies)


def test_the_server_survived_and_logged_no_bodies(server: tuple[ServerProcess, RssWatch]) -> None:
    srv, watch = server
    assert srv.alive()
    assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 200
    log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    # Bodies from the corpus never reach the log (no image bytes, no request bodies).
    for marker in ("alert(document.domain)", "hello, I am not an image", "SECRET-BODY-MARKER-41", "JFIF"):
        assert marker not in log, marker
    assert watch.peak < RSS_LIMIT, f"peak RSS {watch.peak / 2**20:.0f} MiB"
