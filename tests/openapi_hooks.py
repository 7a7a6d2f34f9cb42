"""Schemathesis hooks for tests/test_openapi.py (loaded by `st run` through SCHEMATHESIS_HOOKS).

A schema can say "a binary `image/*` body" but not "a decodable picture", so Schemathesis alone
would send random bytes, which the service rightly refuses (415 image_unrecognised). These
strategies make the bodies that the schema calls valid real JPEG / PNG files of random size and
content; `positive_data_acceptance` then holds the service to accepting them. Raw `image/*` bodies
and multipart parts whose encoding says `image/*` both draw from them.
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


@st.composite
def encoded_images(draw: st.DrawFn, fmt: str) -> bytes:
    height, width = draw(st.integers(8, 96)), draw(st.integers(8, 96))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    options = {"quality": draw(st.integers(5, 95))} if fmt == "JPEG" else {}
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


schemathesis.openapi.media_type("image/jpeg", encoded_images("JPEG"))
schemathesis.openapi.media_type("image/png", encoded_images("PNG"))
schemathesis.openapi.media_type("application/octet-stream", encoded_images("PNG"))
