"""A fixed set of real photographs, with graded distortions, for checking reduced precisions.

Rank agreement (SRCC) between fp32 and fp16/int8 scores only means something on images whose
quality really differs, so each photo also appears blurred, noisy and JPEG-compressed at two
strengths. The photos ship inside installed wheels (scikit-image's sample data, matplotlib's
Grace Hopper portrait): nothing is downloaded, and the set is identical on every machine.
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from model.decode import decode_image

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)
LONGER_SIDE = 512  # keeps a 56-image check to about a minute at the official size on 2 cores


def _photo_paths() -> list[Path]:
    paths: list[Path] = []
    try:
        data = resources.files("skimage") / "data"
        paths += [Path(str(data / name)) for name in SKIMAGE_PHOTOS if (data / name).is_file()]
    except ModuleNotFoundError:
        pass
    try:
        mpl = resources.files("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if mpl.is_file():
            paths.append(Path(str(mpl)))
    except ModuleNotFoundError:
        pass
    return paths


def _fit(rgb: np.ndarray, longer: int) -> Image.Image:
    img = Image.fromarray(rgb)
    scale = longer / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return img


def _jpeg(img: Image.Image, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return decode_image(buf.getvalue())


def distorted_photos(
    limit: int | None = None, longer_side: int = LONGER_SIDE
) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB) pairs: each photo clean, blurred (sigma 1.5, 4), noisy (sigma 12, 30)
    and JPEG-compressed (quality 25, 8); deterministic. `limit` keeps the first n."""
    out: list[tuple[str, np.ndarray]] = []
    rng = np.random.default_rng(2021)
    for path in _photo_paths():
        img = _fit(decode_image(path), longer_side)
        base = np.asarray(img)
        out.append((f"{path.stem}", base))
        for sigma in (1.5, 4.0):
            out.append(
                (f"{path.stem}-blur{sigma:g}", np.asarray(img.filter(ImageFilter.GaussianBlur(sigma))))
            )
        for sigma in (12.0, 30.0):
            noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 255).astype(np.uint8)
            out.append((f"{path.stem}-noise{sigma:g}", noisy))
        for quality in (25, 8):
            out.append((f"{path.stem}-jpeg{quality}", _jpeg(img, quality)))
    if not out:
        raise RuntimeError("no sample photos found: install the export extra (scikit-image, matplotlib)")
    return out[:limit] if limit else out
