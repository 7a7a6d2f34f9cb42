"""Explanations: the embedded rollout graph against PyTorch, and /v1/explain and gRPC Explain on
a real server on 127.0.0.1 (same score as /v1/score, weights on each scale's patch grid, PNGs,
limits and errors)."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from model.decode import decode_image
from model.packing import pack
from musiq_client.gen import quality_pb2, quality_pb2_grpc
from service.explain import RolloutRuntime, rollout_path
from service.runtime import ModelRuntime
from service.settings import EMBEDDED_ONNX, ServiceSettings
from tests.helpers import jpeg, start_server

EMBEDDED_ROLLOUT = rollout_path(EMBEDDED_ONNX)


def photo(longer: int = 400) -> bytes:
    """A real photograph (scikit-image's astronaut), JPEG-encoded: heatmaps of noise mean little."""
    from skimage import data

    image = Image.fromarray(data.astronaut())
    image.thumbnail((longer, longer))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    settings = ServiceSettings(
        host="127.0.0.1", grpc_port=0, explain_max_tokens=600, explain_max_waiting=2, explain_display_side=300
    )
    srv, thread, url = start_server(settings)
    yield url, f"127.0.0.1:{srv.config.app.state.grpc_port}"
    srv.should_exit = True
    thread.join(timeout=30)


def post(url: str, path: str, data: bytes, **params: object) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", content=data, headers={"Content-Type": "image/jpeg"}, params=params, timeout=120
    )


def test_embedded_rollout_graph_matches_the_checkpoint_in_pytorch() -> None:
    """The shipped file (fp32, its weights read from default.safetensors as ONNX external data):
    same checkpoint as default.onnx, and rollouts that agree with the PyTorch model's attention
    rollout (the paper's visualisation) on a real photo."""
    import torch

    from model.checkpoint import EMBEDDED_DEFAULT, file_sha256, load_checkpoint
    from model.network import build_model

    explainer = RolloutRuntime(EMBEDDED_ROLLOUT)
    assert EMBEDDED_ROLLOUT.stat().st_size <= 2**20  # the weights live in the checkpoint
    assert explainer.metadata.rollout and explainer.metadata.precision == "fp32"
    assert explainer.metadata.source_sha256 == file_sha256(EMBEDDED_DEFAULT)
    assert ModelRuntime(EMBEDDED_ONNX).metadata.source_sha256 == explainer.metadata.source_sha256

    checkpoint = load_checkpoint(EMBEDDED_DEFAULT)
    model = build_model(checkpoint).eval()
    packed = pack(decode_image(photo()), explainer.packing)
    got = explainer.rollout(packed)
    inputs = [torch.from_numpy(a[None]) for a in (packed.patches, packed.spatial, packed.scale, packed.mask)]
    with torch.inference_mode():
        _, want = model.attention_rollout(*inputs)
    want = want[0].numpy()
    assert np.corrcoef(got, want)[0, 1] > 0.999
    assert np.abs(got - want).max() < 0.01 * want.max()


def test_explain_returns_the_score_and_each_scales_grid(server: tuple[str, str]) -> None:
    url, _ = server
    data = photo()
    r = post(url, "/v1/explain", data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["score"] == post(url, "/v1/score", data).json()["score"]  # the same batched inference
    assert {"rollout_s", "render_s"} <= set(body["timings"])

    explainer = RolloutRuntime(EMBEDDED_ROLLOUT)
    packed = pack(decode_image(data), explainer.packing)  # 169 native patches: under every cap
    rollout = explainer.rollout(packed)
    assert [s["scale_id"] for s in body["scales"]] == [0, 1, 2]
    assert [s["longer_side"] for s in body["scales"]] == [224, 384, None]
    for scale, layout in zip(body["scales"], packed.layout, strict=True):
        assert (scale["height"], scale["width"]) == (layout.height, layout.width)
        assert (scale["grid_h"], scale["grid_w"]) == (layout.grid_h, layout.grid_w)
        weights = np.array(scale["weights"], dtype=np.float64)
        assert weights.shape == (layout.grid_h, layout.grid_w)
        expected = rollout[layout.offset : layout.offset + layout.valid]
        np.testing.assert_allclose(weights.ravel(), expected, rtol=1e-5, atol=1e-7)
        png = Image.open(io.BytesIO(base64.b64decode(scale["heatmap_png"])))
        assert png.format == "PNG" and max(png.size) == min(300, max(layout.height, layout.width))
    shares = [s["share"] for s in body["scales"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6) and min(shares) > 0


def test_capped_native_patches_are_null(server: tuple[str, str]) -> None:
    url, _ = server
    body = post(url, "/v1/explain", photo(), max_native_tokens=20).json()
    native = body["scales"][2]
    flat = [v for row in native["weights"] for v in row]
    assert len(flat) == native["grid_h"] * native["grid_w"] > 20
    assert all(v is not None for v in flat[:20]) and all(v is None for v in flat[20:])


def test_heatmap_is_brightest_where_the_weight_is_largest(server: tuple[str, str]) -> None:
    """The overlay puts each patch's colour over that patch: the cell with the largest weight is
    the brightest cell of the PNG (the colour ramp rises in brightness)."""
    url, _ = server
    scale = post(url, "/v1/explain", photo())
    scale = scale.json()["scales"][0]  # 224 x 224: the heatmap is at the model's own size
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(scale["heatmap_png"]))).convert("L"), np.float64)
    weights = np.array(scale["weights"])
    r, c = np.unravel_index(np.argmax(weights), weights.shape)
    p = 32
    cell = png[r * p : (r + 1) * p, c * p : (c + 1) * p].mean()
    others = [
        png[i * p : (i + 1) * p, j * p : (j + 1) * p].mean()
        for i in range(weights.shape[0])
        for j in range(weights.shape[1])
        if (i, j) != (r, c) and weights[i, j] < 0.5 * weights[r, c]
    ]
    assert cell > max(others)


def test_explain_errors_are_4xx(server: tuple[str, str]) -> None:
    url, _ = server
    cases = [
        (post(url, "/v1/explain", b"not an image"), 415, "image_unrecognised"),
        (post(url, "/v1/explain", jpeg()[:1500]), 400, "image_corrupt"),
        (post(url, "/v1/explain", b""), 400, "empty_body"),
        (post(url, "/v1/explain", jpeg(), model="nope"), 404, "unknown_model"),
        (post(url, "/v1/explain", jpeg(800, 800)), 413, "too_many_tokens"),  # 49 + 144 + 512 > 600
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code


def test_explanations_waiting_beyond_the_limit_get_429(server: tuple[str, str]) -> None:
    url, _ = server
    data = photo(300)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{url}/v1/explain", content=data, headers={"Content-Type": "image/jpeg"})
                    for _ in range(6)
                )
            )

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 1
    for r in responses:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
    scores = {r.json()["score"] for r in responses if r.status_code == 200}
    assert len(scores) == 1  # every accepted one was answered, with the same score


def test_grpc_explain_equals_rest(server: tuple[str, str]) -> None:
    url, target = server
    data = photo()
    rest = post(url, "/v1/explain", data).json()
    with grpc.insecure_channel(target) as channel:
        stub = quality_pb2_grpc.QualityStub(channel)
        reply = stub.Explain(quality_pb2.ScoreRequest(id="x", image=data), timeout=120)
        with pytest.raises(grpc.RpcError) as err:
            stub.Explain(quality_pb2.ScoreRequest(image=b"junk"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reply.score.id == "x" and reply.score.score == rest["score"]
    for got, want in zip(reply.scales, rest["scales"], strict=True):
        assert (got.grid_h, got.grid_w, got.longer_side) == (
            want["grid_h"],
            want["grid_w"],
            want["longer_side"] or 0,
        )
        np.testing.assert_allclose(got.weights, np.array(want["weights"], np.float32).ravel(), rtol=1e-6)
        assert got.heatmap_png == base64.b64decode(want["heatmap_png"])


def test_a_stale_or_missing_rollout_graph_disables_explanations_only(tmp_path: Path) -> None:
    """A rollout file exported from another checkpoint is never used: scoring works, explain is 404."""
    from model.checkpoint import EMBEDDED_DEFAULT

    model = tmp_path / "m.onnx"
    shutil.copy(EMBEDDED_ONNX, model)
    shutil.copy(EMBEDDED_DEFAULT, tmp_path)  # its weights: external data in the checkpoint beside it
    stale = onnx.load(EMBEDDED_ROLLOUT)
    for prop in stale.metadata_props:
        if prop.key == "musiq.source_sha256":
            prop.value = "0" * 64
    onnx.save(stale, rollout_path(model))
    srv, thread, url = start_server(ServiceSettings(models=[model], host="127.0.0.1", grpc_enabled=False))
    try:
        assert post(url, "/v1/score", jpeg()).status_code == 200
        r = post(url, "/v1/explain", jpeg())
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_explanations"
        assert "another checkpoint" in r.json()["error"]["message"]
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
