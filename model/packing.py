"""Multi-scale packing: an RGB image becomes MUSIQ's token sequence (MUSIQ_SPEC section 1).

This is the project's only implementation of the packing; training, the export checks and the
server all call it, so a model sees the same tokens wherever it runs. Pure numpy (no torch, no
TensorFlow), reproducing the official TensorFlow preprocessing:

    [resized longer side 224 | resized longer side 384 | native resolution]

Each scale is zero-padded "SAME" to a multiple of the patch size and cut into P x P patches in
row-major order, each flattened in (row, col, channel) order. Every patch carries a hashed spatial
index into a shared G x G grid, its scale id and a validity mask. Resized scales are padded to a
fixed ceil(L / P)^2 rows; the native scale keeps all its patches unless capped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model.config import PackingConfig
from model.resize import resize_gaussian


@dataclass(frozen=True)
class ScaleLayout:
    """Where one scale's patches sit in the packed sequence, and what they cover."""

    scale_id: int
    height: int  # the image size at this scale, before padding
    width: int
    grid_h: int  # patches per column / row: ceil(height / P), ceil(width / P)
    grid_w: int
    offset: int  # first row of this scale in the sequence
    length: int  # rows reserved for this scale (valid + padding)
    valid: int  # rows holding real patches (the first `valid` of `length`)


@dataclass(frozen=True)
class PackedImage:
    """One image as tokens. Padding rows are all zero with mask False."""

    patches: np.ndarray  # float32 [N, P*P*3], values in [-1, 1]
    spatial: np.ndarray  # int32 [N], hashed index in [0, G*G)
    scale: np.ndarray  # int32 [N], scale id in [0, num_scales)
    mask: np.ndarray  # bool [N]
    layout: tuple[ScaleLayout, ...]
    config: PackingConfig

    @property
    def num_tokens(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_valid(self) -> int:
        return int(np.count_nonzero(self.mask))

    def official_rows(self) -> np.ndarray:
        """The official model's input: float32 [N, P*P*3 + 3] = (patch, spatial, scale, mask)."""
        return np.concatenate(
            [
                self.patches,
                self.spatial[:, None].astype(np.float32),
                self.scale[:, None].astype(np.float32),
                self.mask[:, None].astype(np.float32),
            ],
            axis=1,
        )


@dataclass(frozen=True)
class PackedBatch:
    """Several packed images padded to one length: the network's input."""

    patches: np.ndarray  # float32 [B, N, P*P*3]
    spatial: np.ndarray  # int32 [B, N]
    scale: np.ndarray  # int32 [B, N]
    mask: np.ndarray  # bool [B, N]

    @property
    def padding_efficiency(self) -> float:
        """Valid tokens over all tokens: the share of compute spent on real patches."""
        return float(self.mask.mean()) if self.mask.size else 1.0


def normalise(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 in [-1, 1], bit-identical to the official preprocessing."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    # The official `normalize_value_range`: (v - 0) / (255 - 0), then -1 + v * 2, all in float32.
    # The same operations in place, in the same order, give the same bits.
    x = image.astype(np.float32)
    x /= np.float32(255.0)
    x *= np.float32(2.0)
    x -= np.float32(1.0)
    return x


def resized_shape(height: int, width: int, longer_side: int) -> tuple[int, int]:
    """Aspect-preserving size whose longer side is `longer_side` (float32 ratio, half-to-even).

    A side that would round to zero (aspect ratios beyond longer_side : 0.5) is kept at one pixel;
    the official code would fail on such an image.
    """
    ratio = np.float32(longer_side) / np.float32(max(height, width))
    h = int(np.round(np.float32(height) * ratio))
    w = int(np.round(np.float32(width) * ratio))
    return max(h, 1), max(w, 1)


def hash_indices(count: int, grid_size: int) -> np.ndarray:
    """Grid cell of each of `count` patches along one axis.

    The official code gets these from a nearest-neighbour `tf.image.resize` of range(G) to `count`
    (no half-pixel centres): min(floor(i * (G / count)), G - 1), in float32.
    """
    scale = np.float32(grid_size) / np.float32(count)
    idx = np.floor(np.arange(count, dtype=np.float32) * scale).astype(np.int32)
    cells: np.ndarray = np.minimum(idx, grid_size - 1)
    return cells


def spatial_indices(grid_h: int, grid_w: int, grid_size: int) -> np.ndarray:
    """Hashed spatial index of every patch of a grid_h x grid_w grid, row-major, int32."""
    rows = hash_indices(grid_h, grid_size)
    cols = hash_indices(grid_w, grid_size)
    spatial: np.ndarray = (rows[:, None] * grid_size + cols[None, :]).reshape(-1).astype(np.int32)
    return spatial


def _same_padding(size: int, patch: int) -> tuple[int, int, int]:
    """(patch count, pad before, pad after) of TensorFlow's SAME padding for stride = size = P."""
    count = -(-size // patch)
    total = count * patch - size
    return count, total // 2, total - total // 2


def _write_patches(image: np.ndarray, patch: int, out: np.ndarray) -> tuple[int, int]:
    """Cuts a float32 [h, w, 3] image into SAME-padded patches, writing at most len(out) of them.

    Returns the grid shape. `out` must be zero-initialised: the padding is 0 (mid grey in [-1, 1]).
    Only the patches written are cut: the first n in row-major order lie in the first ceil(n / gw)
    patch rows, and in the first n columns when that is one row. Cutting the whole grid first made
    a 1 x 4,000,000 image pad a 32-row canvas and copy it (3 GB) to keep 512 native patches.
    """
    h, w, c = image.shape
    gh, top, _ = _same_padding(h, patch)
    gw, left, _ = _same_padding(w, patch)
    n = min(len(out), gh * gw)
    rows = -(-n // gw)
    cols = gw if rows > 1 else n
    height, width = rows * patch, cols * patch  # the part of the padded canvas that is cut
    if top == 0 and left == 0 and height <= h and width <= w:
        canvas = image[:height, :width]  # no padding inside it: a view
    else:
        canvas = np.zeros((height, width, c), np.float32)
        kept_h, kept_w = min(h, height - top), min(w, width - left)
        canvas[top : top + kept_h, left : left + kept_w] = image[:kept_h, :kept_w]
    tiles = canvas.reshape(rows, patch, cols, patch, c).transpose(0, 2, 1, 3, 4)
    if n == rows * cols:  # the common case: one strided copy straight into the output
        out[:n].reshape(rows, cols, patch, patch, c)[...] = tiles
    else:  # part of the last patch row
        out[:n] = tiles.reshape(rows * cols, patch * patch * c)[:n]
    return gh, gw


def pack(image: np.ndarray, config: PackingConfig | None = None) -> PackedImage:
    """Packs a uint8 RGB image [H, W, 3] into MUSIQ tokens.

    The sequence is one block per resized scale (ascending longer side; ceil(L / P)^2 rows each,
    padded) followed by the native-resolution block (all patches, or exactly
    `max_native_tokens` rows when that is >= 0, keeping the first patches in row-major order).
    """
    config = config or PackingConfig()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    height, width = int(image.shape[0]), int(image.shape[1])
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels: {width}x{height}")
    p = config.patch_size
    x = normalise(image)

    # Plan the sequence first so the output is allocated once and each scale written in place.
    plans: list[tuple[int, int, int, int]] = []  # (scale_id, h, w, reserved rows)
    for scale_id, side in enumerate(config.longer_sides):
        h, w = resized_shape(height, width, side)
        plans.append((scale_id, h, w, config.resized_scale_tokens(side)))
    native_count = -(-height // p) * -(-width // p)
    if config.max_native_tokens < 0:
        native_rows = native_count
    elif config.pad_native:
        native_rows = config.max_native_tokens
    else:
        native_rows = min(native_count, config.max_native_tokens)
    plans.append((config.native_scale_id, height, width, native_rows))

    total = sum(rows for *_, rows in plans)
    patches = np.zeros((total, config.token_dim), np.float32)
    spatial = np.zeros(total, np.int32)
    scale = np.zeros(total, np.int32)
    mask = np.zeros(total, bool)
    layout: list[ScaleLayout] = []
    offset = 0
    for scale_id, h, w, rows in plans:
        if rows:
            scaled = x if scale_id == config.native_scale_id else resize_gaussian(x, h, w)
            gh, gw = _write_patches(scaled, p, patches[offset : offset + rows])
        else:
            gh, gw = -(-h // p), -(-w // p)
        valid = min(rows, gh * gw)
        spatial[offset : offset + valid] = spatial_indices(gh, gw, config.grid_size)[:valid]
        scale[offset : offset + valid] = scale_id
        mask[offset : offset + valid] = True
        layout.append(ScaleLayout(scale_id, h, w, gh, gw, offset, rows, valid))
        offset += rows
    return PackedImage(patches, spatial, scale, mask, tuple(layout), config)


def compact(packed: PackedImage) -> PackedImage:
    """The same image without its padding rows: for inference, never for the official layout.

    Resized scales reserve ceil(L / P)^2 rows whatever the aspect ratio (a 4:3 image fills 150
    of 193; a 300x4000 strip 19), and the network computes every row, masked or not. Padding rows
    are masked as keys and only the CLS output is read, and each row carries its own spatial and
    scale ids, so dropping them leaves the score unchanged (up to float rounding) and saves
    their whole cost. The layout's offsets and lengths are recomputed for the compact sequence.
    """
    if packed.num_valid == packed.num_tokens:
        return packed
    keep = packed.mask
    layout, offset = [], 0
    for s in packed.layout:
        layout.append(
            ScaleLayout(s.scale_id, s.height, s.width, s.grid_h, s.grid_w, offset, s.valid, s.valid)
        )
        offset += s.valid
    return PackedImage(
        packed.patches[keep],
        packed.spatial[keep],
        packed.scale[keep],
        packed.mask[keep],
        tuple(layout),
        packed.config,
    )


def collate(items: Sequence[PackedImage], pad_to: int | None = None) -> PackedBatch:
    """Stacks packed images into one padded batch (padding rows: zeros, mask False).

    `pad_to` fixes the sequence length (e.g. a bucket size); it must fit the longest item.
    """
    if not items:
        raise ValueError("cannot collate an empty list")
    dims = {it.patches.shape[1] for it in items}
    if len(dims) != 1:
        raise ValueError(f"items were packed with different patch sizes: widths {sorted(dims)}")
    longest = max(it.num_tokens for it in items)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest item ({longest} tokens)")
    if len(items) == 1 and length == longest:  # a batch of one needs no copy: views of the item
        it = items[0]
        return PackedBatch(it.patches[None], it.spatial[None], it.scale[None], it.mask[None])
    b = len(items)
    arrays = {
        "patches": np.empty((b, length, dims.pop()), np.float32),
        "spatial": np.empty((b, length), np.int32),
        "scale": np.empty((b, length), np.int32),
        "mask": np.empty((b, length), bool),
    }
    write_rows(arrays, items, range(b))
    return PackedBatch(**arrays)


def write_rows(arrays: Mapping[str, np.ndarray], items: Sequence[PackedImage], rows: Iterable[int]) -> None:
    """Writes `items[i]` into row i of each named batch array ([B, N] or [B, N, D]: "patches",
    "spatial", "scale", "mask") for each i in `rows`, zeroing the padding after it.

    What `collate` does into arrays it allocates; apart, so that a caller that owns the arrays
    (the server's reused, page-locked GPU input buffers, possibly fp16) fills them the same way,
    and can fill disjoint rows from several threads. Values are cast to the arrays' dtypes.
    """
    for i in rows:
        item = items[i]
        n = item.num_tokens
        for name, out in arrays.items():
            out[i, :n] = getattr(item, name)
            out[i, n:] = 0


def split_official_rows(rows: np.ndarray) -> PackedBatch:
    """Reads official rows ([N, D + 3] or [B, N, D + 3]) back into separate arrays."""
    if rows.ndim == 2:
        rows = rows[None]
    if rows.ndim != 3 or rows.shape[-1] < 4:
        raise ValueError(f"expected official rows [B, N, D + 3], got shape {rows.shape}")
    return PackedBatch(
        patches=np.ascontiguousarray(rows[..., :-3], dtype=np.float32),
        spatial=rows[..., -3].astype(np.int32),
        scale=rows[..., -2].astype(np.int32),
        mask=rows[..., -1] > 0.5,
    )
