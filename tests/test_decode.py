"""Tests for model.decode: every image is generated here, in memory, so the expected pixels are known."""

from __future__ import annotations

import io
import pickle
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from model.decode import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    image_size,
)

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def hand_png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG assembled byte by byte, for what Pillow will not write (16-bit RGB, lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """16-bit PNG of `samples` ([H, W] grey or [H, W, C]), filter type 0 on every row."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))
    return hand_png(width, height, 16, color_type, zlib.compress(rows))


def patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF0) dimensions by walking the marker segments."""
    pos = 2  # after SOI
    while pos < len(data):
        assert data[pos] == 0xFF, "lost marker sync"
        marker = data[pos + 1]
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xC0:
            # segment: FFC0, length(2), precision(1), height(2), width(2)
            return data[: pos + 5] + struct.pack(">HH", height, width) + data[pos + 9 :]
        pos += 2 + length
    raise AssertionError("no SOF0 marker")


def reason_of(source: object, **kwargs: object) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(source, **kwargs)  # type: ignore[arg-type]  # the tests pass bad sources on purpose
    return info.value.reason


# --------------------------------------------------------------------------------------------
# Plain RGB
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "exact"),
    [
        ("PNG", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("BMP", {}, True),
        ("TIFF", {}, True),
        ("PPM", {}, True),
        ("JPEG", {"quality": 95}, False),
        ("WEBP", {"quality": 90}, False),
    ],
)
def test_rgb_roundtrip(fmt: str, kwargs: dict[str, object], exact: bool) -> None:
    # Smooth content so that the lossy codecs stay close; width != height to catch H/W swaps.
    yy, xx = np.mgrid[0:23, 0:37]
    arr = np.stack([xx * 6, yy * 10, (xx + yy) * 4], axis=2).astype(np.uint8)
    out = decode_image(encode(Image.fromarray(arr), fmt, **kwargs))
    assert out.shape == (23, 37, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    if exact:
        np.testing.assert_array_equal(out, arr)
    else:
        assert np.abs(out.astype(int) - arr).mean() < 3


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 17), st.integers(1, 17), st.just(3))))
def test_png_roundtrip_is_bit_exact(arr: np.ndarray) -> None:
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_jpeg_uses_tensorflows_fast_idct(subsampling: int) -> None:
    # TensorFlow's decode_jpeg default (fast integer IDCT, fancy upsampling), not Pillow's accurate
    # IDCT: close to Pillow's pixels but not equal (tests/test_tensorflow_parity.py checks equality
    # with TensorFlow itself).
    data = encode(Image.fromarray(random_rgb(48, 64)), "JPEG", quality=80, subsampling=subsampling)
    ours = decode_image(data).astype(int)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    fast = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    np.testing.assert_array_equal(ours, fast)
    assert ours.shape == pillow.shape and np.abs(ours - pillow).mean() < 2
    assert (ours != pillow).any()


def test_grey_jpeg_through_libjpeg_turbo() -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))
    out = decode_image(encode(Image.fromarray(grey, "L"), "JPEG", quality=95))
    assert out.shape == (16, 64, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - grey).max() <= 4


# --------------------------------------------------------------------------------------------
# Grey, bilevel, palette
# --------------------------------------------------------------------------------------------


def test_grey_l_replicates_the_value() -> None:
    grey = np.array([[0, 1, 127], [128, 254, 255]], dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(grey, mode="L"), "PNG"))
    assert out.shape == (2, 3, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


def test_bilevel_mode_1() -> None:
    bits = np.array([[True, False, True], [False, True, False]])
    img = Image.fromarray(bits)
    assert img.mode == "1"
    for fmt in ("PNG", "BMP", "TIFF"):
        out = decode_image(encode(img, fmt))
        np.testing.assert_array_equal(out, np.where(bits, 255, 0)[:, :, None].repeat(3, axis=2), err_msg=fmt)


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 2), 0)
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    img.putpixel((1, 0), 1)
    img.putpixel((2, 1), 2)
    return img


def test_palette_png_without_transparency() -> None:
    data = encode(_palette_image(), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert tuple(out[1, 2]) == (0, 255, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_goes_over_white(fmt: str) -> None:
    data = encode(_palette_image(), fmt, transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P"
    assert "transparency" in opened.info
    out = decode_image(data)
    assert tuple(out[0, 0]) == ALPHA_BACKGROUND  # index 0 is fully transparent
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert tuple(out[1, 2]) == (0, 255, 0)


def test_palette_png_with_partial_alpha_in_trns() -> None:
    data = encode(_palette_image(), "PNG", transparency=bytes([255, 0, 128]))
    out = decode_image(data)
    assert tuple(out[0, 0]) == (10, 20, 30)  # alpha 255
    assert tuple(out[0, 1]) == (255, 255, 255)  # alpha 0
    expected = [round(c * 128 / 255 + 255 * 127 / 255) for c in (0, 255, 0)]
    assert np.abs(out[1, 2].astype(int) - expected).max() <= 1


def test_rgb_png_colour_key_transparency() -> None:
    arr = np.array([[[200, 100, 50], [1, 2, 3]]], dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr), "PNG", transparency=(200, 100, 50)))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (1, 2, 3)


# --------------------------------------------------------------------------------------------
# Alpha
# --------------------------------------------------------------------------------------------


def _blend(value: int, alpha: int, background: int = 255) -> float:
    return value * alpha / 255 + background * (255 - alpha) / 255


def test_alpha_background_is_white() -> None:
    assert ALPHA_BACKGROUND == (255, 255, 255)


@pytest.mark.parametrize(
    ("fmt", "kwargs"), [("PNG", {}), ("WEBP", {"lossless": True, "exact": True}), ("TIFF", {})]
)
def test_rgba_composited_over_white(fmt: str, kwargs: dict[str, object]) -> None:
    rgba = np.array(
        [[[200, 100, 50, 0], [200, 100, 50, 255], [200, 100, 50, 128], [0, 0, 0, 1]]], dtype=np.uint8
    )
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), fmt, **kwargs))
    assert out.shape == (1, 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (200, 100, 50)
    expected = np.array([_blend(c, 128) for c in (200, 100, 50)])
    assert np.abs(out[0, 2] - expected).max() <= 1
    assert np.abs(out[0, 3] - np.array([_blend(0, 1)] * 3)).max() <= 1


def test_rgba_blend_is_exactly_rounded() -> None:
    values = np.arange(256, dtype=np.uint8)
    alphas = np.arange(256, dtype=np.uint8)
    v, a = np.meshgrid(values, alphas, indexing="ij")
    rgba = np.stack([v, v, v, a], axis=2)
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    expected = np.floor(v.astype(float) * a / 255 + 255.0 * (255 - a.astype(float)) / 255 + 0.5)
    np.testing.assert_array_equal(out[:, :, 0], expected.astype(np.uint8))


def test_opaque_rgba_is_the_rgb() -> None:
    rgb = random_rgb(5, 7)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=2)
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_grey_alpha_la() -> None:
    la = np.array([[[100, 0], [100, 255], [100, 128]]], dtype=np.uint8)
    data = encode(Image.fromarray(la, mode="LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    out = decode_image(data)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (100, 100, 100)
    assert np.abs(out[0, 2].astype(int) - _blend(100, 128)).max() <= 1


# --------------------------------------------------------------------------------------------
# CMYK and other colour spaces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [
        ((255, 0, 0, 0), (0, 255, 255)),  # cyan
        ((0, 255, 0, 0), (255, 0, 255)),  # magenta
        ((0, 0, 255, 0), (255, 255, 0)),  # yellow
        ((0, 0, 0, 255), (0, 0, 0)),  # black
        ((0, 0, 0, 0), (255, 255, 255)),  # paper
    ],
)
def test_cmyk(fmt: str, cmyk: tuple[int, ...], rgb: tuple[int, int, int]) -> None:
    data = encode(Image.new("CMYK", (16, 16), cmyk), fmt)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.shape == (16, 16, 3)
    tolerance = 3 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - rgb).max() <= tolerance


@pytest.mark.parametrize("mode", ["LAB", "YCbCr"])
def test_other_colour_spaces_via_pillow(mode: str) -> None:
    data = encode(Image.new(mode, (4, 3), (100, 120, 140)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    expected = Image.new(mode, (1, 1), (100, 120, 140)).convert("RGB").getpixel((0, 0))
    out = decode_image(data)
    assert out.shape == (3, 4, 3)
    assert (out == expected).all()


# --------------------------------------------------------------------------------------------
# High bit depth
# --------------------------------------------------------------------------------------------


def test_grey16_png_scaled_by_value_range() -> None:
    values = np.array([[65535, 32896, 257, 0, 1000, 65280]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    # 65535 -> 255, 32896 -> 128, 257 -> 1 (not Pillow's convert("L"), which clamps all three to 255).
    # The low byte is dropped (1000 -> 3), as libpng's strip_16 in TensorFlow and Pillow's own
    # 16-bit RGB PNG path do.
    np.testing.assert_array_equal(out[0, :, 0], [255, 128, 1, 0, 3, 255])
    assert (out == out[:, :, :1]).all()


def test_grey16_hand_built_png_and_tiff_agree() -> None:
    values = np.array([[65535, 32896], [257, 12345]], dtype=np.uint16)
    from_png = decode_image(png16(values, color_type=0))
    from_tiff = decode_image(encode(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(from_png, from_tiff)
    np.testing.assert_array_equal(from_png[:, :, 1], values >> 8)


def test_rgb16_png_matches_grey16_mapping() -> None:
    # Pillow 13 opens a 16-bit RGB PNG as 8-bit "RGB" (high byte only); grey must agree with it.
    samples = np.array([[[65535, 0, 32896], [257, 1000, 40000]]], dtype=np.uint16)
    data = png16(samples, color_type=2)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    out = decode_image(data)
    np.testing.assert_array_equal(out, (samples >> 8).astype(np.uint8))
    for channel in range(3):
        grey = decode_image(png16(samples[:, :, channel], color_type=0))
        np.testing.assert_array_equal(grey[:, :, 0], out[:, :, channel])


def test_rgba16_png() -> None:
    samples = np.array([[[65535, 0, 32896, 65535], [257, 1000, 40000, 0]]], dtype=np.uint16)
    out = decode_image(png16(samples, color_type=6))
    assert tuple(out[0, 0]) == (255, 0, 128)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_grey_alpha16_png() -> None:
    samples = np.array([[[32896, 65535], [32896, 0]]], dtype=np.uint16)
    out = decode_image(png16(samples, color_type=4))
    assert tuple(out[0, 0]) == (128, 128, 128)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_grey16_colour_key_transparency() -> None:
    values = np.array([[1000, 32896]], dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(values), "PNG", transparency=1000))
    assert tuple(out[0, 0]) == ALPHA_BACKGROUND
    assert tuple(out[0, 1]) == (128, 128, 128)


def test_int32_grey_tiff_clipped_to_16_bit() -> None:
    values = np.array([[-5, 0, 65535, 100_000, 32896]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data)[0, :, 2], [0, 0, 255, 255, 128])


def test_float_grey_tiff_follows_pillow_clipping() -> None:
    values = np.array([[-1.0, 0.4, 128.0, 254.6, 300.0]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(decode_image(data)[0, :, 1], [0, 0, 128, 254, 255])


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------

# Where stored pixel (row 0, col 0) must end up for each EXIF orientation, written from the EXIF
# specification's row/column wording rather than from Pillow's transpose table.
EXPECTED_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored: (0,0) -> top-right
    3: lambda a: a[::-1, ::-1],  # 180 degrees: -> bottom-right
    4: lambda a: a[::-1, :],  # mirrored vertically: -> bottom-left
    5: lambda a: a.transpose(1, 0, 2),  # row 0 is the left side, col 0 the top: -> top-left
    6: lambda a: np.rot90(a, k=-1),  # row 0 is the right side, col 0 the top: -> top-right
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # row 0 right, col 0 bottom: -> bottom-right
    8: lambda a: np.rot90(a, k=1),  # row 0 is the left side, col 0 the bottom: -> bottom-left
}


def with_orientation(arr: np.ndarray, orientation: int, fmt: str, **kwargs: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), fmt, exif=exif, **kwargs)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_lossless(fmt: str, orientation: int) -> None:
    arr = random_rgb(4, 6, seed=orientation)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(with_orientation(arr, orientation, fmt, **kwargs))
    expected = EXPECTED_ORIENTATION[orientation](arr)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg_all_eight(orientation: int) -> None:
    # JPEG pixels come from libjpeg-turbo and are oriented in numpy: same table as the lossless path
    data = with_orientation(random_rgb(16, 24, seed=orientation), orientation, "JPEG", quality=90)
    stored = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    out = decode_image(data)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, EXPECTED_ORIENTATION[orientation](stored))


@pytest.mark.parametrize(
    ("orientation", "shape", "red_corner"),
    [
        (3, (48, 80), (47, 79)),  # bottom-right
        (6, (80, 48), (0, 47)),  # top-right
        (8, (80, 48), (79, 0)),  # bottom-left
    ],
)
def test_exif_orientation_jpeg_moves_the_marked_corner(
    orientation: int, shape: tuple[int, int], red_corner: tuple[int, int]
) -> None:
    arr = np.zeros((48, 80, 3), dtype=np.uint8)
    arr[:16, :16] = (255, 0, 0)  # stored top-left block
    out = decode_image(with_orientation(arr, orientation, "JPEG", quality=95))
    assert out.shape == (*shape, 3)
    row, col = red_corner
    assert out[row, col, 0] > 200 and out[row, col, 1:].max() < 60
    # ... and the stored corner position is now black.
    assert out[0, 0].max() < 60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    "payload",
    [
        b"Exif\x00\x00garbage",
        b"\x00\x01\x02",
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12",  # IFD claims 5 entries, has none
        b"Exif\x00\x00II*\x00\xff\xff\xff\xff",  # IFD offset far past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01",  # truncated entry
    ],
)
def test_corrupt_exif_still_decodes(fmt: str, payload: bytes) -> None:
    arr = np.zeros((8, 12, 3), dtype=np.uint8)
    arr[:, :6] = (10, 200, 30)
    kwargs: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(Image.fromarray(arr), fmt, exif=payload, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape either
        out = decode_image(data)
    # Lossy JPEG: the pixels must be exactly the plain decode (TensorFlow's fast IDCT), orientation
    # untouched.
    expected = arr
    if fmt == "JPEG":
        expected = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------------------------
# Multi-frame
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [
        ("GIF", {"duration": 100, "loop": 0}),
        ("PNG", {"duration": 100, "loop": 0}),
        ("WEBP", {"duration": 100, "loop": 0, "lossless": True}),
        ("TIFF", {}),
    ],
)
def test_multi_frame_gives_first_frame(fmt: str, kwargs: dict[str, object]) -> None:
    frames = [Image.new("RGB", (5, 3), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert out.shape == (3, 5, 3)
    assert (out == (255, 0, 0)).all()


# --------------------------------------------------------------------------------------------
# Broken and foreign input
# --------------------------------------------------------------------------------------------


def _assert_corrupt(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert type(info.value) is ImageDecodeError
    assert info.value.reason == "corrupt", str(info.value)


def _sample_jpeg() -> bytes:
    return encode(Image.fromarray(random_rgb(64, 96, seed=3)), "JPEG", quality=90)


def _sample_png() -> bytes:
    return encode(Image.fromarray(random_rgb(64, 96, seed=4)), "PNG")


@pytest.mark.parametrize("fraction", [None, 0.25, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("cut", [3, 8, 20, 100, 200])
def test_truncated_jpeg_is_corrupt(cut: int, fraction: float | None) -> None:
    data = _sample_jpeg()
    end = int(len(data) * fraction) if fraction is not None else cut
    _assert_corrupt(data[:end])


def test_jpeg_missing_only_its_end_marker_is_corrupt() -> None:
    data = _sample_jpeg()
    assert data.endswith(b"\xff\xd9")
    _assert_corrupt(data[:-2])
    _assert_corrupt(data[:-1])


@pytest.mark.parametrize("fraction", [None, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("cut", [8, 16, 30, 50])
def test_truncated_png_is_corrupt(cut: int, fraction: float | None) -> None:
    data = _sample_png()
    end = int(len(data) * fraction) if fraction is not None else cut
    _assert_corrupt(data[:end])


def test_truncation_never_fills_with_grey() -> None:
    # Decoding a truncated file must not have flipped Pillow's process-wide switch.
    with pytest.raises(ImageDecodeError):
        decode_image(_sample_jpeg()[:1000])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_with_garbage_compressed_stream_is_corrupt() -> None:
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    _assert_corrupt(data[:start] + b"\x78\x9c" + b"\xff" * (length - 2) + data[start + length :])


def test_random_byte_mutations_raise_only_decode_errors() -> None:
    rng = np.random.default_rng(12345)
    originals = [_sample_jpeg(), _sample_png(), encode(_palette_image(), "GIF")]
    for _ in range(300):
        data = bytearray(originals[int(rng.integers(len(originals)))])
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(256))
        try:
            out = decode_image(bytes(data), max_pixels=1_000_000)
        except ImageDecodeError:
            continue
        assert out.dtype == np.uint8
        assert out.ndim == 3 and out.shape[2] == 3


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_unrecognised(seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    assert reason_of(data) == "unrecognised"


@pytest.mark.parametrize(
    "data",
    [
        b"hello world, definitely not an image",
        b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n",
        # Pillow can open EPS (via Ghostscript), but a scoring service must not.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"\x89P",  # too short to tell
    ],
)
def test_foreign_formats_are_unrecognised(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == "unrecognised"
    assert "not a recognised image format" in str(info.value)


def test_accepted_but_unlisted_pillow_format_is_unrecognised() -> None:
    # A perfectly valid image in a format Pillow reads but the service does not accept.
    data = encode(Image.new("RGB", (4, 4), (1, 2, 3)), "PCX")
    assert Image.open(io.BytesIO(data)).format == "PCX"
    assert reason_of(data) == "unrecognised"


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: b"",
        lambda tmp: bytearray(),
        lambda tmp: memoryview(b""),
        lambda tmp: io.BytesIO(),
        lambda tmp: _touch(tmp / "empty.png"),
        lambda tmp: str(_touch(tmp / "empty2.jpg")),
    ],
)
def test_empty_input(make: Callable[[Path], object], tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(make(tmp_path))  # type: ignore[arg-type]  # every kind of source, typed object
    assert info.value.reason == "empty"
    assert "empty" in str(info.value)


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "image.jpg"
    for source in (missing, str(missing)):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(source)
        assert info.value.reason == "not_found"
        assert str(missing) in str(info.value)


def test_directory_path_is_unreadable(tmp_path: Path) -> None:
    assert reason_of(tmp_path) == "unreadable"


def test_decode_error_is_a_value_error_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="not a recognised image format"):
        decode_image(b"nonsense bytes here")


def test_errors_survive_pickling() -> None:
    plain = ImageDecodeError("image data is truncated or corrupt (x)", reason="corrupt")
    copy = pickle.loads(pickle.dumps(plain))
    assert type(copy) is ImageDecodeError
    assert (str(copy), copy.reason) == (str(plain), "corrupt")
    big = pickle.loads(pickle.dumps(ImageTooLargeError(300, 200, 1000)))
    assert type(big) is ImageTooLargeError
    assert (big.reason, big.width, big.height, big.max_pixels) == ("too_large", 300, 200, 1000)
    assert "300x200" in str(big)


# --------------------------------------------------------------------------------------------
# Pixel limit
# --------------------------------------------------------------------------------------------


def lying_png(width: int, height: int) -> bytes:
    """A header claiming width x height RGB over a tiny, bogus body."""
    return hand_png(width, height, 8, 2, zlib.compress(b"\x00" * 64))


def test_default_limit_is_64_megapixels() -> None:
    assert DEFAULT_MAX_PIXELS == 64_000_000


def test_png_bomb_rejected_from_header() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither Pillow's bomb error nor its warning may leak
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(lying_png(30000, 30000))
    # Decoding 900 MP (2.7 GB of RGB) could never finish this fast: nothing was decoded.
    assert time.perf_counter() - start < 1.0
    err = info.value
    assert err.reason == "too_large"
    assert isinstance(err, ImageDecodeError)
    assert (err.width, err.height, err.max_pixels) == (30000, 30000, DEFAULT_MAX_PIXELS)
    assert "30000x30000" in str(err)
    assert "64,000,000" in str(err)
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_header_between_our_limit_and_pillows_raises_no_warning() -> None:
    # 100 MP: over our 64 MP default and over Pillow's warning threshold, under its hard limit.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(lying_png(10000, 10000))
    assert "10000x10000" in str(info.value)


def test_caller_limit_above_pillows_hard_limit_is_honoured() -> None:
    # 900 MP is over Pillow's global 179 MP cap; a caller allowing 1 GP gets past the header and
    # fails only because this body is bogus.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError) as info:
            decode_image(lying_png(30000, 30000), max_pixels=1_000_000_000)
    assert info.value.reason == "corrupt"


def test_jpeg_bomb_rejected_from_header() -> None:
    data = patch_jpeg_size(encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"), 60000, 60000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert "60000x60000" in str(info.value)


def test_patched_jpeg_size_is_what_pillow_reads() -> None:
    data = patch_jpeg_size(encode(Image.new("RGB", (16, 16)), "JPEG"), 300, 200)
    assert Image.open(io.BytesIO(data)).size == (300, 200)


@pytest.mark.parametrize(("side", "ok"), [(9, True), (10, True), (11, False), (20, False)])
def test_max_pixels_honoured(side: int, ok: bool) -> None:
    data = encode(Image.new("RGB", (side, side), (5, 6, 7)), "PNG")
    if ok:
        assert decode_image(data, max_pixels=100).shape == (side, side, 3)
    else:
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(data, max_pixels=100)
        assert f"{side}x{side}" in str(info.value)
        assert (info.value.width, info.value.height, info.value.max_pixels) == (side, side, 100)


def test_pixel_limit_uses_the_stored_size_for_rotated_images() -> None:
    data = with_orientation(np.zeros((5, 20, 3), np.uint8), 6, "PNG")
    assert decode_image(data, max_pixels=100).shape == (20, 5, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=99)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_invalid_max_pixels(bad: object) -> None:
    with pytest.raises(ValueError, match="max_pixels") as info:
        decode_image(_sample_png(), max_pixels=bad)  # type: ignore[arg-type]  # invalid on purpose
    assert not isinstance(info.value, ImageDecodeError)


def test_zero_sized_header_is_corrupt() -> None:
    assert reason_of(lying_png(0, 10)) in {"corrupt"}


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class _StreamOnly:
    """A non-seekable stream, like a socket or an upload body."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._buf.read(size)


def test_every_source_kind_gives_the_same_pixels(tmp_path: Path) -> None:
    arr = random_rgb(7, 9, seed=11)
    data = encode(Image.fromarray(arr), "PNG")
    path = tmp_path / "image.png"
    path.write_bytes(data)
    sources: list[object] = [
        data,
        bytearray(data),
        memoryview(data),
        memoryview(b"xx" + data)[2:],
        io.BytesIO(data),
        _StreamOnly(data),
        path,
        str(path),
    ]
    for source in sources:
        np.testing.assert_array_equal(decode_image(source), arr)  # type: ignore[arg-type]  # mixed kinds
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(decode_image(fh), arr)


def test_file_object_is_read_from_its_current_position() -> None:
    arr = random_rgb(3, 4, seed=12)
    stream = io.BytesIO(b"HEADER" + encode(Image.fromarray(arr), "PNG"))
    stream.read(6)
    np.testing.assert_array_equal(decode_image(stream), arr)


def test_text_stream_and_other_objects_are_type_errors() -> None:
    with pytest.raises(TypeError, match="binary mode"):
        decode_image(io.StringIO("abc"))  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(TypeError):
        decode_image(12345)  # type: ignore[arg-type]  # the wrong type on purpose


def test_image_size_reads_the_header_only(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (37, 23)), "JPEG")
    assert image_size(data) == (37, 23)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    assert image_size(path) == (37, 23)
    # No limit applies, and the bogus body is never touched.
    assert image_size(lying_png(30000, 20000)) == (30000, 20000)
    with pytest.raises(ImageDecodeError) as info:
        image_size(b"not an image at all")
    assert info.value.reason == "unrecognised"
    with pytest.raises(ImageDecodeError) as info:
        image_size(b"")
    assert info.value.reason == "empty"
