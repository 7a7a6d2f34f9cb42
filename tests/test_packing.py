"""Multi-scale packing: hand-checked layouts, exact patch contents, caps, batching, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import PackingConfig
from model.packing import (
    collate,
    hash_indices,
    normalise,
    pack,
    resized_shape,
    spatial_indices,
    split_official_rows,
)
from model.resize import resize_gaussian


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_hash_indices_hand_checked() -> None:
    assert hash_indices(6, 10).tolist() == [0, 1, 3, 5, 6, 8]
    assert hash_indices(7, 10).tolist() == [0, 1, 2, 4, 5, 7, 8]
    assert hash_indices(10, 10).tolist() == list(range(10))
    assert hash_indices(1, 10).tolist() == [0]
    # more patches than grid cells: each cell is shared, the last patch lands in the last cell
    many = hash_indices(32, 10)
    assert many[0] == 0 and many[-1] == 9 and (np.diff(many) >= 0).all()


def test_spatial_index_is_row_major_product() -> None:
    idx = spatial_indices(6, 7, 10).reshape(6, 7)
    assert idx[0].tolist() == [0, 1, 2, 4, 5, 7, 8]
    assert idx[:, 0].tolist() == [0, 10, 30, 50, 60, 80]
    assert idx[3, 3] == 5 * 10 + 4


def test_512x384_gives_385_tokens() -> None:
    packed = pack(image(384, 512))
    assert packed.num_tokens == 49 + 144 + 192 == 385
    (s224, s384, native) = packed.layout
    assert (s224.height, s224.width, s224.grid_h, s224.grid_w, s224.valid, s224.length) == (
        168,
        224,
        6,
        7,
        42,
        49,
    )
    assert (s384.height, s384.width, s384.grid_h, s384.grid_w, s384.valid, s384.length) == (
        288,
        384,
        9,
        12,
        108,
        144,
    )
    assert (native.height, native.width, native.valid, native.length) == (384, 512, 192, 192)
    assert packed.official_rows().shape == (385, 3075)
    # padding rows of the resized scales are all-zero with mask 0
    assert packed.mask.sum() == 42 + 108 + 192
    assert not packed.patches[42:49].any() and not packed.mask[42:49].any()
    assert packed.scale.tolist() == [0] * 42 + [0] * 7 + [1] * 108 + [0] * 36 + [2] * 192


def test_normalise_matches_official_arithmetic() -> None:
    v = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    expected = np.float32(-1) + (np.arange(256, dtype=np.float32) / np.float32(255)) * np.float32(2)
    np.testing.assert_array_equal(normalise(v)[..., 0].reshape(-1), expected)
    assert normalise(v).min() == -1.0 and normalise(v).max() == 1.0


def test_native_patches_are_row_major_with_row_col_channel_flattening() -> None:
    img = image(64, 96, seed=3)
    packed = pack(img, PackingConfig(longer_sides=()))
    x = normalise(img)
    assert packed.num_tokens == 2 * 3
    for k in range(6):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(
            packed.patches[k], x[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].reshape(-1)
        )
    # (row, col, channel) order: element 1 is the green value of pixel (0, 0), element 3 pixel (0, 1)
    assert packed.patches[0][1] == x[0, 0, 1] and packed.patches[0][3] == x[0, 1, 0]


def test_same_padding_splits_floor_half_before() -> None:
    # 33 x 70: height pads 31 (15 before, 16 after); width pads 26 (13 before, 13 after)
    img = np.full((33, 70, 3), 255, np.uint8)
    packed = pack(img, PackingConfig(longer_sides=()))
    assert packed.layout[0].grid_h == 2 and packed.layout[0].grid_w == 3
    canvas = np.zeros((64, 96, 3), np.float32)
    for k in range(6):
        r, c = divmod(k, 3)
        canvas[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = packed.patches[k].reshape(32, 32, 3)
    ones = np.argwhere(canvas[..., 0] == 1.0)
    assert ones[:, 0].min() == 15 and ones[:, 0].max() == 15 + 33 - 1
    assert ones[:, 1].min() == 13 and ones[:, 1].max() == 13 + 70 - 1
    assert (canvas[canvas != 1.0] == 0.0).all()  # the padding is 0 in [-1, 1] space (mid grey)


def test_resized_scale_content_is_the_gaussian_resize() -> None:
    img = image(100, 150, seed=5)
    packed = pack(img, PackingConfig(longer_sides=(64,), max_native_tokens=0))
    h, w = resized_shape(100, 150, 64)
    assert (h, w) == (43, 64)
    r = resize_gaussian(normalise(img), h, w)
    canvas = np.zeros((64, 64, 3), np.float32)
    canvas[10 : 10 + 43] = r  # pad 21 rows: 10 before, 11 after
    np.testing.assert_array_equal(packed.patches[0], canvas[:32, :32].reshape(-1))
    np.testing.assert_array_equal(packed.patches[3], canvas[32:, 32:].reshape(-1))


def test_resized_shape_rounds_half_to_even_in_float32() -> None:
    assert resized_shape(384, 512, 224) == (168, 224)
    assert resized_shape(500, 500, 384) == (384, 384)
    assert resized_shape(321, 481, 224) == (149, 224)  # 321 * 224 / 481 = 149.49...
    assert resized_shape(10, 5, 224) == (224, 112)  # small images are upsampled
    assert resized_shape(4, 12, 6) == (2, 6)  # 4 * 0.5 = 2.0
    assert resized_shape(5, 12, 6) == (2, 6)  # 2.5 -> 2 (half to even)
    assert resized_shape(7, 12, 6) == (4, 6)  # 3.5 -> 4 (half to even)
    assert resized_shape(1, 4000, 224) == (1, 224)  # would be 0: kept at one pixel


@pytest.mark.parametrize(
    ("cap", "rows", "valid"), [(-1, 192, 192), (0, 0, 0), (100, 100, 100), (300, 300, 192)]
)
def test_native_token_cap(cap: int, rows: int, valid: int) -> None:
    img = image(384, 512, seed=1)
    full = pack(img)
    packed = pack(img, PackingConfig(max_native_tokens=cap))
    native = packed.layout[-1]
    assert (native.length, native.valid) == (rows, valid)
    assert packed.num_tokens == 49 + 144 + rows
    # the kept rows are the first in row-major order, identical to the uncapped packing
    np.testing.assert_array_equal(packed.patches[193 : 193 + valid], full.patches[193 : 193 + valid])
    np.testing.assert_array_equal(packed.spatial[193 : 193 + valid], full.spatial[193 : 193 + valid])
    assert not packed.mask[193 + valid :].any()


def test_any_number_of_scales_and_patch_sizes() -> None:
    img = image(200, 300, seed=2)
    cfg = PackingConfig(patch_size=16, grid_size=5, longer_sides=(512, 64, 128))
    packed = pack(img, cfg)
    assert cfg.longer_sides == (64, 128, 512)  # sorted: scale ids follow ascending length
    assert [s.length for s in packed.layout] == [16, 64, 1024, 13 * 19]
    assert [s.scale_id for s in packed.layout] == [0, 1, 2, 3]
    assert packed.patches.shape[1] == 16 * 16 * 3
    assert packed.spatial.max() < 25
    native_only = pack(img, PackingConfig(longer_sides=()))
    assert native_only.num_tokens == 7 * 10 and (native_only.scale == 0).all()


def test_collate_pads_with_masked_zero_rows() -> None:
    a, b = pack(image(40, 50)), pack(image(300, 120))
    batch = collate([a, b])
    n = max(a.num_tokens, b.num_tokens)
    assert batch.patches.shape == (2, n, 3072) and batch.mask.shape == (2, n)
    np.testing.assert_array_equal(batch.patches[0, : a.num_tokens], a.patches)
    assert not batch.patches[0, a.num_tokens :].any() and not batch.mask[0, a.num_tokens :].any()
    assert batch.padding_efficiency == pytest.approx((a.num_valid + b.num_valid) / (2 * n))
    assert collate([a], pad_to=512).patches.shape == (1, 512, 3072)
    with pytest.raises(ValueError, match="shorter"):
        collate([b], pad_to=10)
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_official_rows_round_trip() -> None:
    packed = pack(image(70, 90))
    back = split_official_rows(packed.official_rows())
    np.testing.assert_array_equal(back.patches[0], packed.patches)
    np.testing.assert_array_equal(back.spatial[0], packed.spatial)
    np.testing.assert_array_equal(back.scale[0], packed.scale)
    np.testing.assert_array_equal(back.mask[0], packed.mask)


def test_bad_inputs_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="RGB"):
        pack(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        pack(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="no pixels"):
        pack(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="max_native_tokens"):
        PackingConfig(max_native_tokens=-2)


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    """Sizes 1..4000 with aspect ratios up to 1:200, either orientation."""
    longer = draw(st.integers(1, 4000))
    ratio = draw(st.floats(1.0, 200.0))
    shorter = max(1, min(longer, round(longer / ratio)))
    return (shorter, longer) if draw(st.booleans()) else (longer, shorter)


@settings(max_examples=40, deadline=None)
@given(size=sizes(), value=st.integers(0, 255))
def test_packing_properties(size: tuple[int, int], value: int) -> None:
    h, w = size
    # a cheap image with structure: a constant field with one bright column and row
    img = np.full((h, w, 3), value, np.uint8)
    img[h // 2, :, 0] = 255
    img[:, w // 2, 2] = 0
    cfg = PackingConfig()
    packed = pack(img, cfg)
    native = math.ceil(h / 32) * math.ceil(w / 32)
    assert packed.num_tokens == 49 + 144 + native
    assert packed.patches.shape == (packed.num_tokens, 3072) and packed.patches.dtype == np.float32
    assert np.isfinite(packed.patches).all()
    # float32 weights sum to 1 within an ulp or two, as in TensorFlow
    assert packed.patches.min() >= -1.0 - 1e-6 and packed.patches.max() <= 1.0 + 1e-6
    assert packed.spatial.min() >= 0 and packed.spatial.max() < 100
    for s in packed.layout:
        block = slice(s.offset, s.offset + s.length)
        mask = packed.mask[block]
        assert mask[: s.valid].all() and not mask[s.valid :].any()
        assert (packed.scale[block][: s.valid] == s.scale_id).all()
        assert not packed.patches[block][s.valid :].any()
        assert s.valid == s.grid_h * s.grid_w
        if s.scale_id < 2:
            assert max(s.height, s.width) == cfg.longer_sides[s.scale_id]
            assert min(s.height, s.width) >= 1
    assert packed.num_valid == packed.mask.sum()


def test_native_cap_without_padding() -> None:
    img = image(384, 512, seed=1)
    capped = pack(img, PackingConfig(max_native_tokens=300, pad_native=False))
    assert capped.layout[-1].length == 192 and capped.num_tokens == 385  # a cap, no padding rows
    cut = pack(img, PackingConfig(max_native_tokens=100, pad_native=False))
    assert cut.layout[-1].length == 100 and cut.mask.all() == (cut.num_valid == cut.num_tokens)
    assert PackingConfig.from_dict(PackingConfig(pad_native=False).to_dict()).pad_native is False


def test_compact_keeps_every_valid_row_in_order() -> None:
    from model.packing import compact

    img = np.random.default_rng(0).integers(0, 256, (100, 333, 3), dtype=np.uint8)
    packed = pack(img, PackingConfig())
    small = compact(packed)
    m = packed.mask
    np.testing.assert_array_equal(small.patches, packed.patches[m])
    np.testing.assert_array_equal(small.spatial, packed.spatial[m])
    np.testing.assert_array_equal(small.scale, packed.scale[m])
    assert small.mask.all() and small.num_tokens == packed.num_valid
    assert [s.length for s in small.layout] == [s.valid for s in packed.layout]
    assert [s.offset for s in small.layout] == [
        0,
        packed.layout[0].valid,
        packed.layout[0].valid + packed.layout[1].valid,
    ]
    assert compact(small) is small


def _all_patches(image: np.ndarray, patch: int) -> np.ndarray:
    """Every SAME-padded patch of `image`, row-major: the plain cut, for comparison."""
    h, w, c = image.shape
    gh, gw = -(-h // patch), -(-w // patch)
    top, left = (gh * patch - h) // 2, (gw * patch - w) // 2
    canvas = np.zeros((gh * patch, gw * patch, c), np.float32)
    canvas[top : top + h, left : left + w] = image
    return canvas.reshape(gh, patch, gw, patch, c).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)


@pytest.mark.parametrize("h, w", [(1, 700), (5, 33), (40, 31), (64, 64), (100, 3), (33, 1000), (300, 200)])
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 512])
def test_writing_the_first_patches_equals_cutting_them_all(h: int, w: int, n: int) -> None:
    from model.packing import _write_patches

    image = np.random.default_rng(h * w + n).uniform(-1, 1, (h, w, 3)).astype(np.float32)
    out = np.zeros((n, 32 * 32 * 3), np.float32)
    _write_patches(image, 32, out)
    reference = _all_patches(image, 32)[:n]
    np.testing.assert_array_equal(out[: len(reference)], reference)
    assert not out[len(reference) :].any()


def test_a_long_thin_image_costs_only_the_patches_it_keeps() -> None:
    """A 1 x 1,000,000 image keeps 512 native patches; cutting its whole padded grid first took
    ~0.75 GB (3 GB at 1 x 4,000,000: one request could take a server down)."""
    import tracemalloc

    image = np.zeros((1, 1_000_000, 3), np.uint8)
    config = PackingConfig(32, 10, (224, 384), 512, pad_native=False)
    tracemalloc.start()
    try:
        packed = pack(image, config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert packed.num_valid > 512
    assert peak < 64 * 2**20, f"packing took {peak / 2**20:.0f} MiB"
