"""A seeded generator of hostile and odd image uploads, built in memory (nothing is committed).

Every case says what the server must answer: `ok` (a score: the file is a legitimate if unusual
image) or the HTTP status and error code(s) of a refusal. The same cases drive the REST and the
gRPC tests (`test_hostile.py`) and seed the fuzzer's corpus (`fuzz_decode.py`). Run it as a
script to print the catalogue: `python -m tests.reliability.hostile`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The refusals a bad image may earn (a damaged header can look foreign: 415; damaged data: 400).
OK = ((200, "ok"),)
BAD_IMAGE = ((400, "image_corrupt"), (415, "image_unrecognised"))
TOO_LARGE = ((413, "image_too_large"), (413, "too_many_tokens"))


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    # Every acceptable (HTTP status, error code); (200, "ok") is a score.
    expect: tuple[tuple[int, str], ...] = ((200, "ok"),)
    content_type: str | None = "application/octet-stream"  # None: no Content-Type header


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(rng: np.random.Generator, h: int = 96, w: int = 128) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, not like pure noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a token IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF marker is rewritten to claim width x height."""
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = out.find(marker)
        if at >= 0:
            out[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(out)
    raise ValueError("no SOF marker")


def gif_claiming(data: bytes, width: int, height: int) -> bytes:
    """A real GIF whose logical screen and first frame claim width x height."""
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", width, height)
    at = out.find(b"\x2c")  # the first image descriptor
    out[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(out)


def tiff_claiming(width: int, height: int) -> bytes:
    """A hand-built little-endian TIFF header claiming width x height, with one tiny strip."""
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 9 * 12 + 4),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 16),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHII", tag, kind, count, value)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    """A RIFF/WEBP file with only a VP8X header claiming a width x height canvas."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def _with_exif_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, "JPEG", quality=85, exif=exif.tobytes())


def _jpeg_with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """Inserts an APPn segment right after SOI (payload up to 65533 bytes)."""
    seg = bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + seg + jpeg[2:]


def _animated(rng: np.random.Generator, fmt: str, frames: int = 4) -> bytes:
    imgs = [_photo(rng, 48, 64) for _ in range(frames)]
    kw: dict[str, object] = {"save_all": True, "append_images": imgs[1:], "duration": 80, "loop": 0}
    if fmt == "GIF":
        imgs = [im.convert("P", palette=Image.Palette.ADAPTIVE) for im in imgs]
        kw["append_images"] = imgs[1:]
    return _save(imgs[0], fmt, **kw)


def truncation_offsets(size: int, count: int = 12) -> list[int]:
    """Powers of two near the header plus evenly spaced cuts through the data (all < size)."""
    head = [n for n in (1, 2, 3, 4, 8, 12, 16, 24, 32, 64, 100, 200) if n < size]
    body = [int(size * f) for f in np.linspace(0.1, 0.97, count)]
    return sorted({*head, *body, size - 1})


def image_cases(seed: int = 0) -> list[Case]:
    """Image bodies (sent raw over REST and as the `image` field over gRPC)."""
    rng = np.random.default_rng(seed)
    photo = _photo(rng)
    cases: list[Case] = [Case("empty", b"", ((400, "empty_body"),))]

    # Random bytes of many lengths.
    for n in (1, 2, 7, 64, 1000, 65_536, 400_000):
        cases.append(Case(f"random-{n}", rng.bytes(n), BAD_IMAGE))
    cases.append(Case("zeros-4096", bytes(4096), BAD_IMAGE))
    cases.append(Case("text", b"hello, I am not an image\n" * 40, BAD_IMAGE))

    # The four web formats, whole and truncated at many offsets.
    encoded = {
        "jpeg": _save(photo, "JPEG", quality=90),
        "progressive-jpeg": _save(photo, "JPEG", quality=90, progressive=True),
        "png": _save(photo, "PNG"),
        "webp": _save(photo, "WEBP", quality=80),
        "gif": _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
    }
    for fmt, data in encoded.items():
        cases.append(Case(f"{fmt}-whole", data))
        for cut in truncation_offsets(len(data)):
            # A cut inside the trailer (PNG's IEND chunk, GIF's ';') leaves every pixel intact.
            expect = (*BAD_IMAGE, *OK) if cut >= len(data) - 12 and fmt in ("png", "gif") else BAD_IMAGE
            cases.append(Case(f"{fmt}-truncated-{cut}of{len(data)}", data[:cut], expect))
        # A flipped byte in the middle of the data: decodes to garbage pixels or is refused.
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        cases.append(Case(f"{fmt}-bitflip", bytes(flipped), (*BAD_IMAGE, *OK)))

    # Polyglots: an image with something else appended, or something else wearing an image's bytes.
    jpeg = encoded["jpeg"]
    zip_tail = b"PK\x03\x04" + rng.bytes(300) + b"PK\x05\x06" + bytes(18)
    cases += [
        Case("polyglot-jpeg+zip", jpeg + zip_tail),
        Case("polyglot-png+html", encoded["png"] + b"<html><script>alert(1)</script></html>"),
        Case("polyglot-gif+js", encoded["gif"] + b"/*\n*/=1;alert(document.domain);"),
        Case("polyglot-jpeg-comment-php", _jpeg_with_segment(jpeg, 0xFE, b"<?php system($_GET['c']); ?>")),
        Case("polyglot-pdf-then-jpeg", b"%PDF-1.4\n%\xe2\xe3\n" + jpeg, BAD_IMAGE),
        Case("polyglot-html-then-png", b"<!doctype html><img src=x>" + encoded["png"], BAD_IMAGE),
        Case("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', BAD_IMAGE),
        Case("url-not-image", b"http://169.254.169.254/latest/meta-data/", BAD_IMAGE),
        Case("eps-header", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", BAD_IMAGE),
        Case("zip-only", zip_tail, BAD_IMAGE),
    ]

    # Degenerate shapes.
    for h, w in ((1, 1), (1, 100_000), (100_000, 1), (2, 3), (33, 1)):
        grey = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        cases.append(Case(f"png-{w}x{h}", _save(grey, "PNG")))
    cases.append(Case("jpeg-1x1", _save(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG")))

    # Decompression bombs: headers claiming 30000x30000 and more.
    for w, h in ((30_000, 30_000), (65_535, 65_535), (100_000, 100_000), (2**31 - 1, 2**31 - 1)):
        cases.append(Case(f"bomb-png-{w}x{h}", png_header_only(w, h), (*TOO_LARGE, *BAD_IMAGE)))
    for w, h in ((30_000, 30_000), (65_535, 65_535), (65_535, 1)):
        refusals = TOO_LARGE if w * h > 4_000_000 else (*TOO_LARGE, *BAD_IMAGE)
        cases.append(Case(f"bomb-jpeg-{w}x{h}", jpeg_claiming(jpeg, w, h), refusals))
    cases.append(Case("bomb-gif-65535x65535", gif_claiming(encoded["gif"], 65_535, 65_535), TOO_LARGE))
    cases.append(Case("bomb-tiff-100000x100000", tiff_claiming(100_000, 100_000), TOO_LARGE))
    cases.append(Case("bomb-webp-16384x16384", webp_vp8x_claiming(16_384, 16_384), (*TOO_LARGE, *BAD_IMAGE)))
    # A real zlib bomb under the pixel limit (1900x1900 of zeros: ~10 KB that inflate to 11 MB) is fine.
    cases.append(Case("zlib-bomb-within-limit", _save(Image.new("RGB", (1900, 1900)), "PNG", optimize=True)))
    cases.append(Case("zlib-bomb-over-limit", _save(Image.new("L", (2100, 2100)), "PNG"), TOO_LARGE))

    # Unusual but legitimate modes and containers.
    cmyk = photo.convert("CMYK")
    grey16 = Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257).astype(np.uint16))
    rgb16 = _png_rgb16(np.asarray(photo, np.uint16) * 257)
    cases += [
        Case("cmyk-jpeg", _save(cmyk, "JPEG", quality=90)),
        Case("cmyk-tiff", _save(cmyk, "TIFF")),
        Case("png-16bit-grey", _save(grey16, "PNG")),
        Case("png-16bit-rgb", rgb16),
        Case("tiff-16bit-grey", _save(grey16, "TIFF")),
        Case("tiff-float", _save(Image.fromarray(np.asarray(photo.convert("L"), np.float32)), "TIFF")),
        Case("png-palette", _save(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")),
        Case("png-LA", _save(photo.convert("LA"), "PNG")),
        Case("png-RGBA", _save(photo.convert("RGBA"), "PNG")),
        Case("png-1bit", _save(photo.convert("1"), "PNG")),
        Case("bmp", _save(photo, "BMP")),
        Case("ppm", _save(photo, "PPM")),
        Case("webp-lossless-alpha", _save(photo.convert("RGBA"), "WEBP", lossless=True)),
        Case("gif-animated", _animated(rng, "GIF")),
        Case("apng", _animated(rng, "PNG")),
        Case("webp-animated", _animated(rng, "WEBP")),
        Case("tiff-multipage", _animated(rng, "TIFF")),
    ]

    # EXIF orientations (all eight), broken EXIF, odd ICC profiles.
    for orientation in range(1, 9):
        cases.append(Case(f"exif-orientation-{orientation}", _with_exif_orientation(photo, orientation)))
    cases += [
        Case("exif-orientation-99", _with_exif_orientation(photo, 99)),
        Case("exif-garbage", _jpeg_with_segment(jpeg, 0xE1, b"Exif\x00\x00" + rng.bytes(500))),
        Case("exif-bad-ifd-offset", _jpeg_with_segment(jpeg, 0xE1, b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")),
        Case("exif-truncated", _jpeg_with_segment(jpeg, 0xE1, b"Exif\x00\x00MM\x00*")),
        Case("icc-garbage-jpeg", _save(photo, "JPEG", icc_profile=rng.bytes(3000))),
        Case("icc-huge-jpeg", _save(photo, "JPEG", icc_profile=rng.bytes(300_000))),
        Case("icc-garbage-png", _save(photo, "PNG", icc_profile=rng.bytes(3000))),
        Case("icc-empty-png", _png_with_iccp(encoded["png"], b"")),
    ]
    return cases


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """16-bit RGB PNG by hand (Pillow cannot write RGB;16)."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _png_with_iccp(png: bytes, profile: bytes) -> bytes:
    """Inserts an iCCP chunk (compressed `profile`) right after IHDR."""
    at = 8 + 25
    return png[:at] + _png_chunk(b"iCCP", b"odd\x00\x00" + zlib.compress(profile)) + png[at:]


def content_type_cases(seed: int = 0) -> list[Case]:
    """A valid JPEG under wrong, missing or odd Content-Types (REST only)."""
    jpeg = _save(_photo(np.random.default_rng(seed)), "JPEG")
    refused = ((415, "unsupported_media_type"),)
    return [
        Case("ctype-missing", jpeg, refused, content_type=None),
        Case("ctype-text-plain", jpeg, refused, content_type="text/plain"),
        Case("ctype-json", jpeg, refused, content_type="application/json"),
        Case("ctype-empty", jpeg, refused, content_type=""),
        Case("ctype-garbage", jpeg, refused, content_type=";;;=//"),
        Case("ctype-form-urlencoded", jpeg, refused, content_type="application/x-www-form-urlencoded"),
        # The declared image type is a hint only: the bytes are sniffed.
        Case("ctype-png-but-jpeg", jpeg, content_type="image/png"),
        Case("ctype-with-params", jpeg, content_type="image/jpeg; charset=binary; q=1"),
        Case("ctype-upper", jpeg, content_type="IMAGE/JPEG"),
        Case("ctype-multipart-no-boundary", jpeg, ((400, "bad_multipart"),), "multipart/form-data"),
    ]


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    """A multipart/form-data body from (field name, file name or None, content) parts."""
    out = b""
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def multipart_cases(seed: int = 0) -> list[Case]:
    """Malformed and abusive multipart bodies for `POST /v1/score` (REST only)."""
    jpeg = _save(_photo(np.random.default_rng(seed)), "JPEG")
    bad = ((400, "bad_multipart"),)
    good, ctype = multipart([("image", "a.jpg", jpeg)])
    cases = [Case("multipart-good", good, OK, ctype)]

    def add(name: str, body: bytes, expect: tuple[tuple[int, str], ...], ct: str = ctype) -> None:
        cases.append(Case(name, body, expect, ct))

    add("multipart-no-closing-boundary", good[: good.rfind(b"--XyZ--")], bad)
    add("multipart-wrong-boundary", good, bad, "multipart/form-data; boundary=other")
    add("multipart-garbage", np.random.default_rng(seed).bytes(2000), bad)
    add("multipart-no-disposition", b"--XyZ\r\nX: y\r\n\r\n" + jpeg + b"\r\n--XyZ--\r\n", bad)
    add("multipart-empty", b"--XyZ--\r\n", ((400, "missing_image"),))
    add("multipart-image-as-text", multipart([("image", None, b"abc")])[0], ((400, "missing_image"),))
    add("multipart-empty-file", multipart([("image", "a.jpg", b"")])[0], ((400, "empty_body"),))
    add("multipart-not-an-image", multipart([("image", "a.jpg", b"nope" * 50)])[0], BAD_IMAGE)
    add("multipart-two-files", multipart([("image", "a.jpg", jpeg), ("b", "b.jpg", jpeg)])[0], bad)
    add(
        "multipart-too-many-fields",
        multipart([("image", "a.jpg", jpeg)] + [(f"f{i}", None, b"x") for i in range(50)])[0],
        bad,
    )
    add("multipart-huge-field", multipart([("image", "a.jpg", jpeg), ("note", None, b"x" * 200_000)])[0], bad)
    add("multipart-huge-header", b"--XyZ\r\nX-Pad: " + b"a" * 20_000 + b"\r\n" + good[7:], bad)
    return cases


def all_cases(seed: int = 0) -> Iterator[Case]:
    yield from image_cases(seed)
    yield from content_type_cases(seed)
    yield from multipart_cases(seed)


if __name__ == "__main__":
    counts: dict[str, int] = {}
    for case in all_cases():
        outcome = "/".join(sorted({f"{s} {c}" for s, c in case.expect}))
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{case.name:45s} {len(case.body):>9,d} B  {outcome}")
    print(sum(counts.values()), "cases:", counts)
