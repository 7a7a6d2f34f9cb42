"""Batched scoring of many images with a PyTorch `Musiq` (evaluation, dataset scoring).

`musiq score` packs and runs one image at a time, which is what a CLI printing a line per file
wants. Scoring a data set (thousands of images for an SRCC) wants batches, and batches of packed
images are padded to their longest member, so `score_images` orders the images by token count
first: neighbours in that order have nearly the same length and a batch wastes little compute on
padding. Padding never changes a valid image's output (see `model.network.Musiq`), so the batched
scores equal the one-at-a-time scores up to float rounding.

Memory stays bounded whatever the data set size: the token counts come from the image headers
(`model.decode.image_size`, no pixels decoded), and images are decoded and packed batch by batch
in that order, so only the batches in flight are held in memory. A 1024x768 image is ~11 MB of
float32 tokens; holding a whole KonIQ-10k in packed form would need ~110 GB.

This module imports torch only inside `score_images`: the decode worker processes import it to
find `_pack_chunk`, and they need nothing but numpy, Pillow and the packing code.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import numpy as np

from model.config import PackingConfig
from model.decode import ImageDecodeError, decode_image, image_size
from model.packing import PackedImage, collate, pack

if TYPE_CHECKING:
    from model.network import Musiq

ImageInput: TypeAlias = str | Path | np.ndarray
"""A path to an encoded image file, or an already decoded uint8 RGB array [H, W, 3]."""

# Batches submitted to the decode pool ahead of the one being scored, per worker. Enough to keep
# the workers busy while the model runs; small enough that memory stays bounded.
PREFETCH_PER_WORKER = 2


def planned_tokens(height: int, width: int, packing: PackingConfig) -> int:
    """The sequence length `pack` gives an image of this size, without packing it.

    Resized scales reserve a fixed ceil(L / P)^2 rows each; the native scale has one row per
    patch (capped at `max_native_tokens`; exactly that many with `pad_native`). The count is symmetric in height and width, so the
    header size may be taken before or after EXIF orientation.
    """
    p = packing.patch_size
    resized = sum(packing.resized_scale_tokens(side) for side in packing.longer_sides)
    native = -(-height // p) * -(-width // p)
    if packing.max_native_tokens >= 0:
        native = packing.max_native_tokens if packing.pad_native else min(native, packing.max_native_tokens)
    return resized + native


def _raise_named(exc: ImageDecodeError, source: str | Path) -> NoReturn:
    """Re-raises with the file name in front (once), so a failure in a long run is findable."""
    name = os.fspath(source)
    if name in str(exc):
        raise exc
    raise ImageDecodeError(f"{name}: {exc}", reason=exc.reason) from exc


def _token_count(image: ImageInput, packing: PackingConfig) -> int:
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected an RGB image array [H, W, 3], got shape {image.shape}")
        return planned_tokens(int(image.shape[0]), int(image.shape[1]), packing)
    try:
        width, height = image_size(image)
    except ImageDecodeError as exc:
        _raise_named(exc, image)
    return planned_tokens(height, width, packing)


def _pack_one(image: ImageInput, packing: PackingConfig, flip: bool = False) -> PackedImage:
    if isinstance(image, np.ndarray):
        pixels = image
    else:
        try:
            pixels = decode_image(image)
        except ImageDecodeError as exc:
            _raise_named(exc, image)
    return pack(pixels[:, ::-1] if flip else pixels, packing)


def _pack_chunk(images: list[ImageInput], packing: PackingConfig, flip: bool = False) -> list[PackedImage]:
    """Decodes and packs one batch; top level so a process pool can pickle it by reference."""
    return [_pack_one(image, packing, flip) for image in images]


def _packed_batches(
    images: Sequence[ImageInput],
    batches: list[list[int]],
    packing: PackingConfig,
    workers: int,
    flip: bool = False,
) -> Generator[tuple[list[int], list[PackedImage]], None, None]:
    """Yields (input indices, packed images) per batch, in `batches` order.

    With workers, at most PREFETCH_PER_WORKER * workers batches are decoded ahead. The pool uses
    the "spawn" start method: the parent has torch loaded with its thread pools, and a forked
    child inherits locks that those (and tqdm's monitor) threads may hold. Spawned children import
    only this module's numpy-side dependencies, a fraction of a second once per run.
    """
    if workers <= 0:
        for idx in batches:
            yield idx, _pack_chunk([images[i] for i in idx], packing, flip)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[tuple[list[int], Future[list[PackedImage]]]] = deque()
    todo = iter(batches)

    def submit() -> None:
        idx = next(todo, None)
        if idx is not None:
            pending.append((idx, pool.submit(_pack_chunk, [images[i] for i in idx], packing, flip)))

    try:
        for _ in range(PREFETCH_PER_WORKER * workers):
            submit()
        while pending:
            idx, future = pending.popleft()
            items = future.result()  # re-raises a worker's ImageDecodeError (it pickles with its reason)
            submit()
            yield idx, items
    finally:
        # On an error (or an abandoned generator) drop the batches nobody will read.
        pool.shutdown(wait=True, cancel_futures=True)


def score_images(
    model: Musiq,
    images: Sequence[ImageInput],
    *,
    packing: PackingConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
    workers: int = 0,
    flip: bool = False,
) -> np.ndarray:
    """Quality scores (float64 [n], in input order) of image files or decoded uint8 RGB arrays.

    `packing` defaults to the model's own (`model.config.packing()`); pass another to, e.g., cap
    the native tokens. Images are batched in order of token count (from the headers), so a batch
    pads little; `workers` > 0 decodes and packs in that many processes while the model runs.
    The model runs in eval mode under `torch.inference_mode()` on the device of its parameters
    (its training flag is restored afterwards). A file that cannot be decoded raises
    `ImageDecodeError` whose message starts with the file name; `progress` shows a tqdm bar on
    stderr. `flip` scores each image mirrored left to right (`musiq eval --flip` averages both:
    the model's spatial embeddings are not mirror-symmetric, so the two scores differ).
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if model.config.head == "classes":
        raise ValueError("a 'classes' head has no quality score")
    packing = packing or model.config.packing()
    n = len(images)
    scores = np.full(n, np.nan, np.float64)
    if n == 0:
        return scores

    from tqdm import tqdm

    counts = [_token_count(image, packing) for image in images]
    order = sorted(range(n), key=counts.__getitem__)  # stable: ties keep input order
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with (
            tqdm(total=n, unit="img", disable=not progress, file=sys.stderr, desc="scoring") as bar,
            closing(_packed_batches(images, batches, packing, workers, flip)) as stream,
        ):
            for idx, items in stream:
                batch = collate(items)
                inputs = (
                    torch.from_numpy(batch.patches).to(param.device, param.dtype),
                    torch.from_numpy(batch.spatial).to(param.device),
                    torch.from_numpy(batch.scale).to(param.device),
                    torch.from_numpy(batch.mask).to(param.device),
                )
                with torch.inference_mode():
                    out = model.score(model(*inputs))
                scores[idx] = out.double().cpu().numpy()
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return scores


def flip_averaged(model: Musiq, images: Sequence[ImageInput], **options: Any) -> np.ndarray:
    """Test-time flip averaging (issue 17's lever, measured on the model card): the mean of each
    image's score and its mirror's, at two forwards an image. `options` as for `score_images`."""
    return (score_images(model, images, **options) + score_images(model, images, flip=True, **options)) / 2
