"""The Python client against a real server on 127.0.0.1: REST sync/async, gRPC, retries."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from musiq_client import AsyncClient, Client, GrpcClient, MusiqError, ScoreResult
from service.settings import ServiceSettings
from tests.helpers import jpeg, start_server


@pytest.fixture(scope="module")
def endpoints() -> Iterator[tuple[str, str]]:
    srv, thread, url = start_server(ServiceSettings(grpc_port=0, host="127.0.0.1", max_queue_delay_s=0.01))
    yield url, f"127.0.0.1:{srv.config.app.state.grpc_port}"
    srv.should_exit = True
    thread.join(timeout=30)


def test_sync_async_and_grpc_agree(endpoints: tuple[str, str], tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(seed=1))
    with Client(endpoints[0]) as client:
        by_path = client.score(path)
        by_bytes = client.score(path.read_bytes())
        assert isinstance(by_path, ScoreResult) and by_path.score == by_bytes.score
        assert by_path.model == "musiq-clive-small" and by_path.tokens > 0 and "infer_s" in by_path.timings

    async def run() -> ScoreResult:
        async with AsyncClient(endpoints[0]) as client:
            return await client.score(path)

    assert asyncio.run(run()).score == by_path.score
    with GrpcClient(endpoints[1]) as client:
        assert client.score(path).score == pytest.approx(by_path.score, abs=1e-6)


def test_score_many_keeps_order_and_returns_errors(endpoints: tuple[str, str]) -> None:
    images = [jpeg(seed=i) for i in range(5)]
    images.insert(2, b"not an image")
    with Client(endpoints[0]) as client:
        singles = [client.score(d).score for d in images if d != b"not an image"]
        many = client.score_many(images, concurrency=4, progress=False)
    assert isinstance(many[2], MusiqError) and many[2].code == "image_unrecognised" and many[2].status == 415
    assert [r.score for r in many if isinstance(r, ScoreResult)] == singles

    async def run() -> list[ScoreResult | MusiqError]:
        async with AsyncClient(endpoints[0]) as client:
            return await client.score_many(images, concurrency=3, progress=False)

    assert [r.score for r in asyncio.run(run()) if isinstance(r, ScoreResult)] == singles
    with GrpcClient(endpoints[1]) as client:
        streamed = client.score_many(images, progress=False)
    assert isinstance(streamed[2], MusiqError) and streamed[2].code == "image_unrecognised"
    assert [r.score for r in streamed if isinstance(r, ScoreResult)] == pytest.approx(singles, abs=1e-6)


def test_errors_that_retries_cannot_fix_are_raised_at_once(endpoints: tuple[str, str]) -> None:
    with Client(endpoints[0], retries=3) as client, pytest.raises(MusiqError) as err:
        client.score(b"junk")
    assert err.value.code == "image_unrecognised"
    with GrpcClient(endpoints[1]) as client, pytest.raises(MusiqError) as gerr:
        client.score(b"junk", model="nope")
    assert gerr.value.status == 404


def test_retries_on_429_honour_retry_after() -> None:
    settings = ServiceSettings(
        grpc_port=0,
        host="127.0.0.1",
        max_queue_items=1,
        max_queue_delay_s=0.3,
        always_wait_queue_delay=True,
        max_batch_size=1,
    )
    srv, thread, url = start_server(settings)
    try:
        images = [jpeg(seed=20 + i) for i in range(5)]
        with Client(url, retries=0) as impatient:
            first = impatient.score_many(images, concurrency=5, progress=False)
        assert any(isinstance(r, MusiqError) and r.status == 429 and r.retry_after_s for r in first)
        with Client(url, retries=10, backoff_s=0.05) as patient:
            results = patient.score_many(images, concurrency=5, progress=False)
        assert all(isinstance(r, ScoreResult) for r in results)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_client_imports_no_torch_or_numpy() -> None:
    code = "import sys, musiq_client; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_explain_sync_and_async(endpoints: tuple[str, str]) -> None:
    data = jpeg(seed=5)
    with Client(endpoints[0]) as client:
        explained = client.explain(data)
        assert explained.result.score == client.score(data).score
        with pytest.raises(MusiqError) as err:
            client.explain(b"junk")
        assert err.value.status == 415 and err.value.code == "image_unrecognised"
    assert [s.longer_side for s in explained.scales] == [224, 384, None]
    assert all(s.heatmap_png.startswith(b"\x89PNG") for s in explained.scales)
    assert all(len(s.weights) == s.grid_h and len(s.weights[0]) == s.grid_w for s in explained.scales)

    async def run() -> float:
        async with AsyncClient(endpoints[0]) as client:
            return (await client.explain(data)).result.score

    assert asyncio.run(run()) == explained.result.score
