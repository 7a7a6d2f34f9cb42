"""Turn untrusted image bytes into the RGB uint8 array that the packing code expects.

Everything a client can upload ends up here, so this module is where hostile or broken input must
be stopped: one exception type (`ImageDecodeError`, a `ValueError`) with a machine-readable
`reason`, a pixel budget enforced from the header before any pixel is decoded, and no Pillow
exception type leaking to callers.

Pixel semantics are chosen to stay close to the official MUSIQ pipeline (TensorFlow's image ops),
so that scores match the published checkpoints:

* ICC profiles are ignored. TensorFlow's `decode_jpeg`/`decode_png` ignore them too, and the
  published models were trained and evaluated on the raw stored values; colour-managing here would
  shift the inputs away from what the checkpoints saw.
* 16-bit samples keep their high byte (`v >> 8`). That is libpng's `png_set_strip_16`, which is what
  `tf.image.decode_png(..., dtype=uint8)` does, and it is also what Pillow itself does when it
  opens 16-bit RGB/RGBA/LA PNGs (it exposes them as 8-bit modes), so grey and colour 16-bit
  images agree with each other.
* EXIF orientation is applied, because a phone photo is meant to be seen upright and quality raters
  saw it upright. A corrupt EXIF block only loses the orientation; it never rejects the image.
* Transparency is composited over `ALPHA_BACKGROUND`.
* JPEG pixels are decoded by libjpeg-turbo (simplejpeg) with the fast integer IDCT and fancy
  upsampling: the defaults of TensorFlow's `decode_jpeg`, which the published scores were computed
  with. The result equals TensorFlow's bit for bit, where Pillow (accurate IDCT) differs by up to
  17 levels on CLIVE photos. CMYK JPEGs, which libjpeg-turbo cannot convert, go through Pillow.

Only the common raster formats are accepted (`ACCEPTED_FORMATS`): Pillow's long tail of exotic
plugins (EPS shells out to Ghostscript, for instance) is attack surface a scoring service does not
need.

`warnings.catch_warnings` is used to keep Pillow's metadata complaints and its own decompression
bomb warning out of the logs (our `max_pixels` limit governs instead). In Python 3.11 that context
manager swaps the process-wide filter list, so a warning raised by another thread during a decode
can be filtered too; that is harmless for this module's callers.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from typing import IO, Final

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "ALPHA_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageSource",
    "ImageTooLargeError",
    "decode_image",
    "image_size",
]

# 64 MP covers every camera sensor in common use (a 61 MP full-frame file is ~9500x6300) while
# bounding the worst case: decoding needs about 4 bytes per pixel in Pillow plus 3 in the output,
# i.e. roughly 450 MB, which a serving worker can afford; a 30000x30000 "bomb" (2.7 GB) it cannot.
# It is also below Pillow's own 89 MP warning threshold, so by default our limit always fires first.
DEFAULT_MAX_PIXELS: Final[int] = 64_000_000

# Transparent pixels are composited over opaque white because that is what browsers and image
# viewers show for a transparent PNG on a default page, i.e. what a human rater would have seen,
# and because a fixed constant keeps the scores deterministic (no dependence on a checkerboard or
# on whatever colour happens to sit in fully transparent pixels).
ALPHA_BACKGROUND: Final[tuple[int, int, int]] = (255, 255, 255)

# Pillow format names. AVIF is used only where this Pillow build has the plugin.
ACCEPTED_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "PPM", "AVIF")

# Leading bytes of the accepted formats. When Pillow cannot identify data that starts like one of
# them, the file is a damaged image rather than a foreign format, and the error reason says so.
_SIGNATURES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

# Decoded by libjpeg-turbo directly (MPO is a JPEG with extra frames; its first is the photo).
_TURBO_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO"})

_ORIENTATION_TAG: Final[int] = 0x0112
# The same table as PIL.ImageOps.exif_transpose; applied by hand so that an image without an
# orientation is not copied and a broken EXIF block can be told apart from broken pixel data.
_ORIENTATION_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_GREY_16_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES: Final[frozenset[str]] = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str] | os.PathLike[bytes] | IO[bytes]


class ImageDecodeError(ValueError):
    """The input is not an image this service can decode.

    A single type lets the serving layer turn every bad upload into one client error; `reason`
    lets it pick a status code or metric label without parsing the message, which is meant for
    humans.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions pickle as cls(*args); the keyword-only reason would be lost (or break
        # unpickling) when errors cross process boundaries, e.g. from a decode worker pool.
        return (_rebuild_decode_error, (type(self), str(self), self.reason, self.__dict__))


def _rebuild_decode_error(
    cls: type[ImageDecodeError], message: str, reason: str, state: dict[str, object]
) -> ImageDecodeError:
    exc = ImageDecodeError.__new__(cls)
    ValueError.__init__(exc, message)
    exc.__dict__.update(state)
    exc.reason = reason
    return exc


class ImageTooLargeError(ImageDecodeError):
    """The header declares more pixels than the caller allows.

    Raised before decoding, so a decompression bomb costs a header parse, not gigabytes.
    `width`/`height` are None only when Pillow refused the file as a bomb and the size could not
    be re-read without its check.
    """

    def __init__(self, width: int | None, height: int | None, max_pixels: int) -> None:
        if width is not None and height is not None:
            message = (
                f"image is {width}x{height} ({width * height:,} pixels), "
                f"over the limit of {max_pixels:,} pixels"
            )
        else:
            message = f"image has more pixels than the limit of {max_pixels:,}"
        super().__init__(message, reason="too_large")
        self.width = width
        self.height = height
        self.max_pixels = max_pixels


def decode_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `source` to a C-contiguous uint8 array of shape [height, width, 3] (RGB).

    `source` is the encoded bytes (bytes, bytearray, memoryview), a filesystem path, or a binary
    file object (read from its current position to the end). The array may be read-only: for
    plain RGB images it is a view of the single buffer Pillow packs the pixels into, and copying
    it again to make it writeable would only cost time. Copy before mutating in place.

    Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF) yield their first frame. Raises
    `ImageDecodeError` (or its subclass `ImageTooLargeError`) for every kind of bad input.
    """
    _check_max_pixels(max_pixels)
    with _binary_stream(source) as fp, _quiet_pillow():
        img = _open(fp, max_pixels)
        try:
            if img.format in _TURBO_FORMATS and img.mode in ("RGB", "L"):
                return _orient_array(_decode_jpeg(fp), _orientation(img))
            _load(img)
            return _to_rgb_array(_apply_orientation(img))
        finally:
            img.close()


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) as stored in the header, without decoding any pixel.

    This is the size the pixel limit applies to. It is *before* EXIF orientation: for orientations
    5-8 `decode_image` returns an array of shape (width, height, 3). Reading the orientation
    would require decoding PNG/WebP files whose EXIF may follow the pixel data.
    """
    with _binary_stream(source) as fp, _quiet_pillow():
        img = _open(fp, None)
        try:
            return img.size
        finally:
            img.close()


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _empty_error() -> ImageDecodeError:
    return ImageDecodeError("empty input: there are no bytes to decode", reason="empty")


@contextlib.contextmanager
def _binary_stream(source: ImageSource) -> Iterator[IO[bytes]]:
    """Normalise every accepted source to a seekable binary stream (Pillow needs to seek)."""
    if isinstance(source, bytes | bytearray | memoryview):
        if memoryview(source).nbytes == 0:
            raise _empty_error()
        # BytesIO shares an immutable bytes object's buffer; other buffers are copied once.
        yield io.BytesIO(source)
        return
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the with-block below
        except FileNotFoundError as exc:
            raise ImageDecodeError(f"no such file: {path!r}", reason="not_found") from exc
        except OSError as exc:
            raise ImageDecodeError(
                f"cannot read {path!r}: {exc.strerror or exc}", reason="unreadable"
            ) from exc
        with fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                raise _empty_error()
            yield fh
        return
    read = getattr(source, "read", None)
    if callable(read):
        # Read from the current position: Pillow would rewind to offset 0, which is wrong for a
        # stream positioned after a prefix, and impossible for a socket or an upload pipe.
        data = read()
        if not isinstance(data, bytes | bytearray):
            raise TypeError(f"file object must be opened in binary mode, read() gave {type(data).__name__}")
        if not data:
            raise _empty_error()
        yield io.BytesIO(data)
        return
    raise TypeError(
        f"source must be bytes, bytearray, memoryview, a path or a binary file object, got {type(source).__name__}"
    )


@contextlib.contextmanager
def _quiet_pillow() -> Iterator[None]:
    with warnings.catch_warnings():
        # Our max_pixels check replaces Pillow's global bomb threshold.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Pillow reports damaged metadata ("Corrupt EXIF data", malformed MPO, ...) as UserWarning
        # and carries on; we carry on too, and the log noise helps nobody.
        warnings.simplefilter("ignore", UserWarning)
        yield


def _accepted_formats() -> list[str]:
    # Passing a name Pillow has not registered makes Image.open raise KeyError, so filter first
    # (AVIF is absent from some builds). init() imports the plugins once; afterwards it is a no-op.
    Image.init()
    return [name for name in ACCEPTED_FORMATS if name in Image.OPEN]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sniff_format(fp: IO[bytes]) -> str | None:
    try:
        fp.seek(0)
        head = fp.read(16)
    except OSError:
        return None
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if head.startswith(b"RIFF") and (len(head) < 12 or head[8:12] == b"WEBP"):
        return "WEBP"
    return None


def _open(fp: IO[bytes], max_pixels: int | None) -> Image.Image:
    """Parse the header (Image.open is lazy) and enforce the pixel limit before any decoding."""
    formats = _accepted_formats()
    img: Image.Image | None
    try:
        img = Image.open(fp, formats=formats)
    except Image.DecompressionBombError as exc:
        # Pillow's hard limit (2 x MAX_IMAGE_PIXELS) fired before ours could. Re-read the header
        # without it: for the error message, and so that a caller who allows more than Pillow's
        # default is not overruled by a global it did not set.
        img = _open_without_pillow_limit(fp, formats)
        if img is None:
            raise ImageTooLargeError(None, None, 2 * (Image.MAX_IMAGE_PIXELS or 0)) from exc
        if max_pixels is not None and img.width * img.height > max_pixels:
            width, height = img.size
            img.close()
            raise ImageTooLargeError(width, height, max_pixels) from exc
    except UnidentifiedImageError as exc:
        looks_like = _sniff_format(fp)
        if looks_like is not None:
            raise ImageDecodeError(
                f"image data starts like {looks_like} but its header is truncated or corrupt",
                reason="corrupt",
            ) from exc
        raise ImageDecodeError(
            f"not a recognised image format (accepted: {', '.join(formats)})", reason="unrecognised"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            f"image header is truncated or corrupt ({_describe(exc)})", reason="corrupt"
        ) from exc

    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise ImageDecodeError(f"image header declares an empty {width}x{height} image", reason="corrupt")
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(width, height, max_pixels)
    return img


def _open_without_pillow_limit(fp: IO[bytes], formats: list[str]) -> Image.Image | None:
    """What Image.open does, minus its global decompression-bomb check (headers only)."""
    try:
        fp.seek(0)
        prefix = fp.read(16)
    except OSError:
        return None
    for name in formats:
        factory, accept = Image.OPEN[name]
        try:
            accepted = accept(prefix) if accept else True
            if not accepted or isinstance(accepted, str):
                continue
            fp.seek(0)
            return factory(fp, "")
        except MemoryError:
            raise
        except Exception:
            continue
    return None


def _load(img: Image.Image) -> None:
    # ImageFile.LOAD_TRUNCATED_IMAGES stays False (a process-wide switch that would let truncated
    # files decode with grey fill), so a short file raises here and is reported as corrupt.
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        # GIF frames and TIFF tiles are checked against Pillow's global limit during load.
        raise ImageDecodeError(
            f"image declares an oversized frame or tile ({_describe(exc)})", reason="too_large"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            f"image data is truncated or corrupt ({_describe(exc)})", reason="corrupt"
        ) from exc


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 when absent or unparseable.

    For PNG call it after load(): the eXIf chunk may follow the pixel data. An unparseable EXIF
    block keeps the stored orientation rather than rejecting good pixels.
    """
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG)
    except MemoryError:
        raise
    except Exception:
        return 1
    return orientation if isinstance(orientation, int) and orientation in _ORIENTATION_TRANSPOSE else 1


def _apply_orientation(img: Image.Image) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(_orientation(img))
    return img if method is None else img.transpose(method)


def _orient_array(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """`_ORIENTATION_TRANSPOSE` on an [H, W, C] array, as strided views plus one copy."""
    views = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: a.transpose(1, 0, 2)[::-1],
    }
    view = views.get(orientation)
    return rgb if view is None else np.ascontiguousarray(view(rgb))


def _decode_jpeg(fp: IO[bytes]) -> np.ndarray:
    """TensorFlow-identical JPEG pixels: fast integer IDCT, fancy upsampling (see module doc)."""
    fp.seek(0)
    data = fp.read()
    try:
        pixels: np.ndarray = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=True, fastupsample=False, strict=True
        )  # simplejpeg has no type hints
        return pixels
    except MemoryError:
        raise
    except Exception as exc:  # ValueError for corrupt data; anything else is corruption too
        raise ImageDecodeError(
            f"image data is truncated or corrupt ({_describe(exc)})", reason="corrupt"
        ) from exc


def _convert(img: Image.Image, mode: str) -> Image.Image:
    try:
        return img.convert(mode)
    except ValueError as exc:
        raise ImageDecodeError(
            f"image mode {img.mode!r} cannot be converted to {mode} ({_describe(exc)})",
            reason="unsupported_mode",
        ) from exc


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, np.newaxis], 3, axis=2)


def _composite_over_background(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3])
    # Exact round(rgb * a / 255 + bg * (255 - a) / 255). The numerator is at most 255 * 255 + 127,
    # so uint16 holds it and the whole blend stays in cheap integer arithmetic.
    a16 = alpha.astype(np.uint16)
    background = np.array(ALPHA_BACKGROUND, dtype=np.uint16)
    blended = rgba[:, :, :3] * a16 + background * (255 - a16) + 127
    blended //= 255
    return blended.astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _GREY_16_MODES or mode == "I":
        return _wide_grey_to_rgb(img)
    if mode == "F":
        # Float TIFFs have no agreed range; Pillow's convert clips to 0..255 and truncates, and
        # following it keeps our output identical to any Pillow-based tool.
        return np.asarray(_convert(img, "L").convert("RGB"))
    if mode in _ALPHA_MODES or img.has_transparency_data:
        # Alpha channels, palette transparency and tRNS colour keys all end up as RGBA here.
        if mode == "La":
            img = _convert(img, "LA")  # Pillow has no direct La -> RGBA conversion
        rgba = img if img.mode == "RGBA" else _convert(img, "RGBA")
        return _composite_over_background(np.asarray(rgba))
    if mode == "RGB":
        # One packing pass (Pillow stores RGB as 4 bytes per pixel) and no further copy.
        return np.asarray(img)
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX and any mode a future Pillow adds: Pillow's textbook
    # conversions, with no colour management (CMYK JPEGs from Adobe are already un-inverted by
    # Pillow's JPEG plugin).
    return np.asarray(_convert(img, "RGB"))


def _wide_grey_to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode == "I":
        # 32-bit integer grey (TIFF, some PGM): treated as 16-bit data, out-of-range values clipped.
        grey16 = np.clip(np.asarray(img), 0, 65535)
    else:
        grey16 = np.asarray(img).astype(np.uint16, copy=False)
    # Pillow's own I;16 -> L conversion clamps at 255 instead of scaling; keep the high byte.
    rgb = _grey_to_rgb((grey16 >> 8).astype(np.uint8))
    key = img.info.get("transparency")
    if isinstance(key, int):
        # A tRNS colour key on 16-bit grey: Pillow cannot convert that to RGBA without clamping,
        # so apply it here. Keyed pixels are fully transparent, i.e. pure background.
        rgb[grey16 == key] = ALPHA_BACKGROUND
    return rgb
