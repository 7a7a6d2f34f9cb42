"""gRPC on a real server on 127.0.0.1: Score, ScoreBatch, ScoreStream, health, reflection,
deadlines, error statuses, and agreement with REST."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.gen import quality_pb2, quality_pb2_grpc
from service.settings import ServiceSettings
from tests.helpers import jpeg, start_server


@pytest.fixture(scope="module")
def endpoints() -> Iterator[tuple[str, str]]:
    settings = ServiceSettings(
        grpc_port=0, host="127.0.0.1", max_queue_delay_s=0.01, max_body_bytes=4_000_000
    )
    srv, thread, url = start_server(settings)
    port = srv.config.app.state.grpc_port
    yield url, f"127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def stub(endpoints: tuple[str, str]) -> Iterator[quality_pb2_grpc.QualityStub]:
    with grpc.insecure_channel(endpoints[1]) as channel:
        yield quality_pb2_grpc.QualityStub(channel)


def test_score_agrees_with_rest_exactly(
    endpoints: tuple[str, str], stub: quality_pb2_grpc.QualityStub
) -> None:
    data = jpeg()
    reply = stub.Score(quality_pb2.ScoreRequest(id="a", image=data), timeout=60)
    rest = httpx.post(
        f"{endpoints[0]}/v1/score", content=data, headers={"Content-Type": "image/jpeg"}, timeout=60
    ).json()
    assert reply.id == "a" and reply.model == rest["model"] and reply.tokens == rest["tokens"]
    assert reply.score == pytest.approx(rest["score"], abs=1e-6)
    assert reply.timings.infer_s > 0 and not reply.HasField("error")


def test_errors_are_grpc_statuses(stub: quality_pb2_grpc.QualityStub) -> None:
    cases = [
        (
            quality_pb2.ScoreRequest(image=b"not an image"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image_unrecognised",
        ),
        (quality_pb2.ScoreRequest(image=jpeg()[:2000]), grpc.StatusCode.INVALID_ARGUMENT, "image_corrupt"),
        (quality_pb2.ScoreRequest(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty_body"),
        (quality_pb2.ScoreRequest(image=jpeg(), model="nope"), grpc.StatusCode.NOT_FOUND, "unknown_model"),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request, timeout=30)
        assert err.value.code() == code and text in err.value.details()


def test_client_deadline_is_honoured(stub: quality_pb2_grpc.QualityStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(quality_pb2.ScoreRequest(image=jpeg(1200, 1600, seed=9)), timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_batch_keeps_order_and_isolates_bad_items(stub: quality_pb2_grpc.QualityStub) -> None:
    items = [quality_pb2.ScoreRequest(id=f"i{i}", image=jpeg(seed=i)) for i in range(3)]
    items.insert(1, quality_pb2.ScoreRequest(id="bad", image=b"junk"))
    reply = stub.ScoreBatch(quality_pb2.ScoreBatchRequest(items=items), timeout=60)
    assert [r.id for r in reply.results] == ["i0", "bad", "i1", "i2"]
    assert reply.results[1].error.code == "image_unrecognised"
    single = stub.Score(quality_pb2.ScoreRequest(image=jpeg(seed=2)), timeout=60).score
    assert reply.results[3].score == pytest.approx(single, abs=1e-6)


def test_stream_answers_every_id(stub: quality_pb2_grpc.QualityStub) -> None:
    sizes = [(600, 800), (64, 64), (300, 200), (1000, 700), (90, 90), (256, 256)]
    requests = [
        quality_pb2.ScoreRequest(id=f"s{i}", image=jpeg(h, w, seed=i)) for i, (h, w) in enumerate(sizes)
    ]
    requests.append(quality_pb2.ScoreRequest(id="broken", image=b"xx"))
    replies = list(stub.ScoreStream(iter(requests), timeout=120))
    assert sorted(r.id for r in replies) == sorted(r.id for r in requests)
    by_id = {r.id: r for r in replies}
    assert by_id["broken"].error.code == "image_unrecognised"
    assert all(np.isfinite(by_id[f"s{i}"].score) for i in range(len(sizes)))


def test_health_and_reflection(endpoints: tuple[str, str]) -> None:
    with grpc.insecure_channel(endpoints[1]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "musiq.v1.Quality"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"musiq.v1.Quality", "grpc.health.v1.Health"} <= names


def test_generated_code_is_in_sync(tmp_path: Path) -> None:
    from tools.gen_protos import generate

    root = Path(__file__).resolve().parents[1]
    for fresh in generate(tmp_path):
        assert fresh.read_text() == (root / "service" / "gen" / fresh.name).read_text(), (
            f"run `make protos` ({fresh.name})"
        )
