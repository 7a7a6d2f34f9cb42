"""One contract for both protocols (issue 16): every case runs over REST and over gRPC against one
real server on 127.0.0.1, and both must answer with the same error code and the statuses that
`service.errors.ERRORS` gives it (HTTP for REST, gRPC for gRPC), Retry-After / pushback included.

The server runs the real model behind a gate (tests/gated.py): a held inference makes overload and
deadlines happen exactly when a case needs them, without sleeping for them. One request in progress
at a time (`max_in_progress=1`), so holding one makes the next refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx
import pytest

from musiq_client.gen import quality_pb2
from service.errors import ERRORS, ScoringError
from tests.gated import GatedServer, gated_server
from tests.helpers import jpeg

MAX_PIXELS = 1_000_000
MAX_BODY = 2 * 2**20
PUSHBACK = "grpc-retry-pushback-ms"


@dataclass
class Answer:
    """What a transport answered, in the contract's terms."""

    code: str | None  # the error code; None for a success
    status: Any  # the HTTP status (int) or the gRPC StatusCode
    retry_after_s: float | None  # Retry-After, or the gRPC pushback (negative: do not retry)
    message: str = ""
    score: float | None = None


class Transport(Protocol):
    name: str

    def expected_status(self, code: str) -> Any: ...
    def ok_status(self) -> Any: ...
    def score(
        self, image: bytes, model: str | None = None, max_native_tokens: int | None = None
    ) -> Answer: ...
    def batch(self, images: list[bytes]) -> Answer: ...


class Rest:
    name = "rest"

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)

    def expected_status(self, code: str) -> Any:
        return ERRORS[code].http

    def ok_status(self) -> Any:
        return 200

    @staticmethod
    def _answer(r: httpx.Response) -> Answer:
        after = r.headers.get("Retry-After")
        if r.status_code == 200:
            body = r.json()
            return Answer(None, 200, None, score=body.get("score"))
        error = r.json()["error"]
        return Answer(error["code"], r.status_code, float(after) if after else None, error["message"])

    def score(self, image: bytes, model: str | None = None, max_native_tokens: int | None = None) -> Answer:
        params = {
            k: v for k, v in {"model": model, "max_native_tokens": max_native_tokens}.items() if v is not None
        }
        r = self.client.post(
            "/v1/score", content=image, params=params, headers={"Content-Type": "image/jpeg"}
        )
        return self._answer(r)

    def batch(self, images: list[bytes]) -> Answer:
        import base64

        items = [{"id": str(i), "image": base64.b64encode(b).decode()} for i, b in enumerate(images)]
        return self._answer(self.client.post("/v1/score:batch", json={"items": items}))


class Grpc:
    name = "grpc"

    def __init__(self, target: str) -> None:
        from musiq_client.gen import quality_pb2_grpc

        # no retry policy: the contract is about the first answer
        self.channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
        self.stub = quality_pb2_grpc.QualityStub(self.channel)

    def expected_status(self, code: str) -> Any:
        return ERRORS[code].grpc

    def ok_status(self) -> Any:
        return grpc.StatusCode.OK

    @staticmethod
    def _refusal(err: grpc.RpcError) -> Answer:
        details = err.details() or ""  # type: ignore[attr-defined]  # a grpc.Call, which RpcError is at runtime
        code, sep, message = details.partition(": ")
        trailers = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]  # as above
        pushback = trailers.get(PUSHBACK)
        return Answer(
            code if sep else None,
            err.code(),  # type: ignore[attr-defined]  # as above
            int(pushback) / 1000 if pushback is not None else None,
            message if sep else details,
        )

    def score(self, image: bytes, model: str | None = None, max_native_tokens: int | None = None) -> Answer:
        request = quality_pb2.ScoreRequest(
            image=image, model=model or "", max_native_tokens=max_native_tokens
        )
        try:
            reply = self.stub.Score(request, timeout=60)
        except grpc.RpcError as err:
            return self._refusal(err)
        return Answer(None, grpc.StatusCode.OK, None, score=reply.score)

    def batch(self, images: list[bytes]) -> Answer:
        request = quality_pb2.ScoreBatchRequest(items=[quality_pb2.ScoreRequest(image=b) for b in images])
        try:
            self.stub.ScoreBatch(request, timeout=60)
        except grpc.RpcError as err:
            return self._refusal(err)
        return Answer(None, grpc.StatusCode.OK, None)


@pytest.fixture(scope="module")
def server() -> Iterator[GatedServer]:
    with gated_server(max_in_progress=1, max_pixels=MAX_PIXELS, max_body_bytes=MAX_BODY) as running:
        yield running


@pytest.fixture(scope="module", params=["rest", "grpc"])
def transport(request: pytest.FixtureRequest, server: GatedServer) -> Iterator[Transport]:
    if request.param == "rest":
        rest = Rest(server.url)
        yield rest
        rest.client.close()
    else:
        g = Grpc(server.target)
        yield g
        g.channel.close()


def refused(answer: Answer, transport: Transport, code: str) -> None:
    """`answer` is the refusal `code`, with the status and retry advice the table gives it."""
    assert answer.code == code, answer
    assert answer.status == transport.expected_status(code), answer
    kind = ERRORS[code]
    if transport.name == "rest":
        assert (answer.retry_after_s is not None) == kind.retryable, answer
        if kind.retryable:
            assert answer.retry_after_s is not None and answer.retry_after_s >= 1
    elif kind.grpc == grpc.StatusCode.RESOURCE_EXHAUSTED:  # overload or too large: the pushback tells
        assert answer.retry_after_s is not None, answer
        assert (answer.retry_after_s >= 1) if kind.retryable else (answer.retry_after_s < 0), answer
    else:
        assert answer.retry_after_s is None, answer


def settle(server: GatedServer) -> None:
    """Waits until no inference runs (an expired request's batch finishes after its answer)."""
    batcher = server.core.models[server.core.default].batcher
    end = time.monotonic() + 30
    while batcher.in_flight or batcher.depth or server.core.in_progress:
        assert time.monotonic() < end, "the server did not settle"
        time.sleep(0.01)


def test_the_table_is_consistent() -> None:
    """Retryable means 429 or 503 over REST, and a status gRPC clients retry; an unknown code is refused."""
    for code, kind in ERRORS.items():
        assert kind.retryable == (kind.http in (429, 503)), code
        if kind.retryable:
            assert kind.grpc in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE), code
    with pytest.raises(ValueError, match="unknown error code"):
        ScoringError("no_such_code", "")
    assert ScoringError("overloaded", "").retry_after_s == 1.0
    assert ScoringError("bad_request", "").retry_after_s is None


def test_a_valid_image_is_scored(transport: Transport) -> None:
    answer = transport.score(jpeg(seed=1))
    assert answer.code is None and answer.status == transport.ok_status(), answer
    assert answer.score is not None and math.isfinite(answer.score)


@pytest.mark.parametrize(
    ("image", "code"),
    [
        (b"not an image at all", "image_unrecognised"),
        (jpeg(seed=2)[:400], "image_corrupt"),
        (b"", "empty_body"),
    ],
    ids=["unrecognised", "truncated", "empty"],
)
def test_undecodable_bytes_are_refused(transport: Transport, image: bytes, code: str) -> None:
    refused(transport.score(image), transport, code)


def test_an_image_over_max_pixels_is_refused_from_its_header(transport: Transport) -> None:
    refused(transport.score(jpeg(1100, 1000, seed=4)), transport, "image_too_large")


def test_a_body_over_max_body_bytes_is_refused(transport: Transport) -> None:
    """REST refuses it while reading (413 `body_too_large`). gRPC refuses the message itself before
    any handler sees it (max_receive_message_length = max_body_bytes), with the same status
    (RESOURCE_EXHAUSTED) but gRPC's own message, not the code."""
    answer = transport.score(b"\xff" * (MAX_BODY + 1))
    assert answer.status == transport.expected_status("body_too_large"), answer
    if transport.name == "rest":
        refused(answer, transport, "body_too_large")


def test_an_unknown_model_is_refused(transport: Transport) -> None:
    refused(transport.score(jpeg(seed=1), model="no-such-model"), transport, "unknown_model")


def test_an_empty_batch_is_refused(transport: Transport) -> None:
    refused(transport.batch([]), transport, "empty_batch")


def test_a_batch_over_the_item_limit_is_refused(transport: Transport, server: GatedServer) -> None:
    image = jpeg(16, 16, seed=6)
    refused(
        transport.batch([image] * (server.core.settings.max_batch_items + 1)), transport, "too_many_items"
    )


@pytest.mark.parametrize("tokens", [-1, 100_000], ids=["negative", "over-the-cap"])
def test_max_native_tokens_out_of_range_is_refused(transport: Transport, tokens: int) -> None:
    refused(transport.score(jpeg(seed=1), max_native_tokens=tokens), transport, "bad_request")


def test_a_passed_deadline_is_refused(transport: Transport, server: GatedServer) -> None:
    """The request is admitted (nothing ahead of it), reaches inference, and is held there past the
    server's timeout: 504 / DEADLINE_EXCEEDED, `deadline_exceeded`, at the deadline."""
    settings = server.core.settings
    before = settings.request_timeout_s
    settings.request_timeout_s = 0.3
    try:
        with server.gated.closed():
            t0 = time.monotonic()
            answer = transport.score(jpeg(seed=7))
            elapsed = time.monotonic() - t0
    finally:
        settings.request_timeout_s = before
        settle(server)
    refused(answer, transport, "deadline_exceeded")
    assert elapsed < 5, f"answered after {elapsed:.1f} s; the deadline was 0.3 s"


def test_overload_is_refused_with_retry_advice(transport: Transport, server: GatedServer) -> None:
    """One request in progress (held in inference) and a limit of one: the next is refused at
    admission, 429 / RESOURCE_EXHAUSTED `overloaded`, with Retry-After / pushback."""
    with server.hold() as held:
        answer = transport.score(jpeg(seed=8))
    assert held.result().status_code == 200
    settle(server)
    refused(answer, transport, "overloaded")


@pytest.mark.parametrize("code", ["shutting_down", "not_ready"])
def test_a_server_not_serving_refuses(transport: Transport, server: GatedServer, code: str) -> None:
    """Draining (SIGTERM) or not (yet) ready: 503 / UNAVAILABLE with Retry-After, before any work."""
    core = server.core
    if code == "shutting_down":
        core.draining = True
    else:
        core.ready = False
    try:
        answer = transport.score(jpeg(seed=1))
    finally:
        core.draining, core.ready = False, True
    refused(answer, transport, code)
    assert transport.score(jpeg(seed=1)).code is None  # serving again
