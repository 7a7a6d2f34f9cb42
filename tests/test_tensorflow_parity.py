"""Parity with TensorFlow's own ops, the ones the official preprocessing is built from.

The packing is pure numpy; these tests run the same image through TensorFlow primitives
(`tf.image.resize(method="gaussian")`, `tf.image.extract_patches(padding="SAME")`, the v1
nearest-neighbour resize that hashes positions, `tf.io.decode_jpeg`) composed as MUSIQ_SPEC
section 1 describes, and compare. Needs the `parity` extra (tensorflow-cpu): skipped without it
(the main venv has no TensorFlow), except where MUSIQ_REQUIRE_TENSORFLOW=1 says TensorFlow must be
there (`make parity`): then a TensorFlow that does not import fails the run instead of skipping it.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from model.config import PackingConfig
from model.decode import decode_image
from model.packing import normalise, pack
from model.resize import resize_gaussian

REQUIRE_ENV = "MUSIQ_REQUIRE_TENSORFLOW"

if os.environ.get(REQUIRE_ENV) == "1":  # `make parity` must never pass by skipping everything
    try:
        import tensorflow as tf
    except ImportError as exc:
        missing = repr(exc)
    else:
        missing = ""
    if missing:
        pytest.fail(f"{REQUIRE_ENV}=1 but TensorFlow does not import: {missing}", pytrace=False)
else:
    tf = pytest.importorskip("tensorflow", reason="TensorFlow lives in the parity venv: `make parity`")


def tf_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return tf.image.resize(x, (h, w), method="gaussian", antialias=False).numpy()


def tf_hash(count: int, grid: int) -> np.ndarray:
    table = tf.reshape(tf.range(grid, dtype=tf.int32), [grid, 1, 1])
    return tf.compat.v1.image.resize(
        table, [count, 1], method=tf.compat.v1.image.ResizeMethod.NEAREST_NEIGHBOR
    )[:, 0, 0].numpy()


def tf_scale_rows(x: np.ndarray, patch: int, grid: int, scale_id: int, rows: int | None) -> np.ndarray:
    """One scale's official rows (patch, spatial, scale, mask), padded or cut to `rows` if given."""
    h, w = x.shape[:2]
    p = tf.image.extract_patches(
        x[None], [1, patch, patch, 1], [1, patch, patch, 1], [1, 1, 1, 1], padding="SAME"
    )
    p = tf.reshape(p, [-1, patch * patch * 3]).numpy()
    gh, gw = -(-h // patch), -(-w // patch)
    spatial = (tf_hash(gh, grid)[:, None] * grid + tf_hash(gw, grid)[None, :]).reshape(-1, 1)
    out = np.concatenate([p, spatial, np.full_like(spatial, scale_id), np.ones_like(spatial)], axis=1).astype(
        np.float32
    )
    if rows is not None:
        out = np.concatenate([out, np.zeros((rows, out.shape[1]), np.float32)])[:rows]
    return out


def tf_multiscale(image: np.ndarray, cfg: PackingConfig) -> np.ndarray:
    x = tf.cast(image, tf.float32)
    x = (x - 0.0) / (255.0 - 0.0)
    x = (-1.0 + x * 2.0).numpy()
    h, w = image.shape[:2]
    blocks = []
    for sid, side in enumerate(cfg.longer_sides):
        ratio = tf.cast(side, tf.float32) / tf.cast(max(h, w), tf.float32)
        rh = int(tf.round(tf.cast(h, tf.float32) * ratio))
        rw = int(tf.round(tf.cast(w, tf.float32) * ratio))
        blocks.append(
            tf_scale_rows(
                tf_resize(x, rh, rw), cfg.patch_size, cfg.grid_size, sid, cfg.resized_scale_tokens(side)
            )
        )
    native = None if cfg.max_native_tokens < 0 else cfg.max_native_tokens
    blocks.append(tf_scale_rows(x, cfg.patch_size, cfg.grid_size, len(cfg.longer_sides), native))
    return np.concatenate(blocks)


@pytest.mark.parametrize(
    ("h", "w", "oh", "ow"),
    [
        (768, 1024, 288, 384),
        (384, 512, 168, 224),
        (500, 500, 384, 384),
        (321, 481, 149, 224),
        (7, 9, 224, 288),
        (33, 33, 33, 33),
        (1, 50, 1, 224),
        (2000, 30, 384, 6),
    ],
)
def test_gaussian_resize_matches_tensorflow(h: int, w: int, oh: int, ow: int) -> None:
    x = np.random.default_rng(h * w).uniform(-1, 1, (h, w, 3)).astype(np.float32)
    np.testing.assert_allclose(resize_gaussian(x, oh, ow), tf_resize(x, oh, ow), atol=1e-6, rtol=0)


@pytest.mark.parametrize("count", [1, 2, 3, 6, 7, 9, 10, 11, 12, 13, 17, 31, 32, 63, 100, 125, 1000])
def test_hash_matches_tensorflow_nearest_resize(count: int) -> None:
    from model.packing import hash_indices

    np.testing.assert_array_equal(hash_indices(count, 10), tf_hash(count, 10))


@pytest.mark.parametrize(
    ("h", "w", "cap"),
    [
        (384, 512, -1),
        (321, 481, -1),
        (481, 321, 100),
        (500, 500, -1),
        (40, 700, -1),
        (10, 10, 5),
        (1000, 40, -1),
    ],
)
def test_packing_matches_tensorflow_composition(h: int, w: int, cap: int) -> None:
    img = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    cfg = PackingConfig(max_native_tokens=cap)
    ours = pack(img, cfg).official_rows()
    ref = tf_multiscale(img, cfg)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours[:, -3:], ref[:, -3:])
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_normalisation_is_bit_identical() -> None:
    v = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    x = tf.cast(v, tf.float32)
    ref = (-1.0 + ((x - 0.0) / (255.0 - 0.0)) * 2.0).numpy()
    np.testing.assert_array_equal(normalise(v), ref)


@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_decode_matches_tensorflow(subsampling: int) -> None:
    """Pillow and TensorFlow both use libjpeg(-turbo) with the ISLOW DCT and fancy upsampling."""
    rng = np.random.default_rng(subsampling)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([(x * 0.8) % 256, (y * 1.1) % 256, (x + y) % 256], -1) + rng.normal(0, 12, (240, 320, 3))
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=85, subsampling=subsampling
    )
    ours = decode_image(buf.getvalue()).astype(int)
    ref = tf.io.decode_jpeg(buf.getvalue(), channels=3).numpy().astype(int)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1
    assert np.mean(ours != ref) < 0.01
