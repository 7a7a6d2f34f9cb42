"""TF-compatible Gaussian resize: hand-checked weights, an independent transcription, invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.resize import gaussian_spans, resize_gaussian


def g(d: float) -> float:
    """The Gaussian kernel of the spec: exp(-d^2 / (2 * 0.5^2)), zero from d >= 1.5."""
    return math.exp(-d * d / 0.5) if abs(d) < 1.5 else 0.0


def tf_matrix_reference(in_size: int, out_size: int) -> np.ndarray:
    """Straight transcription of the spec, one output at a time, in double precision except the
    sample position, which TensorFlow computes in float32 (float scale, float inverse scale): at
    x ~ 500 that rounding moves the sample by ~5e-5 px and the weights by up to ~3e-5."""
    m = np.zeros((out_size, in_size))
    inv_scale = np.float32(1.0 / float(np.float32(out_size) / np.float32(in_size)))
    for x in range(out_size):
        sample = float(np.float32(x + 0.5) * inv_scale)
        lo = max(math.ceil(sample - 2.0), 0)
        hi = min(math.floor(sample + 1.0), in_size - 1)
        ws = {j: g(j + 0.5 - sample) for j in range(lo, hi + 1)}
        total = sum(ws.values())
        for j, w in ws.items():
            m[x, j] = w / total
    return m


def test_halving_four_to_two_is_pairwise_mean() -> None:
    # samples at 1.0 and 3.0: two neighbours at distance 0.5 each, the third at exactly 1.5 (weight 0)
    np.testing.assert_allclose(gaussian_spans(4, 2).dense(4), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], atol=1e-7)


def test_same_size_still_filters() -> None:
    # antialias off, no skip when the size is unchanged: the centre tap is not 1
    e2 = math.exp(-2.0)
    expected = [
        [1 / (1 + e2), e2 / (1 + e2), 0],
        [e2 / (1 + 2 * e2), 1 / (1 + 2 * e2), e2 / (1 + 2 * e2)],
        [0, e2 / (1 + e2), 1 / (1 + e2)],
    ]
    np.testing.assert_allclose(gaussian_spans(3, 3).dense(3), expected, rtol=1e-6)


def test_doubling_two_to_four() -> None:
    a, b = g(0.25), g(1.25)  # sample 0.25: pixel 0 at distance 0.25, pixel 1 at 1.25
    c, d = g(0.25), g(0.75)  # sample 0.75: pixel 0 at distance 0.25, pixel 1 at 0.75
    expected = [
        [a / (a + b), b / (a + b), 0, 0][:2],
        [c / (c + d), d / (c + d)],
        [d / (c + d), c / (c + d)],
        [b / (a + b), a / (a + b)],
    ]
    np.testing.assert_allclose(gaussian_spans(2, 4).dense(2), expected, rtol=1e-6)


def test_single_pixel_input_is_copied() -> None:
    np.testing.assert_array_equal(gaussian_spans(1, 7).dense(1), np.ones((7, 1), np.float32))


@pytest.mark.parametrize(
    ("n_in", "n_out"),
    [(768, 288), (1024, 384), (500, 224), (481, 384), (321, 239), (7, 224), (4000, 22), (33, 33), (2, 3)],
)
def test_matches_independent_transcription(n_in: int, n_out: int) -> None:
    np.testing.assert_allclose(
        gaussian_spans(n_in, n_out).dense(n_in), tf_matrix_reference(n_in, n_out), atol=2e-7
    )


def test_downsampling_kernel_is_not_widened() -> None:
    # at a 1/4 scale an anti-aliasing filter would span ~12 inputs; TF's antialias=False uses <= 4
    spans = gaussian_spans(4000, 1000)
    assert spans.weights.shape[1] <= 4
    assert (np.count_nonzero(spans.weights, axis=1) <= 4).all()


def test_separable_passes_equal_dense_matrices() -> None:
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (57, 83, 3)).astype(np.float32)
    mh, mw = tf_matrix_reference(57, 31), tf_matrix_reference(83, 44)
    expected = np.einsum("oh,hwc->owc", mh, img.astype(np.float64))
    expected = np.einsum("pw,owc->opc", mw, expected)
    np.testing.assert_allclose(resize_gaussian(img, 31, 44), expected, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    oh=st.integers(1, 300),
    ow=st.integers(1, 300),
    value=st.floats(-1, 1, width=32),
)
def test_constant_image_stays_constant(h: int, w: int, oh: int, ow: int, value: float) -> None:
    img = np.full((h, w, 3), value, np.float32)
    out = resize_gaussian(img, oh, ow)
    assert out.shape == (oh, ow, 3)
    np.testing.assert_allclose(out, value, atol=2e-6)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 120),
    w=st.integers(1, 120),
    oh=st.integers(1, 200),
    ow=st.integers(1, 200),
    seed=st.integers(0, 2**31),
)
def test_output_within_input_range(h: int, w: int, oh: int, ow: int, seed: int) -> None:
    img = np.random.default_rng(seed).uniform(-1, 1, (h, w, 3)).astype(np.float32)
    out = resize_gaussian(img, oh, ow)
    assert np.isfinite(out).all()
    assert out.min() >= img.min() - 1e-6
    assert out.max() <= img.max() + 1e-6


def test_rows_sum_to_one() -> None:
    for n_in, n_out in [(1, 1), (5, 9), (640, 224), (3000, 384)]:
        np.testing.assert_allclose(gaussian_spans(n_in, n_out).dense(n_in).sum(1), 1.0, atol=1e-6)


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        gaussian_spans(0, 3)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        resize_gaussian(np.zeros((4, 4), np.float32), 2, 2)


def test_fast_passes_equal_a_naive_tap_order_loop() -> None:
    """The blocked, per-channel gathers compute, bit for bit, the sequential float32 sum the op
    defines: height pass then width pass, taps accumulated in order."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (37, 53, 3)).astype(np.float32)
    oh, ow = 20, 71

    def naive(img: np.ndarray, n_out: int, axis: int) -> np.ndarray:
        spans = gaussian_spans(img.shape[axis], n_out)
        moved = np.moveaxis(img, axis, 0)
        out = np.zeros((n_out, *moved.shape[1:]), np.float32)
        for i in range(n_out):
            acc = moved[spans.indices[i, 0]] * spans.weights[i, 0]
            for k in range(1, spans.weights.shape[1]):
                acc = acc + moved[spans.indices[i, k]] * spans.weights[i, k]
            out[i] = acc
        return np.moveaxis(out, 0, axis)

    np.testing.assert_array_equal(resize_gaussian(x, oh, ow), naive(naive(x, oh, 0), ow, 1))
