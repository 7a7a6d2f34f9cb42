"""The Python client against a real server on 127.0.0.1: REST sync/async, gRPC, retries (and when
they come), and the client on its own, without the server package."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from musiq_client import AsyncClient, Client, GrpcClient, MusiqError, ScoreResult, grpc_service_config
from service.settings import ServiceSettings
from tests.gated import GatedServer, gated_server, metric
from tests.helpers import jpeg, start_server

ROOT = Path(__file__).resolve().parents[1]


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


# --- retries: which, and when -------------------------------------------------------------------


class RetryAfterOnce(BaseHTTPRequestHandler):
    """Answers the first POST 429 with `Retry-After: 1`, every later one 200; records when each came."""

    arrivals: list[float]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) == 1:
            body, status, headers = (
                {"error": {"code": "queue_full", "message": "busy"}},
                429,
                {"Retry-After": "1"},
            )
        else:
            body = {"score": 50.0, "model": "m", "model_version": "1", "tokens": 10, "timings": {}}
            status, headers = 200, {}
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_rest_retry_waits_the_servers_retry_after(flavour: str) -> None:
    """A 429 with `Retry-After: 1` is retried a second later, not after the (0.01 s) backoff."""
    arrivals: list[float] = []
    handler = type("Handler", (RetryAfterOnce,), {"arrivals": arrivals})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        if flavour == "sync":
            with Client(url, retries=3, backoff_s=0.01) as client:
                result = client.score(b"image")
        else:

            async def run() -> ScoreResult:
                async with AsyncClient(url, retries=3, backoff_s=0.01) as client:
                    return await client.score(b"image")

            result = asyncio.run(run())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.score == 50.0 and len(arrivals) == 2
    assert arrivals[1] - arrivals[0] >= 0.9, f"retried after {arrivals[1] - arrivals[0]:.3f} s"


@pytest.fixture(scope="module")
def overloaded() -> Iterator[GatedServer]:
    """One request in progress at most; images over 1 MP are refused (413)."""
    with gated_server(max_in_progress=1, max_pixels=1_000_000) as server:
        yield server


def record_attempts(server: GatedServer, image: bytes) -> list[float]:
    """When each call scoring `image` reached the server's core (retries included)."""
    attempts: list[float] = []
    real = server.core.score

    async def score(data: bytes, **kwargs: Any) -> Any:
        if data == image:
            attempts.append(time.monotonic())
        return await real(data, **kwargs)

    server.core.score = score
    return attempts


def test_grpc_client_retries_overload_refusals_after_the_servers_pushback(overloaded: GatedServer) -> None:
    """Admission refuses while another request is in progress (RESOURCE_EXHAUSTED `overloaded:`,
    pushback = Retry-After, 1 s). The client's call is retried by gRPC itself, each retry after the
    server's pushback, and succeeds once the server has room; the image is larger than gRPC's
    default per-call retry buffer (256 KiB), which would otherwise make the call unretriable."""
    server = overloaded
    image = jpeg(700, 900, seed=30)
    assert len(image) > 256 * 1024
    attempts = record_attempts(server, image)
    refused = metric(server.url, "musiq_requests_total", route="Score", code="RESOURCE_EXHAUSTED")
    with GrpcClient(server.target, timeout_s=30) as client, ThreadPoolExecutor(1) as pool:
        with server.hold() as held:
            call = pool.submit(client.score, image)
            end = time.monotonic() + 10
            while len(attempts) < 2:  # refused twice while the held request is in progress
                assert time.monotonic() < end, f"{len(attempts)} attempts"
                if call.done():
                    pytest.fail(f"the call ended without a retry: {call.result()!r}")
                time.sleep(0.01)
        result = call.result(timeout=30)
    assert held.result().status_code == 200
    assert isinstance(result, ScoreResult) and result.score > 0
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) >= 3 and min(gaps) >= 0.9, f"retries {gaps} s apart; the pushback was 1 s"
    now_refused = metric(server.url, "musiq_requests_total", route="Score", code="RESOURCE_EXHAUSTED")
    assert now_refused - refused == len(attempts) - 1


def test_grpc_client_does_not_retry_an_image_too_large(overloaded: GatedServer) -> None:
    """413 maps to RESOURCE_EXHAUSTED too, but with a negative pushback: gRPC does not retry it."""
    image = jpeg(1100, 1000, seed=31)  # 1.1 MP
    attempts = record_attempts(overloaded, image)
    with GrpcClient(overloaded.target, timeout_s=30) as client, pytest.raises(MusiqError) as err:
        client.score(image)
    assert (err.value.status, err.value.code) == (413, "image_too_large"), err.value
    assert err.value.retry_after_s is None
    assert len(attempts) == 1


def test_grpc_refusals_read_as_rest_ones_and_retries_are_configurable(overloaded: GatedServer) -> None:
    """Without retries the refusal comes back at once, as REST reports it: 429 `overloaded`, the
    server's message, and its Retry-After (from the pushback). The service config keeps round_robin
    and retries the unary methods, at most gRPC's 5 attempts; `retries=0` configures none."""
    client = GrpcClient(overloaded.target, retries=0)
    with client, overloaded.hold() as held, pytest.raises(MusiqError) as err:
        client.score(jpeg(seed=32))
    assert held.result().status_code == 200
    assert (err.value.status, err.value.code, err.value.retry_after_s) == (429, "overloaded", 1.0)
    assert err.value.message.startswith("1 requests in progress"), err.value.message
    config = json.loads(grpc_service_config(retries=9, backoff_s=0.5))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Score", "ScoreBatch", "Explain"}
    assert method["retryPolicy"]["maxAttempts"] == 5 and method["retryPolicy"]["initialBackoff"] == "0.5s"
    assert set(method["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert "methodConfig" not in json.loads(grpc_service_config(retries=0))


def test_the_client_works_without_the_server_package(endpoints: tuple[str, str], tmp_path: Path) -> None:
    """A backend that installs only the client: musiq_client/ copied alone into an empty folder, run by
    a Python that sees it and the venv's libraries but not this repository nor the server's packages
    (a non-editable install holds them in that same site-packages: they are made unimportable)."""
    shutil.copytree(
        ROOT / "musiq_client", tmp_path / "musiq_client", ignore=shutil.ignore_patterns("__pycache__")
    )
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(seed=1))
    code = """
import importlib.abc, sys
alone, libraries, url, target, image = sys.argv[1:]
sys.path[:] = [alone, *sys.path, libraries]  # no site: no .pth files, so no editable install either
SERVER = {"service", "model", "export", "cli", "bench", "tools", "tests"}

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in SERVER:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled())
try:
    import service
except ModuleNotFoundError:
    pass
else:
    raise AssertionError(f"the server package is importable: {service}")
import musiq_client
assert musiq_client.__file__.startswith(alone), musiq_client.__file__
with musiq_client.GrpcClient(target, timeout_s=30) as client:
    by_grpc = client.score(image)
with musiq_client.Client(url) as client:
    by_rest = client.score(image)
assert abs(by_grpc.score - by_rest.score) < 1e-6, (by_grpc, by_rest)
loaded = sorted({m.split(".")[0] for m in sys.modules} & (SERVER | {"numpy", "torch"}))
print(by_grpc.score, loaded)
"""
    libraries = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(tmp_path), libraries, *endpoints, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    score, loaded = done.stdout.split(maxsplit=1)
    assert float(score) > 0 and loaded.strip() == "[]", done.stdout
