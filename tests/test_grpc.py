"""gRPC on a real server on 127.0.0.1: Score, ScoreBatch, ScoreStream, health, reflection,
deadlines, error statuses, retry pushback, metrics, and agreement with REST."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from musiq_client.gen import quality_pb2, quality_pb2_grpc
from service.settings import ServiceSettings
from tests.gated import gated_server, metric
from tests.helpers import jpeg, start_server

ROOT = Path(__file__).resolve().parents[1]


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


def test_client_deadline_is_honoured() -> None:
    """The client's deadline reaches the server and bounds what it accepts. One image is held in
    inference; a call whose deadline is shorter than twice that work is refused by the server at
    once (RESOURCE_EXHAUSTED `overloaded`, long before the client's own timer would fire), while
    the same image with a long deadline is accepted. A server that ignored the client's deadline
    (its own 30 s instead) would accept both."""
    with gated_server() as server:
        batcher = server.core.models[server.core.default].batcher
        with server.hold() as held:
            ahead = batcher.expected_wait_s(0)
            assert ahead > 0.3, f"the held image should be {ahead:.3f} s of work at the seeded rate"
            deadline = 1.5 * ahead  # the work ahead is 2/3 of it: more than the admitted half
            request = quality_pb2.ScoreRequest(image=jpeg(seed=4))
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                server.stub.Score(request, timeout=deadline)
            elapsed = time.monotonic() - t0
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert (err.value.details() or "").startswith("overloaded: "), err.value.details()
            assert elapsed < deadline / 2, f"refused after {elapsed:.2f} s: admission refuses at once"
            patient = server.stub.Score.future(request, timeout=60)  # the same image, a long deadline
            time.sleep(0.2)
            assert not patient.done(), "a call that can wait for the work ahead is accepted"
        assert held.result().status_code == 200
        assert patient.result().score > 0


def pushback_ms(err: grpc.RpcError) -> int | None:
    """The server's `grpc-retry-pushback-ms` trailer: when to retry (ms), negative: do not."""
    found = [int(v) for k, v in err.trailing_metadata() or () if k == "grpc-retry-pushback-ms"]
    return found[0] if found else None


def test_an_empty_or_oversized_batch_is_refused_as_rest_refuses_it(
    endpoints: tuple[str, str], stub: quality_pb2_grpc.QualityStub
) -> None:
    """The same request gets the same answer from both protocols (issue 16): an empty batch is
    400 `empty_batch` / INVALID_ARGUMENT, one over `max_batch_items` is 413 `too_many_items` /
    RESOURCE_EXHAUSTED with the same message, and no retry can fix it (negative pushback)."""
    url = endpoints[0]
    rest = httpx.post(f"{url}/v1/score:batch", json={"items": []}, timeout=30)
    assert rest.status_code == 400 and rest.json()["error"]["code"] == "empty_batch", rest.text
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(quality_pb2.ScoreBatchRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details() == f"empty_batch: {rest.json()['error']['message']}"

    limit = ServiceSettings().max_batch_items
    junk = base64.b64encode(b"x").decode()
    rest = httpx.post(
        f"{url}/v1/score:batch",
        json={"items": [{"id": str(i), "image": junk} for i in range(limit + 1)]},
        timeout=30,
    )
    assert rest.status_code == 413 and rest.json()["error"]["code"] == "too_many_items", rest.text
    items = [quality_pb2.ScoreRequest(id=str(i), image=b"x") for i in range(limit + 1)]
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(quality_pb2.ScoreBatchRequest(items=items), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert err.value.details() == f"too_many_items: {rest.json()['error']['message']}"
    assert pushback_ms(err.value) is not None and pushback_ms(err.value) < 0


def test_stream_metrics_record_the_real_status(
    endpoints: tuple[str, str], stub: quality_pb2_grpc.QualityStub
) -> None:
    """A ScoreStream that ends by its deadline is recorded as such (DEADLINE_EXCEEDED, or CANCELLED
    if the client's cancel came first), not OK; one that completes is recorded OK."""
    url = endpoints[0]

    def count(code: str) -> float:
        return metric(url, "musiq_requests_total", protocol="grpc", route="ScoreStream", code=code)

    ok, late, cancelled = count("OK"), count("DEADLINE_EXCEEDED"), count("CANCELLED")
    more = threading.Event()

    def slow_requests() -> Iterator[quality_pb2.ScoreRequest]:
        yield quality_pb2.ScoreRequest(id="a", image=jpeg(seed=1))
        more.wait(10)  # the client keeps the stream open past its deadline

    with pytest.raises(grpc.RpcError) as err:
        list(stub.ScoreStream(slow_requests(), timeout=0.5))
    more.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def ended() -> float:  # the server may see the deadline, or the client's cancel a moment before
        return count("DEADLINE_EXCEEDED") + count("CANCELLED")

    end = time.monotonic() + 10
    while ended() == late + cancelled and time.monotonic() < end:
        time.sleep(0.05)
    assert (ended(), count("OK")) == (late + cancelled + 1, ok)

    replies = list(stub.ScoreStream(iter([quality_pb2.ScoreRequest(id="b", image=jpeg())]), timeout=60))
    assert [r.id for r in replies] == ["b"]
    end = time.monotonic() + 10
    while count("OK") == ok and time.monotonic() < end:
        time.sleep(0.05)
    assert count("OK") == ok + 1


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


GENERATED = ("musiq_client/gen",)  # the one copy: the client's, which the server imports too


def test_generated_code_is_in_sync(tmp_path: Path) -> None:
    """The generated code equals a fresh generation from protos/. protoc must run in a child
    process of the generator (it once segfaulted in-process and took the whole pytest run with it):
    the generator, itself run here in a child, never loads grpc_tools into its own process."""
    code = (
        "import sys, pathlib; from tools.gen_protos import generate; generate(pathlib.Path(sys.argv[1])); "
        "print(sorted(m for m in sys.modules if m.startswith('grpc_tools')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"protoc ran inside the generator's process: {done.stdout}"
    fresh = sorted(tmp_path.iterdir())
    assert {p.name for p in fresh} >= {"__init__.py", "quality_pb2.py", "quality_pb2_grpc.py"}
    for folder in GENERATED:
        assert sorted(p.name for p in (ROOT / folder).glob("*.py*")) == [p.name for p in fresh], folder
        for path in fresh:
            assert path.read_text() == (ROOT / folder / path.name).read_text(), (
                f"run `make protos` ({folder}/{path.name})"
            )
