"""Tests for model.distortions: shapes, determinism, graded strength and the photo finder."""

from __future__ import annotations

import importlib.util
import io
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from model.decode import decode_image
from model.distortions import (
    KINDS,
    LEVELS,
    STRENGTHS,
    default_roots,
    distort,
    pristine_photos,
    pseudo_quality,
    random_distortion,
)

REQUIRED_KINDS = {
    "gaussian_blur",
    "motion_blur",
    "gaussian_noise",
    "impulse_noise",
    "jpeg",
    "webp",
    "contrast_down",
    "brightness_up",
    "brightness_down",
    "saturation_shift",
    "color_cast",
    "pixelate",
    "downsample_blur",
    "quantize",
}

# --------------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------------


def natural_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, a few hard edges and a fine texture: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 120 + 70 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 100 + 60 * (y / max(height - 1, 1)) + 30 * np.cos((x + y) / 29.0)
    b = 140 - 60 * (x / max(width - 1, 1)) + 20 * np.sin(y / 17.0)
    img = np.stack([r, g, b], axis=-1)
    # Hard-edged shapes: a bright disc and a dark bar.
    disc = (x - width * 0.35) ** 2 + (y - height * 0.45) ** 2 < (min(height, width) * 0.18) ** 2
    img[disc] = [225, 205, 170]
    bar = (np.abs(x - width * 0.7) < width * 0.05) & (y > height * 0.2)
    img[bar] = [35, 45, 60]
    # Texture: band-limited noise (sum of a few random-phase sinusoids) plus a little fine grain.
    for _ in range(6):
        fx, fy, phase = rng.uniform(0.2, 1.2), rng.uniform(0.2, 1.2), rng.uniform(0, 2 * np.pi)
        img += 6 * np.sin(fx * x + fy * y + phase)[..., None]
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _skimage_photo(name: str) -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def synthetic() -> np.ndarray:
    return natural_like(160, 224)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    path = _skimage_photo("astronaut.png")
    if path is None:
        pytest.skip("scikit-image's astronaut.png is not installed")
    return decode_image(path)[::2, ::2].copy()  # 256x256: enough detail, a quarter of the cost


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# Table and contract
# --------------------------------------------------------------------------------------------


def test_kinds_and_table() -> None:
    assert LEVELS == 5
    assert set(KINDS) >= REQUIRED_KINDS
    assert len(set(KINDS)) == len(KINDS)
    assert set(STRENGTHS) == set(KINDS)
    for kind, values in STRENGTHS.items():
        assert len(values) == LEVELS, kind


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (37, 53), (53, 37), (321, 481)])
def test_every_kind_and_level_keeps_shape_and_dtype(shape: tuple[int, int]) -> None:
    image = natural_like(*shape, seed=shape[0])
    for kind in KINDS:
        for level in range(LEVELS + 1):
            out = distort(image, kind, level, rng(level))
            assert out.dtype == np.uint8, (kind, level)
            assert out.shape == (*shape, 3), (kind, level)
            assert out.flags.writeable and out.flags.c_contiguous, (kind, level)


@settings(max_examples=40, deadline=None)
@given(
    image=hnp.arrays(
        np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3)), elements=st.integers(0, 255)
    ),
    kind=st.sampled_from(KINDS),
    level=st.integers(0, LEVELS),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_small_image(image: np.ndarray, kind: str, level: int, seed: int) -> None:
    before = image.copy()
    out = distort(image, kind, level, rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)  # the input is never modified


def test_level_zero_is_an_unchanged_copy(synthetic: np.ndarray) -> None:
    for kind in KINDS:
        out = distort(synthetic, kind, 0, rng())
        np.testing.assert_array_equal(out, synthetic)
        assert not np.shares_memory(out, synthetic)


def test_same_seed_same_output(synthetic: np.ndarray) -> None:
    for kind in KINDS:
        for level in (1, 3, 5):
            a = distort(synthetic, kind, level, rng(123))
            b = distort(synthetic, kind, level, rng(123))
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} level {level}")


@pytest.mark.parametrize("kind", ["gaussian_noise", "impulse_noise", "motion_blur", "color_cast"])
def test_random_kinds_depend_on_the_seed(synthetic: np.ndarray, kind: str) -> None:
    assert not np.array_equal(distort(synthetic, kind, 3, rng(1)), distort(synthetic, kind, 3, rng(2)))


def test_every_kind_changes_the_image_and_kinds_differ(synthetic: np.ndarray) -> None:
    outputs = {kind: distort(synthetic, kind, 3, rng()) for kind in KINDS}
    for kind, out in outputs.items():
        assert mae(out, synthetic) > 0.5, kind
    for i, a in enumerate(KINDS):
        for b in KINDS[i + 1 :]:
            assert not np.array_equal(outputs[a], outputs[b]), (a, b)


def test_input_layouts(synthetic: np.ndarray) -> None:
    """A read-only array (what decode_image may return) and a strided crop view are accepted."""
    frozen = synthetic.copy()
    frozen.setflags(write=False)
    view = synthetic[5:100:2, 3:200]
    for kind in KINDS:
        np.testing.assert_array_equal(distort(frozen, kind, 2, rng()), distort(synthetic, kind, 2, rng()))
        np.testing.assert_array_equal(distort(view, kind, 2, rng()), distort(view.copy(), kind, 2, rng()))


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        np.zeros((0, 8, 3), np.uint8),
        [[[0, 0, 0]]],
    ],
)
def test_bad_images_are_rejected(image: object) -> None:
    with pytest.raises(ValueError):
        distort(image, "jpeg", 1, rng())  # type: ignore[arg-type]  # invalid on purpose


@pytest.mark.parametrize("level", [-1, 6, 2.0, True, None])
def test_bad_levels_are_rejected(synthetic: np.ndarray, level: object) -> None:
    with pytest.raises(ValueError):
        distort(synthetic, "jpeg", level, rng())  # type: ignore[arg-type]  # invalid on purpose
    with pytest.raises(ValueError):
        pseudo_quality(level)  # type: ignore[arg-type]  # invalid on purpose


def test_unknown_kind_is_rejected(synthetic: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown distortion kind"):
        distort(synthetic, "vignette", 1, rng())


def test_numpy_integer_level(synthetic: np.ndarray) -> None:
    np.testing.assert_array_equal(
        distort(synthetic, "jpeg", np.int64(2), rng()), distort(synthetic, "jpeg", 2, rng())
    )


def test_jpeg_matches_the_project_decoder(synthetic: np.ndarray) -> None:
    """The JPEG distortion is Pillow's encoder followed by the project's decoder, pixel for pixel."""
    buf = io.BytesIO()
    Image.fromarray(synthetic).save(buf, "JPEG", quality=STRENGTHS["jpeg"][2])
    np.testing.assert_array_equal(distort(synthetic, "jpeg", 3, rng()), decode_image(buf.getvalue()))


# --------------------------------------------------------------------------------------------
# Graded strength
# --------------------------------------------------------------------------------------------


def _check_monotone(image: np.ndarray, kind: str) -> None:
    distances = [mae(distort(image, kind, level, rng(7)), image) for level in range(LEVELS + 1)]
    assert distances[0] == 0.0
    assert distances[1] > 0.0, (kind, distances)
    for lower, higher in itertools.pairwise(distances[1:]):
        assert higher >= lower * 0.98 - 0.05, (kind, distances)
    assert distances[LEVELS] > 1.5 * distances[1], (kind, distances)


@pytest.mark.parametrize("kind", KINDS)
def test_distance_grows_with_level_synthetic(synthetic: np.ndarray, kind: str) -> None:
    _check_monotone(synthetic, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_distance_grows_with_level_photo(astronaut: np.ndarray, kind: str) -> None:
    _check_monotone(astronaut, kind)


def test_pseudo_quality_is_strictly_decreasing() -> None:
    scores = [pseudo_quality(level) for level in range(LEVELS + 1)]
    assert all(isinstance(s, float) for s in scores)
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert scores[0] == pytest.approx(100.0)
    assert all(0.0 <= s <= 100.0 for s in scores)


def test_random_distortion_covers_all_kinds_and_levels() -> None:
    image = natural_like(8, 8)
    generator = rng(2024)
    counts: Counter[tuple[str, int]] = Counter()
    draws = 3000
    for _ in range(draws):
        out, kind, level, quality = random_distortion(image, generator)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert quality == pseudo_quality(level)
        if level == 0:
            np.testing.assert_array_equal(out, image)
        counts[kind, level] += 1
    assert set(counts) == {(k, lv) for k in KINDS for lv in range(LEVELS + 1)}
    levels = Counter(level for (_, level), n in counts.items() for _ in range(n))
    for level in range(LEVELS + 1):  # uniform levels: 500 expected each, level 0 included
        assert 400 < levels[level] < 600, levels


def test_random_distortion_subset_and_determinism() -> None:
    image = natural_like(16, 16)
    a = random_distortion(image, rng(5), kinds=("jpeg", "quantize"))
    b = random_distortion(image, rng(5), kinds=("jpeg", "quantize"))
    assert a[1:] == b[1:]
    np.testing.assert_array_equal(a[0], b[0])
    generator = rng(6)
    assert {random_distortion(image, generator, kinds=("pixelate",))[1] for _ in range(20)} == {"pixelate"}
    with pytest.raises(ValueError):
        random_distortion(image, generator, kinds=())


# --------------------------------------------------------------------------------------------
# Pristine photos
# --------------------------------------------------------------------------------------------


def test_pristine_photos_finds_the_wheel_photos_and_all_decode() -> None:
    photos = pristine_photos()
    names = {p.name for p in photos}
    assert {"astronaut.png", "chelsea.png", "coffee.png", "grace_hopper.jpg"} <= names
    assert not {"camera.png", "ihc.png", "text.png"} & names  # greyscale/synthetic/microscopy excluded
    assert len({p.resolve() for p in photos}) == len(photos)
    for path in photos:
        image = decode_image(path)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, path


def test_default_roots_exist() -> None:
    roots = default_roots()
    assert roots and all(root.exists() for root in roots)


def test_pristine_photos_custom_roots(tmp_path: Path) -> None:
    image = Image.fromarray(natural_like(10, 12))
    (tmp_path / "a" / "deep").mkdir(parents=True)
    image.save(tmp_path / "a" / "one.jpg")
    image.save(tmp_path / "a" / "deep" / "two.PNG")
    image.save(tmp_path / "a" / "three.jpeg")
    image.save(tmp_path / "a" / "skip.bmp")
    (tmp_path / "a" / "notes.txt").write_text("not a photo")
    single = tmp_path / "single.png"
    image.save(single)
    found = pristine_photos([tmp_path / "a", single, tmp_path / "missing", tmp_path / "a" / "one.jpg"])
    assert sorted(p.name for p in found) == ["one.jpg", "single.png", "three.jpeg", "two.PNG"]
    assert pristine_photos([tmp_path / "a" / "notes.txt"]) == []
    assert pristine_photos([]) == []
