"""Served scores as a Prometheus signal: `musiq_score`, a histogram per model whose buckets cover
the model's declared score range, counts each scored image once with its model's label (the
score-shift alert and the dashboard read it; deploy/prometheus/rules.yml)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from musiq_client.gen import quality_pb2, quality_pb2_grpc
from service.metrics import ServiceMetrics, score_buckets
from service.settings import ServiceSettings
from tests.helpers import jpeg, start_server

MODEL = "musiq-clive-small"  # the embedded model; its declared score range is 0..100


def score_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """`musiq_score` samples by name (_bucket, _count, _sum), each as (labels, value)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "musiq_score":
            for sample in family.samples:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def buckets_of(samples: dict[str, list[tuple[dict[str, str], float]]], model: str) -> dict[float, float]:
    return {
        float(labels["le"]): value
        for labels, value in samples["musiq_score_bucket"]
        if labels["model"] == model
    }


def count_of(samples: dict[str, list[tuple[dict[str, str], float]]], model: str) -> float:
    return next(value for labels, value in samples["musiq_score_count"] if labels["model"] == model)


@pytest.fixture(scope="module")
def endpoints() -> Iterator[tuple[str, str]]:
    srv, thread, url = start_server(ServiceSettings(grpc_port=0, host="127.0.0.1"))
    yield url, f"127.0.0.1:{srv.config.app.state.grpc_port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(endpoints: tuple[str, str]) -> str:
    return endpoints[0]


def test_a_scored_image_is_counted_once_in_its_models_score_histogram(server: str) -> None:
    headers = {"content-type": "image/jpeg"}
    first = httpx.post(f"{server}/v1/score", content=jpeg(seed=3), headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["model"] == MODEL
    score = first.json()["score"]
    text = httpx.get(f"{server}/metrics").text
    before = score_samples(text)
    assert {labels["model"] for labels, _ in before["musiq_score_bucket"]} == {MODEL}
    buckets = buckets_of(before, MODEL)
    # 5-point buckets over the declared 0..100, +Inf for anything above it.
    assert sorted(buckets) == [*(5.0 * i for i in range(21)), math.inf]
    count = count_of(before, MODEL)
    assert count >= 1 and buckets[math.inf] == count
    # The range the alert scales its threshold by.
    assert f'musiq_score_range_lower{{model="{MODEL}"}} 0.0' in text
    assert f'musiq_score_range_upper{{model="{MODEL}"}} 100.0' in text

    # One more scored image: +1 in the buckets at and above its score, none below; a refused
    # request (undecodable bytes) adds nothing.
    second = httpx.post(f"{server}/v1/score", content=jpeg(seed=4), headers=headers, timeout=60)
    assert second.status_code == 200, second.text
    refused = httpx.post(f"{server}/v1/score", content=jpeg()[:3000], headers=headers, timeout=60)
    assert refused.status_code == 400, refused.text
    after = score_samples(httpx.get(f"{server}/metrics").text)
    assert count_of(after, MODEL) == count + 1
    added = {le: value - buckets[le] for le, value in buckets_of(after, MODEL).items()}
    new_score = second.json()["score"]
    assert added == {le: float(new_score <= le) for le in buckets}
    total = next(value for labels, value in after["musiq_score_sum"] if labels["model"] == MODEL)
    assert total == pytest.approx(
        next(value for labels, value in before["musiq_score_sum"] if labels["model"] == MODEL) + new_score
    )
    assert 0 <= score <= 100 and 0 <= new_score <= 100


def test_grpc_batch_and_stream_count_each_scored_item(endpoints: tuple[str, str]) -> None:
    """The observation sits in the core, so gRPC's ScoreBatch and ScoreStream count every scored
    item, and their refused items count nothing."""
    url, target = endpoints
    httpx.post(f"{url}/v1/score", content=jpeg(), headers={"content-type": "image/jpeg"}, timeout=60)
    before = count_of(score_samples(httpx.get(f"{url}/metrics").text), MODEL)
    items = [quality_pb2.ScoreRequest(id=f"i{i}", image=jpeg(seed=10 + i)) for i in range(2)]
    items.append(quality_pb2.ScoreRequest(id="bad", image=b"junk"))
    with grpc.insecure_channel(target) as channel:
        stub = quality_pb2_grpc.QualityStub(channel)
        batch = stub.ScoreBatch(quality_pb2.ScoreBatchRequest(items=items), timeout=60)
        stream = list(stub.ScoreStream(iter(items), timeout=60))
    assert [r.HasField("error") for r in batch.results] == [False, False, True]
    assert sorted(r.HasField("error") for r in stream) == [False, False, True]
    after = count_of(score_samples(httpx.get(f"{url}/metrics").text), MODEL)
    assert after == before + 4


def test_buckets_follow_each_models_declared_range() -> None:
    metrics = ServiceMetrics()
    metrics.observe_score("ava", 5.3, (1.0, 10.0))
    metrics.observe_score("ava", float("nan"), (1.0, 10.0))  # never counted: it would poison the sum
    metrics.observe_score("koniq", 120.0, (0.0, 100.0))  # above the range: only +Inf
    samples = score_samples(generate_latest(metrics.registry).decode())
    ava = buckets_of(samples, "ava")
    assert sorted(ava)[:-1] == list(score_buckets((1.0, 10.0)))
    assert min(ava) == 1.0 and sorted(ava)[-2] == 10.0 and len(ava) == 22
    assert ava[5.05] == 0 and ava[5.5] == 1 and ava[math.inf] == 1
    assert count_of(samples, "ava") == 1
    koniq = buckets_of(samples, "koniq")
    assert koniq[100.0] == 0 and koniq[math.inf] == 1
    assert score_buckets((3.0, 3.0)) == score_buckets((0.0, 100.0))  # a malformed range: the default
