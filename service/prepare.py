"""Bytes -> decoded pixels -> packed rows: the CPU stage in front of every model.

One function for every caller that scores encoded bytes (the server's decode pool, `musiq bulk`'s
Ray tasks), so that the same bytes give the same rows, hence the same score, on every path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from model.config import PackingConfig
from model.decode import decode_image
from model.packing import PackedImage, compact, pack


@dataclass(frozen=True)
class Prepared:
    """A decoded, packed image: `packed` is the official layout (explanations map it back onto the
    image), `compute` the rows inference needs (the same, or with padding rows dropped)."""

    pixels: np.ndarray
    packed: PackedImage
    compute: PackedImage
    timings: dict[str, float]

    def score_input(self) -> ScoreInput:
        return ScoreInput(self.compute, self.packed.num_tokens, self.timings)


@dataclass(frozen=True)
class ScoreInput:
    """What scoring needs of a prepared image, and no more: the rows to compute and the official
    token count (padding rows included, which the API reports). The server's decode workers hand
    only this back for a plain score (`service/prepare_pool.py`): the pixels and the padding rows
    would be copied between processes for nothing."""

    compute: PackedImage
    tokens: int
    timings: dict[str, float]


def prepare_image(
    data: bytes, packing: PackingConfig, *, max_pixels: int, drop_padding_rows: bool
) -> Prepared:
    """Decodes (refusing images over `max_pixels` from their header) and packs one image.

    Raises `ImageDecodeError` (or its `ImageTooLargeError`) for input that is not a usable image.
    Dropping padding rows (`compact`) gives the same score for less work.
    """
    t0 = time.perf_counter()
    pixels = decode_image(data, max_pixels=max_pixels)
    t1 = time.perf_counter()
    packed = pack(pixels, packing)
    compute = compact(packed) if drop_padding_rows else packed
    return Prepared(pixels, packed, compute, {"decode_s": t1 - t0, "pack_s": time.perf_counter() - t1})
