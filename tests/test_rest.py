"""The REST API on a real uvicorn server on 127.0.0.1, driven by httpx."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.decode import decode_image
from model.packing import pack
from service.runtime import ModelRuntime
from service.settings import EMBEDDED_ONNX, ServiceSettings
from tests.helpers import jpeg, require_tool, start_server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv, thread, url = start_server(
        ServiceSettings(
            max_body_bytes=2_000_000, max_pixels=4_000_000, decode_threads=2, grpc_port=0, host="127.0.0.1"
        )
    )
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def test_score_raw_body_equals_the_runtime(server: str) -> None:
    data = jpeg()
    r = httpx.post(f"{server}/v1/score", content=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    runtime = ModelRuntime(EMBEDDED_ONNX)
    packing = runtime.packing
    expected = runtime.predict([pack(decode_image(data), packing)])[0].score
    assert body["score"] == pytest.approx(expected, abs=1e-5)
    assert body["model"] == "musiq-clive-small" and body["model_version"] == "2"
    assert body["tokens"] == 49 + 144 + 70
    assert set(body["timings"]) == {"decode_s", "pack_s", "queue_s", "infer_s"}
    assert body["timings"]["infer_s"] > 0


def test_score_multipart(server: str) -> None:
    data = jpeg(seed=1)
    raw = httpx.post(
        f"{server}/v1/score", content=data, headers={"Content-Type": "application/octet-stream"}, timeout=60
    )
    form = httpx.post(f"{server}/v1/score", files={"image": ("a.jpg", data, "image/jpeg")}, timeout=60)
    assert form.status_code == 200 and form.json()["score"] == raw.json()["score"]
    missing = httpx.post(f"{server}/v1/score", files={"other": ("a.jpg", data, "image/jpeg")}, timeout=60)
    assert_error(missing, 400, "missing_image")


def test_bad_inputs_are_4xx_with_a_reason(server: str) -> None:
    url = f"{server}/v1/score"
    assert_error(
        httpx.post(url, content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(httpx.post(url, content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body")
    assert_error(
        httpx.post(url, content=b"\x00garbage" * 10, headers={"Content-Type": "image/png"}),
        415,
        "image_unrecognised",
    )
    cut = jpeg()[:3000]
    assert_error(httpx.post(url, content=cut, headers={"Content-Type": "image/jpeg"}), 400, "image_corrupt")
    big = b"\xff" * 2_000_001
    assert_error(httpx.post(url, content=big, headers={"Content-Type": "image/jpeg"}), 413, "body_too_large")
    assert_error(
        httpx.post(f"{url}?model=nope", content=jpeg(), headers={"Content-Type": "image/jpeg"}),
        404,
        "unknown_model",
    )
    assert_error(
        httpx.post(f"{url}?max_native_tokens=-3", content=jpeg(), headers={"Content-Type": "image/jpeg"}),
        400,
        "bad_request",
    )


def test_decompression_bomb_is_refused_from_its_header(server: str) -> None:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    r = httpx.post(f"{server}/v1/score", content=png, headers={"Content-Type": "image/png"}, timeout=30)
    assert_error(r, 413, "image_too_large")
    assert "30000x30000" in r.json()["error"]["message"]


def test_native_token_cap(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/score?max_native_tokens=10",
        content=jpeg(),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["tokens"] == 49 + 144 + 10
    too_many = httpx.post(
        f"{server}/v1/score?max_native_tokens=100000", content=jpeg(), headers={"Content-Type": "image/jpeg"}
    )
    assert_error(too_many, 400, "bad_request")


def test_health_ready_models_and_openapi(server: str) -> None:
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json()["status"] == "ready"
    models = httpx.get(f"{server}/v1/models").json()
    assert models["default"] == "musiq-clive-small"
    meta = models["models"][0]["metadata"]
    assert (
        meta["patch_size"] == 32
        and meta["precision"] == "fp32"
        and Path(models["models"][0]["path"]).name == "default.onnx"
    )
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "/v1/score" in spec["paths"]


def test_concurrent_requests_are_batched_and_all_answered(server: str) -> None:
    images = [jpeg(120 + 10 * i, 160, seed=i) for i in range(12)]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(
            pool.map(
                lambda d: httpx.post(
                    f"{server}/v1/score", content=d, headers={"Content-Type": "image/jpeg"}, timeout=120
                ),
                images,
            )
        )
    assert all(r.status_code == 200 for r in responses)
    runtime = ModelRuntime(EMBEDDED_ONNX)
    for data, r in zip(images, responses, strict=True):
        expected = runtime.predict([pack(decode_image(data), runtime.packing)])[0].score
        assert r.json()["score"] == pytest.approx(expected, abs=1e-4)


def test_musiq_serve_starts_on_the_embedded_model() -> None:
    from tests.reliability.serve import serve_process

    with serve_process(ready_timeout_s=60) as srv:  # `musiq serve --port 0 --grpc-port 0`
        r = httpx.post(
            f"{srv.url}/v1/score",
            content=jpeg(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["model"] == "musiq-clive-small"
        srv.sigterm()
        code = srv.proc.wait(timeout=30)
        log = srv.log()
    # uvicorn shuts down gracefully on SIGTERM (lifespan end: batchers drained), then re-raises
    # the signal so the exit status says why it stopped.
    assert code in (0, -15) and "Application shutdown complete" in log, log


def test_metrics_are_promtool_clean_and_count_what_happened(server: str) -> None:
    import subprocess

    httpx.post(f"{server}/v1/score", content=jpeg(seed=5), headers={"Content-Type": "image/jpeg"}, timeout=60)
    httpx.post(f"{server}/v1/score", content=b"nope", headers={"Content-Type": "text/plain"})
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "musiq_requests_total",
        "musiq_request_duration_seconds_bucket",
        "musiq_decode_duration_seconds_bucket",
        "musiq_pack_duration_seconds_bucket",
        "musiq_queue_wait_seconds_bucket",
        "musiq_inference_duration_seconds_bucket",
        "musiq_batch_size_bucket",
        "musiq_batch_tokens_bucket",
        "musiq_real_tokens_total",
        "musiq_computed_tokens_total",
        "musiq_queue_depth",
        "musiq_in_flight",
        "musiq_rejected_requests_total",
        "musiq_model_info",
    ):
        assert name in text, name
    assert 'musiq_requests_total{code="200",protocol="http",route="/v1/score"}' in text
    assert 'musiq_rejected_requests_total{reason="unsupported_media_type"}' in text
    real = float(
        next(ln for ln in text.splitlines() if ln.startswith("musiq_real_tokens_total{")).split()[-1]
    )
    computed = float(
        next(ln for ln in text.splitlines() if ln.startswith("musiq_computed_tokens_total{")).split()[-1]
    )
    assert 0 < real <= computed
    promtool = require_tool("promtool", "Debian package prometheus; tools/system_deps.sh installs it")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_batch_json_and_multipart_keep_order_and_isolate_bad_items(server: str) -> None:
    import base64

    images = [jpeg(100 + 20 * i, 150, seed=10 + i) for i in range(3)]
    singles = [
        httpx.post(
            f"{server}/v1/score", content=d, headers={"Content-Type": "image/jpeg"}, timeout=60
        ).json()["score"]
        for d in images
    ]
    items = [{"id": f"img{i}", "image": base64.b64encode(d).decode()} for i, d in enumerate(images)]
    items.insert(1, {"id": "broken", "image": base64.b64encode(b"not an image").decode()})
    items.append({"id": "notb64", "image": "%%%"})
    r = httpx.post(f"{server}/v1/score:batch", json={"items": items}, timeout=120)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["id"] for x in results] == ["img0", "broken", "img1", "img2", "notb64"]
    assert [x["score"] for x in results if x["error"] is None] == pytest.approx(singles, abs=1e-5)
    assert results[1]["error"]["code"] == "image_unrecognised" and results[4]["error"]["code"] == "bad_base64"
    files = [("image", (f"f{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images)]
    form = httpx.post(f"{server}/v1/score:batch", files=files, timeout=120).json()["results"]
    assert [x["id"] for x in form] == ["f0.jpg", "f1.jpg", "f2.jpg"]
    assert [x["score"] for x in form] == pytest.approx(singles, abs=1e-5)


def test_batch_limits(server: str) -> None:
    assert_error(httpx.post(f"{server}/v1/score:batch", json={"items": []}), 400, "empty_batch")
    many = [{"id": str(i), "image": "AA=="} for i in range(65)]
    assert_error(httpx.post(f"{server}/v1/score:batch", json={"items": many}), 413, "too_many_items")
    assert_error(
        httpx.post(f"{server}/v1/score:batch", content=b"{", headers={"Content-Type": "application/json"}),
        400,
        "bad_request",
    )
    bad_model = {"items": [{"id": "a", "image": "AA=="}], "model": "nope"}
    assert_error(httpx.post(f"{server}/v1/score:batch", json=bad_model), 404, "unknown_model")
    assert_error(
        httpx.post(f"{server}/v1/score:batch", content=b"x", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )


def test_several_models_at_once_and_graceful_shutdown(tmp_path: Path) -> None:
    import concurrent.futures

    from export.exporter import export_checkpoint
    from export.photos import distorted_photos
    from model.checkpoint import save_checkpoint
    from model.network import to_checkpoint
    from tests.test_network import TINY, randomised

    ckpt = save_checkpoint(
        to_checkpoint(randomised(TINY), name="tiny-dist-free", version="3"), tmp_path / "t.safetensors"
    )
    tiny = export_checkpoint(
        ckpt,
        tmp_path / "tiny.onnx",
        photos=distorted_photos(limit=2, longer_side=96),
        shapes=((1, 5, "none"),),
        log=lambda s: None,
    ).path
    # a long queue delay, waited in full, keeps the shutdown-time requests waiting in the batcher
    srv, thread, url = start_server(
        ServiceSettings(
            models=[EMBEDDED_ONNX, tiny],
            max_queue_delay_s=1.0,
            always_wait_queue_delay=True,
            grpc_port=0,
            host="127.0.0.1",
        )
    )
    try:
        names = {m["name"] for m in httpx.get(f"{url}/v1/models").json()["models"]}
        assert names == {"musiq-clive-small", "tiny-dist-free"}
        data = jpeg(seed=3)
        a = httpx.post(
            f"{url}/v1/score", content=data, headers={"Content-Type": "image/jpeg"}, timeout=60
        ).json()
        b = httpx.post(
            f"{url}/v1/score?model=tiny-dist-free",
            content=data,
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        ).json()
        assert (a["model"], b["model"], b["model_version"]) == ("musiq-clive-small", "tiny-dist-free", "3")
        expected = ModelRuntime(tiny).predict([pack(decode_image(data), ModelRuntime(tiny).packing)])[0].score
        assert b["score"] == pytest.approx(expected, abs=1e-5)

        # Shutdown while requests are queued: every accepted request still gets its score.
        images = [jpeg(150, 150 + 5 * i, seed=20 + i) for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(
                    httpx.post,
                    f"{url}/v1/score",
                    content=d,
                    headers={"Content-Type": "image/jpeg"},
                    timeout=60,
                )
                for d in images
            ]
            # Waits until work is in a batcher (decoding first can take a while on a loaded machine;
            # the 1 s queue delay then holds it there), so the shutdown below meets queued work.
            core = srv.config.app.state.core if hasattr(srv.config.app, "state") else None
            deadline = time.monotonic() + 20
            queued = -1
            while core is not None and time.monotonic() < deadline:
                queued = sum(m.batcher.depth + m.batcher.in_flight for m in core.models.values())
                if queued > 0:
                    break
                time.sleep(0.01)
            srv.should_exit = True
            codes = [f.result().status_code for f in futures]
        assert queued > 0  # the shutdown really began with accepted work outstanding
        assert codes == [200] * len(images)
    finally:
        srv.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_queue_full_is_429_with_retry_after() -> None:
    import concurrent.futures

    # One batch at a time, each waiting a full second for company: the queue fills at once.
    settings = ServiceSettings(
        grpc_port=0,
        host="127.0.0.1",
        max_queue_items=2,
        max_queue_delay_s=1.0,
        always_wait_queue_delay=True,
        max_batch_size=64,
        request_timeout_s=5,
    )
    srv, thread, url = start_server(settings)
    try:
        images = [jpeg(seed=40 + i) for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(
                pool.map(
                    lambda d: httpx.post(
                        f"{url}/v1/score", content=d, headers={"Content-Type": "image/jpeg"}, timeout=60
                    ),
                    images,
                )
            )
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert_error(refused, 429, "queue_full")
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
    # The 504 at the request's deadline: tests/test_deadlines.py.


def test_a_client_that_leaves_costs_no_inference() -> None:
    settings = ServiceSettings(
        grpc_port=0,
        host="127.0.0.1",
        max_queue_delay_s=1.5,
        always_wait_queue_delay=True,
        request_timeout_s=10,
    )
    srv, thread, url = start_server(settings)
    try:
        core = srv.config.app.state.core
        before = core.metrics.computed_tokens.labels("musiq-clive-small")._value.get()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/score", content=jpeg(seed=50), headers={"Content-Type": "image/jpeg"}, timeout=0.4
            )
        time.sleep(2.0)  # past the queue delay: the batch would have run by now
        after = core.metrics.computed_tokens.labels("musiq-clive-small")._value.get()
        assert after == before  # the abandoned image was dropped from the queue, never computed
        assert core.models["musiq-clive-small"].batcher.depth == 0
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_rest_equals_musiq_score_on_the_source_checkpoint(server: str, tmp_path: Path) -> None:
    import json

    from model.checkpoint import EMBEDDED_DEFAULT
    from tests.helpers import musiq

    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg(230, 310, seed=60))
    cli = musiq("score", "--checkpoint", EMBEDDED_DEFAULT, path)
    assert cli.returncode == 0, cli.stderr
    rest = httpx.post(
        f"{server}/v1/score", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert rest.json()["score"] == pytest.approx(json.loads(cli.stdout)["score"], abs=1e-4)  # ONNX parity


def _http_count(url: str, route: str, code: str) -> float:
    """`musiq_requests_total` of one route and status code, read from /metrics."""
    prefix = f'musiq_requests_total{{code="{code}",protocol="http",route="{route}"}} '
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_a_client_leaving_mid_upload_is_a_499_not_a_500(server: str) -> None:
    """Starlette raises ClientDisconnect from the body stream; uncaught, it was logged as
    "Exception in ASGI application" and counted as a 500 (a server fault that was none)."""
    import logging
    import socket
    from urllib.parse import urlsplit

    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        before_499 = _http_count(server, "/v1/score", "499")
        before_500 = _http_count(server, "/v1/score", "500")
        parts = urlsplit(server)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 100000\r\n\r\n" + jpeg()[:1000]
            )
            time.sleep(0.3)  # the server is reading the body when the client goes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _http_count(server, "/v1/score", "499") == before_499:
            time.sleep(0.05)
        assert _http_count(server, "/v1/score", "499") == before_499 + 1
        assert _http_count(server, "/v1/score", "500") == before_500
        assert not errors, [r.getMessage() for r in errors]
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)


def test_an_unsupported_pixel_mode_is_a_415_not_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """model/decode.py refuses a pixel mode Pillow cannot convert to RGB (reason `unsupported_mode`);
    the server had no code for it and answered 500. Today's Pillow converts every mode a format
    yields, so its conversion is made to refuse CMYK here (threads mode: the patch reaches the decoder)."""
    import io

    from PIL import Image

    convert = Image.Image.convert

    def refusing(self: Image.Image, mode: str | None = None, *args: object, **kwargs: object) -> Image.Image:
        if self.mode == "CMYK":
            raise ValueError(f"conversion from {self.mode} to {mode} not supported")
        return convert(self, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "convert", refusing)
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (10, 20, 30, 40)).save(buf, "JPEG")
    settings = ServiceSettings(decode_processes=0, grpc_enabled=False, host="127.0.0.1")
    srv, thread, url = start_server(settings)
    try:
        headers = {"Content-Type": "image/jpeg"}
        r = httpx.post(f"{url}/v1/score", content=buf.getvalue(), headers=headers, timeout=60)
        assert_error(r, 415, "image_unsupported_mode")
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_every_decode_reason_has_a_code() -> None:
    """Each `reason=` model/decode.py raises is a code of the table (`image_<reason>`), so no
    undecodable upload can become a 500 for want of one."""
    import re

    from model import decode
    from service.errors import ERRORS

    reasons = set(re.findall(r'reason="(\w+)"', Path(decode.__file__).read_text()))
    assert {"corrupt", "unsupported_mode"} <= reasons
    assert sorted(r for r in reasons if f"image_{r}" not in ERRORS) == []
