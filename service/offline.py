"""Scoring outside the server, by the server's own rules: `musiq score` and `musiq bulk`.

Both commands promise the score `/v1/score` gives for the same bytes (issue 18: to within 1e-5 on
every image). PyTorch and ONNX Runtime differ by up to ~6e-5 on the same rows (a float32 ulp or a
few on the 0-100 scale; `python -m bench.score_agreement`), so the promise holds only if every step
is the server's, not a copy of it: the packing a default server uses (its native-token cap), the
decode + pack function (`service.prepare.prepare_image`, padding rows dropped), the runtime
(`ModelRuntime`: same session options, metadata, padding), the batching rule
(`service.batcher.take_batch`) and the error codes (`service.errors`). This module holds the glue
the server does in its registry, core and batcher, written once for both offline commands.

No torch (service/ never imports it) and no Ray or pyarrow: `musiq score` runs on a serving install.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from model.config import PackingConfig
from model.decode import DEFAULT_MAX_PIXELS, ImageDecodeError
from model.packing import PackedImage
from service.batcher import BatcherConfig, take_batch
from service.errors import ERRORS, ScoringError, decode_error_code
from service.prepare import Prepared, prepare_image
from service.runtime import ModelRuntime, Prediction
from service.settings import ServiceSettings

# The server's default cap, so that a default offline run packs as a default server does.
SERVER_MAX_NATIVE_TOKENS: int = ServiceSettings.model_fields["max_native_tokens"].default


def packing_for(model_packing: PackingConfig, max_native_tokens: int | None) -> PackingConfig:
    """The packing a server with default settings uses for this model (`ModelRegistry.packing_for`
    with `MUSIQ_MAX_NATIVE_TOKENS` at its default), or the model's with an explicit cap."""
    cap = model_packing.max_native_tokens
    if max_native_tokens is None:
        limits = [c for c in (SERVER_MAX_NATIVE_TOKENS, cap) if c >= 0]
        limit = min(limits) if limits else -1
    elif max_native_tokens < -1 or (cap >= 0 and not 0 <= max_native_tokens <= cap):
        raise ValueError(f"--max-native-tokens must be between 0 and {cap} for this model")
    else:
        limit = max_native_tokens
    p = model_packing
    return PackingConfig(p.patch_size, p.grid_size, p.longer_sides, limit, pad_native=False)


def error_code(exc: Exception) -> str:
    """The REST API's error code for a failure to read, decode or pack an image."""
    if isinstance(exc, ImageDecodeError):
        code = decode_error_code(exc)
        # Every reason model/decode.py raises has its code in the service's table (tests check it);
        # a reason added there before the table learns it falls back to the nearest code.
        return code if code in ERRORS else "image_unrecognised"
    if isinstance(exc, FileNotFoundError):
        return "image_not_found"
    return "image_unreadable"  # any other OSError: a folder, no permission, a failing store


def read_local(path: str) -> bytes:
    return Path(path).read_bytes()


def prepare_file(
    source: str,
    packing: PackingConfig,
    *,
    read: Callable[[str], bytes] = read_local,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Prepared:
    """Reads `source` (with `read`: a local path by default) and decodes and packs it as the server
    does (`prepare_image`, padding rows dropped). A file that cannot be scored raises
    `ScoringError` with the code the REST API gives for the same bytes (`empty_body` for an empty
    file, as for an empty upload), or one only a file can have (`image_not_found`, `image_unreadable`)."""
    try:
        data = read(source)
        if not data:
            raise ScoringError("empty_body", "the file is empty")
        return prepare_image(data, packing, max_pixels=max_pixels, drop_padding_rows=True)
    except (ImageDecodeError, OSError) as exc:
        # An OSError's text repeats the path, which every caller already shows; its reason alone.
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ScoringError(error_code(exc), message) from exc


def batcher_config(
    runtime: ModelRuntime, batch_size: int | None = None, max_batch_tokens: int | None = None
) -> BatcherConfig:
    """The server's batching limits for the device `runtime` runs on, or the ones given."""
    defaults = runtime.defaults
    return BatcherConfig(
        max_batch_tokens=max_batch_tokens or defaults.max_batch_tokens,
        max_batch_size=batch_size or defaults.max_batch_size,
    )


def plan_batches(tokens: Sequence[int], config: BatcherConfig) -> list[list[int]]:
    """Indices of `tokens` grouped into inference batches as the server forms them: items of one
    length bucket only (`BatcherConfig.bucket`), in order, each batch as `take_batch` fills it.
    Every item must fit the token budget alone (the caller refuses larger ones first)."""
    buckets: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        buckets.setdefault(config.bucket(t), []).append(i)
    batches: list[list[int]] = []
    for members in buckets.values():
        start = 0
        while start < len(members):
            count, _ = take_batch((tokens[i] for i in members[start:]), config)
            if count < 1:
                raise ValueError(f"an item of {tokens[members[start]]} tokens exceeds the batch budget")
            batches.append(members[start : start + count])
            start += count
    return batches


def score_packed(
    runtime: ModelRuntime, items: Sequence[PackedImage], config: BatcherConfig
) -> list[Prediction | str]:
    """A prediction per item, or the error code `too_many_tokens` for one no batch can hold (the
    server's batcher refuses it with that code)."""
    results: list[Prediction | str] = ["too_many_tokens"] * len(items)
    padded = [runtime.padded_length(it.num_tokens) for it in items]
    fits = [i for i, t in enumerate(padded) if t <= config.max_batch_tokens]
    for group in plan_batches([padded[i] for i in fits], config):
        members = [fits[j] for j in group]
        for i, prediction in zip(members, runtime.predict([items[i] for i in members]), strict=True):
            results[i] = prediction
    return results
