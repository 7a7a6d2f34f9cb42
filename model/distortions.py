"""Graded synthetic distortions of pristine photos, for pretraining a quality model without MOS data.

Why: human opinion scores are scarce and the official datasets need downloads. KADID-10k and
RankIQA showed that a quality model can learn much of what it needs from *synthetic* distortions
of good photos at graded strengths: the same photo made worse step by step is worse, so a model
trained to predict a pseudo score that falls with the step learns features that transfer to real
MOS regression. This module makes such pairs from photos already on this disk (`pristine_photos`):
no download is needed.

`distort(image, kind, level, rng)` applies one of `KINDS` at level 1..`LEVELS` (0 is the identity).
`STRENGTHS` is the single table of parameters: `STRENGTHS[kind][level - 1]` is the strength at that
level, increasing from "just noticeable" at level 1 to "clearly very bad" at level 5, in the spirit
of KADID-10k's five levels. Units per kind:

* ``gaussian_blur``: Gaussian standard deviation in pixels (Pillow's `GaussianBlur` radius).
* ``motion_blur``: length in pixels of a straight-line kernel at a random angle.
* ``gaussian_noise``: standard deviation of additive white noise, in 0..255 units (per channel).
* ``impulse_noise``: fraction of pixels replaced by black or white (salt and pepper).
* ``jpeg`` / ``webp``: encoder quality (lower is worse), Pillow encode then decode in memory.
* ``contrast_down``: factor the deviations from the mean luminance are scaled by.
* ``brightness_up`` / ``brightness_down``: exposure change in stops (EV), applied in linear light
  (sRGB approximated by a 2.2 gamma) and clipped, so highlights blow out and shadows crush.
* ``saturation_shift``: |log2| of the chroma gain; the direction (more or less saturated) is drawn
  from the rng, so level 5 is either nearly grey (x1/8) or garish (x8).
* ``color_cast``: magnitude of the log channel gains along a random chroma direction (gains
  multiply to about 1, so the cast changes hue rather than brightness).
* ``pixelate``: block size: box-filtered down by this factor, then nearest-neighbour up.
* ``downsample_blur``: scale factor: antialiased bilinear down, then bicubic back up.
* ``quantize``: number of levels kept per channel (posterisation: fewer colours, banding).

Every distortion returns uint8 RGB of the input's shape, is deterministic given the rng state, and
costs a few milliseconds to a few tens of milliseconds on a 481x321 photo (numpy vectorised code,
lookup tables, or Pillow's C filters and codecs), so it can run inside data-loader workers. The
random parameters (noise, angles, directions) are drawn in the same order at every level, so one
seed gives nested distortions of growing strength.

`pseudo_quality(level)` is the regression target: ``100 - 18 * level`` (100, 82, 64, 46, 28, 10).
It is a rank surrogate, not a calibrated MOS: only its ordering across levels of the same photo
and kind means anything, and the pristine photos are assumed uniformly good.

Licences of the photos `default_roots` finds (none are redistributed by this project):

* BSDS500 (Berkeley Segmentation Data Set): for research use; cite P. Arbelaez, M. Maire,
  C. Fowlkes and J. Malik, "Contour Detection and Hierarchical Image Segmentation", IEEE TPAMI
  33(5), 2011.
* scikit-image's sample images: public domain or CC0 (NASA, SpaceX, Wikimedia Commons, the
  project's own contributors); each `skimage.data` loader's docstring states its image's source.
* matplotlib's ``grace_hopper.jpg``: a US Navy photograph, public domain.
* scikit-learn's ``china.jpg`` / ``flower.jpg`` (only when scikit-learn is installed): Flickr
  photos under CC BY 2.0 (attribution required), per scikit-learn's ``datasets/images/README.txt``.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageFilter

from model.decode import decode_image

__all__ = [
    "IDENTITY",
    "KINDS",
    "LEVELS",
    "PHOTO_SUFFIXES",
    "STRENGTHS",
    "apply_strength",
    "default_roots",
    "distort",
    "distort_at",
    "kind_probabilities",
    "photo_split",
    "pristine_photos",
    "pseudo_quality",
    "pseudo_quality_at",
    "random_distortion",
    "split_photos",
    "strength_at",
]

LEVELS: Final[int] = 5

# kind -> strengths at levels 1..5 (units in the module docstring). Level 1 should be just
# noticeable on a 481x321 photo viewed at 100%, level 5 clearly very bad.
STRENGTHS: Final[dict[str, tuple[float, ...]]] = {
    "gaussian_blur": (0.7, 1.3, 2.2, 3.5, 6.0),
    "motion_blur": (4, 7, 11, 17, 25),
    "gaussian_noise": (4.0, 8.0, 14.0, 22.0, 34.0),
    "impulse_noise": (0.003, 0.01, 0.03, 0.06, 0.12),
    "jpeg": (40, 20, 10, 6, 3),
    "webp": (40, 20, 8, 3, 0),
    "contrast_down": (0.8, 0.62, 0.45, 0.3, 0.16),
    "brightness_up": (0.35, 0.7, 1.1, 1.6, 2.3),
    "brightness_down": (0.35, 0.7, 1.1, 1.6, 2.3),
    "saturation_shift": (0.4, 0.8, 1.3, 2.0, 3.0),
    "color_cast": (0.1, 0.2, 0.35, 0.55, 0.8),
    "pixelate": (2, 3, 5, 8, 13),
    "downsample_blur": (1.6, 2.2, 3.0, 4.5, 7.0),
    "quantize": (24, 14, 9, 6, 4),
}

KINDS: Final[tuple[str, ...]] = tuple(STRENGTHS)

# kind -> the strength that leaves a photo (almost) as it is: the level-0 knot `strength_at`
# interpolates from, so fractional levels below 1 give distortions milder than level 1 (JPEG
# quality 70 at level 0.5, which integer levels never show).
IDENTITY: Final[dict[str, float]] = {
    "gaussian_blur": 0.0,
    "motion_blur": 1,
    "gaussian_noise": 0.0,
    "impulse_noise": 0.0,
    "jpeg": 100,
    "webp": 100,
    "contrast_down": 1.0,
    "brightness_up": 0.0,
    "brightness_down": 0.0,
    "saturation_shift": 0.0,
    "color_cast": 0.0,
    "pixelate": 1,
    "downsample_blur": 1.0,
    "quantize": 256,
}
assert set(IDENTITY) == set(STRENGTHS)

PHOTO_SUFFIXES: Final[frozenset[str]] = frozenset({".jpg", ".jpeg", ".png"})

_GAMMA: Final[float] = 2.2
_CODE = np.arange(256, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def distort(image: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    """`image` (uint8 RGB [H, W, 3]) distorted by `kind` at `level` (0..LEVELS), as a new array.

    Level 0 returns an unchanged copy. Raises ValueError for a bad image, kind or level.
    """
    _check_image(image)
    _distortion(kind)
    _check_level(level)
    if level == 0:
        return image.copy()
    return apply_strength(image, kind, STRENGTHS[kind][int(level) - 1], rng)


def pseudo_quality(level: int) -> float:
    """Pseudo MOS on a 0..100 scale: 100 - 18 * level, i.e. 100, 82, 64, 46, 28, 10.

    Linear in the level because the strength table is spaced to make levels roughly perceptually
    equidistant (as KADID-10k's are). Level 5 maps to 10, not 0: even a very bad image is still
    recognisable, and a margin at both ends keeps the target away from the edges of the scale.
    """
    _check_level(level)
    return pseudo_quality_at(level)


def strength_at(kind: str, level: float) -> float:
    """The strength of `kind` at a fractional `level` in [0, LEVELS]: linear between the table's knots.

    Why: five integer levels leave wide gaps (JPEG quality 100 -> 40 -> 20), and a model trained
    only on the knots never learns to order what falls between them. Integer levels give exactly
    the table's strengths.
    """
    _distortion(kind)
    level = float(level)
    if not 0.0 <= level <= LEVELS:
        raise ValueError(f"level must be in 0..{LEVELS}, got {level!r}")
    knots = (IDENTITY[kind], *STRENGTHS[kind])
    low = min(int(level), LEVELS - 1)
    t = level - low
    return float(knots[low] + t * (knots[low + 1] - knots[low]))


def distort_at(image: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """`distort` at a fractional level (`strength_at`); level 0 returns an unchanged copy.

    The same rng state gives the same random draws at every level, so one seed's versions of a
    photo differ only in strength (what a ranking loss between them needs).
    """
    strength = strength_at(kind, level)
    if level == 0:
        _check_image(image)
        return image.copy()
    return apply_strength(image, kind, strength, rng)


def apply_strength(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """`kind` at an explicit strength in its own units (module docstring), e.g. JPEG quality 60.

    For checks that name their strengths rather than levels (`bench/synthetic_order.py`).
    """
    _check_image(image)
    out = _distortion(kind)(image, strength, rng)
    assert out.shape == image.shape and out.dtype == np.uint8, (kind, out.shape, out.dtype)
    return out


def pseudo_quality_at(level: float) -> float:
    """`pseudo_quality` for a fractional level: the same line, 100 - 18 * level."""
    if not 0.0 <= float(level) <= LEVELS:
        raise ValueError(f"level must be in 0..{LEVELS}, got {level!r}")
    return 100.0 - 18.0 * float(level)


def random_distortion(
    image: np.ndarray, rng: np.random.Generator, kinds: Sequence[str] = KINDS
) -> tuple[np.ndarray, str, int, float]:
    """(distorted, kind, level, pseudo_quality) with kind uniform over `kinds`, level uniform in 0..LEVELS.

    Level 0 (the pristine image) is as likely as each other level, so a sixth of the samples anchor
    the top of the scale.
    """
    if len(kinds) == 0:
        raise ValueError("kinds must not be empty")
    kind = kinds[int(rng.integers(len(kinds)))]
    level = int(rng.integers(0, LEVELS + 1))
    return distort(image, kind, level, rng), kind, level, pseudo_quality(level)


def default_roots() -> list[Path]:
    """The photo sources on this disk: the BSDS500 folder, then colour photos shipped in wheels.

    Entries are folders (searched recursively) or single files; only existing ones are returned.
    Packages are located with `importlib.util.find_spec`, which does not import them.
    """
    candidates: list[Path] = [Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "images"]
    skimage = _package_dir("skimage")
    if skimage is not None:
        # Colour natural photos only: no synthetic, greyscale, microscopy or texture images.
        for name in (
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "rocket.jpg",
            "motorcycle_left.png",
            "motorcycle_right.png",
            "hubble_deep_field.jpg",
            "retina.jpg",
        ):
            candidates.append(skimage / "data" / name)
    matplotlib = _package_dir("matplotlib")
    if matplotlib is not None:
        candidates.append(matplotlib / "mpl-data" / "sample_data" / "grace_hopper.jpg")
    sklearn = _package_dir("sklearn")
    if sklearn is not None:
        candidates += [sklearn / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")]
    return [path for path in candidates if path.exists()]


def kind_probabilities(kind_weights: dict[str, float] | None) -> np.ndarray:
    """Sampling probabilities over `KINDS` from weights by kind (missing kinds weigh 1).

    Raises ValueError naming a misspelt kind, so a recipe fails when it loads, not mid-run.
    """
    weights = dict(kind_weights or {})
    unknown = sorted(set(weights) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown distortion kinds in kind_weights: {', '.join(unknown)}")
    p = np.array([float(weights.get(k, 1.0)) for k in KINDS])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError("kind_weights must be >= 0 and not all zero")
    probabilities: np.ndarray = p / p.sum()
    return probabilities


def photo_split(extra_roots: Sequence[str | Path] = ()) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos) of `extra_roots` followed by `default_roots()`.

    The one list every consumer splits (pretraining, CSV training's ranking groups, the synthetic
    order check): the same roots in the same order hold out the same photos.
    """
    roots = list(dict.fromkeys([*(Path(r) for r in extra_roots), *default_roots()]))
    return split_photos(pristine_photos(roots))


def split_photos(photos: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos): every tenth photo is held out.

    One rule for pretraining's validation and for the synthetic order check, so neither ever
    scores content the network was trained on.
    """
    return [p for i, p in enumerate(photos) if i % 10], [p for i, p in enumerate(photos) if not i % 10]


def pristine_photos(roots: Sequence[Path] | None = None) -> list[Path]:
    """JPEG/PNG files under `roots` (folders searched recursively, or files), sorted, without duplicates.

    `roots` defaults to `default_roots()`, evaluated at call time so that a data folder that appears
    after import is found. Missing roots are skipped.
    """
    if roots is None:
        roots = default_roots()
    found: dict[Path, Path] = {}
    for root in roots:
        root = Path(root)
        if root.is_dir():
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
        elif root.is_file() and root.suffix.lower() in PHOTO_SUFFIXES:
            paths = [root]
        else:
            continue
        for path in paths:
            found.setdefault(path.resolve(), path)
    return list(found.values())


# --------------------------------------------------------------------------------------------
# Distortions: (image, strength, rng) -> uint8 image of the same shape
# --------------------------------------------------------------------------------------------


def _gaussian_blur(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _pillow_out(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def _motion_blur(image: np.ndarray, length: float, rng: np.random.Generator) -> np.ndarray:
    """Average of `length` copies shifted along a line at a random angle (edge-replicated)."""
    n = int(length)
    theta = rng.uniform(0.0, np.pi)
    t = np.linspace(-(n - 1) / 2, (n - 1) / 2, n)
    dx = np.rint(t * np.cos(theta)).astype(int)
    dy = np.rint(t * np.sin(theta)).astype(int)
    pad = int(max(np.abs(dx).max(), np.abs(dy).max()))
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge").astype(np.uint16)
    acc = np.zeros(image.shape, dtype=np.uint16)  # n * 255 fits: n <= 257
    for x, y in zip(dx, dy, strict=True):
        acc += padded[pad + y : pad + y + h, pad + x : pad + x + w]
    return ((acc + n // 2) // n).astype(np.uint8)


def _gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    noise += image
    return _to_uint8(noise)


def _impulse_noise(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    # Both draws happen at every level and the mask is `u < fraction`, so the corrupted pixels
    # of one seed are nested: a higher level corrupts a superset of a lower level's pixels.
    u = rng.random(image.shape[:2], dtype=np.float32)
    salt = rng.random(image.shape[:2], dtype=np.float32) < 0.5
    out = image.copy()
    hit = u < fraction
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def _jpeg(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    return _codec_round_trip(image, "JPEG", quality=int(quality))


def _webp(image: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    # method=2 keeps the encoder fast (~5 ms for 481x321) at a small cost in efficiency.
    return _codec_round_trip(image, "WEBP", quality=int(quality), method=2)


def _contrast_down(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    mean = float(_luma(image).mean())
    out = image.astype(np.float32)
    out -= mean
    out *= np.float32(factor)
    out += mean
    return _to_uint8(out)


def _brightness_up(image: np.ndarray, stops: float, rng: np.random.Generator) -> np.ndarray:
    return _exposure(image, stops)


def _brightness_down(image: np.ndarray, stops: float, rng: np.random.Generator) -> np.ndarray:
    return _exposure(image, -stops)


def _saturation_shift(image: np.ndarray, log2_gain: float, rng: np.random.Generator) -> np.ndarray:
    sign = 1.0 if rng.random() < 0.5 else -1.0
    gain = np.float32(2.0 ** (sign * log2_gain))
    luma = _luma(image)[..., None]
    out = image.astype(np.float32)
    out -= luma
    out *= gain
    out += luma
    return _to_uint8(out)


def _color_cast(image: np.ndarray, magnitude: float, rng: np.random.Generator) -> np.ndarray:
    # A unit direction in the plane orthogonal to (1, 1, 1): the log gains sum to zero.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    u1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
    u2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)
    gains = np.exp(magnitude * (np.cos(angle) * u1 + np.sin(angle) * u2))
    out = np.empty_like(image)
    for c in range(3):
        out[..., c] = _lut(_CODE * gains[c])[image[..., c]]
    return out


def _pixelate(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize(_scaled(w, h, factor), Image.Resampling.BOX)
    return _pillow_out(small.resize((w, h), Image.Resampling.NEAREST))


def _downsample_blur(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize(_scaled(w, h, factor), Image.Resampling.BILINEAR)
    return _pillow_out(small.resize((w, h), Image.Resampling.BICUBIC))


def _quantize(image: np.ndarray, levels: float, rng: np.random.Generator) -> np.ndarray:
    # Round to the nearest of `levels` evenly spaced values that include 0 and 255: unbiased, so
    # the distortion is banding and lost colours, not a brightness shift.
    step = 255.0 / (int(levels) - 1)
    quantized: np.ndarray = _lut(np.rint(_CODE / step) * step)[image]
    return quantized


_DISTORTIONS: Final[dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]]] = {
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "jpeg": _jpeg,
    "webp": _webp,
    "contrast_down": _contrast_down,
    "brightness_up": _brightness_up,
    "brightness_down": _brightness_down,
    "saturation_shift": _saturation_shift,
    "color_cast": _color_cast,
    "pixelate": _pixelate,
    "downsample_blur": _downsample_blur,
    "quantize": _quantize,
}
assert set(_DISTORTIONS) == set(STRENGTHS)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape [H, W, 3] with H, W >= 1, got {image.shape}")


def _distortion(kind: str) -> Callable[[np.ndarray, float, np.random.Generator], np.ndarray]:
    fn = _DISTORTIONS.get(kind)
    if fn is None:
        raise ValueError(f"unknown distortion kind {kind!r}; expected one of {KINDS}")
    return fn


def _check_level(level: int) -> None:
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level <= LEVELS:
        raise ValueError(f"level must be an int in 0..{LEVELS}, got {level!r}")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def _lut(values: np.ndarray) -> np.ndarray:
    """A 256-entry uint8 lookup table from float values (rounded and clipped)."""
    table: np.ndarray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return table


def _luma(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma as float32 [H, W]."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return image.astype(np.float32) @ weights


def _exposure(image: np.ndarray, stops: float) -> np.ndarray:
    linear = (_CODE / 255.0) ** _GAMMA * 2.0**stops
    exposed: np.ndarray = _lut(255.0 * np.minimum(linear, 1.0) ** (1.0 / _GAMMA))[image]
    return exposed


def _scaled(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width / factor)), max(1, round(height / factor))


def _pillow_out(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).copy()


def _codec_round_trip(image: np.ndarray, fmt: str, **options: object) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **options)
    out = decode_image(buf.getvalue())
    return out if out.flags.writeable else out.copy()


def _package_dir(name: str) -> Path | None:
    """The folder of top-level package `name`, without importing it; None if it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
