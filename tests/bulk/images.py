"""The small input set of the bulk tests: real and synthetic photos of several token lengths, and
each kind of bad input the server answers with an error code."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from tests.helpers import jpeg

# file name -> the error code the server gives for its bytes (None: it scores)
EXPECTED: dict[str, str | None] = {
    "a/noise-small.jpg": None,
    "a/noise-wide.jpg": None,
    "a/b/noise-tall.jpg": None,
    "a/b/noise-large.jpg": None,
    "a/noise-tiny.jpg": None,
    "photo-astronaut.png": None,
    "photo-coffee.jpg": None,
    "photo-chelsea.jpg": None,
    "bad/garbage.jpg": "image_unrecognised",
    "bad/empty.jpg": "empty_body",
    "bad/truncated.jpg": "image_corrupt",
    "bad/huge.png": "image_too_large",
}
MISSING = "bad/missing.jpg"  # listed, not on disk: image_not_found


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its data is never read: refused first)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def write_images(root: Path) -> dict[str, bytes]:
    """Writes the set under `root`; returns each file's bytes by its relative name."""
    import io

    from PIL import Image
    from skimage import data as photos

    def encoded(pixels: object, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)  # type: ignore[arg-type]
        return buf.getvalue()

    full = jpeg(300, 400, seed=7)
    files = {
        "a/noise-small.jpg": jpeg(120, 160, seed=1),
        "a/noise-wide.jpg": jpeg(200, 900, seed=2),
        "a/b/noise-tall.jpg": jpeg(700, 260, seed=3),
        "a/b/noise-large.jpg": jpeg(768, 1024, seed=4),
        "a/noise-tiny.jpg": jpeg(20, 30, seed=5),
        "photo-astronaut.png": encoded(photos.astronaut(), "PNG"),
        "photo-coffee.jpg": encoded(photos.coffee(), "JPEG"),
        "photo-chelsea.jpg": encoded(photos.chelsea(), "JPEG"),
        "bad/garbage.jpg": b"this is not an image at all" * 10,
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": full[: len(full) // 3],
        "bad/huge.png": png_header(60000, 60000),
    }
    assert set(files) == set(EXPECTED)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files
