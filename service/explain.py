"""Explanations: where the model looked, as the paper's attention visualisation shows it.

The rollout graph (`musiq export --rollout`, a file `NAME.rollout.onnx` beside `NAME.onnx`)
outputs the CLS attention rollout: one weight per packed token. Here those weights are put back
on each scale's patch grid and drawn over the image, one PNG per scale. The explanation graph
runs one image at a time outside the batcher: it keeps one N x N matrix per layer, is asked for
interactively and rarely, and its concurrency and waiting line are bounded by the core.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.packing import PackedImage, ScaleLayout, collate
from service.runtime import ModelRuntime, RuntimeOptions

# An "inferno"-like colour ramp (dark: little attention, bright: most), interpolated to 256 steps.
_ANCHORS = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32
)
COLORMAP = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)],
    axis=1,
).astype(np.float32)
HEAT_ALPHA = 0.6  # share of the colour over the image where the model saw a patch
UNSEEN_DIM = 0.35  # brightness kept where a patch was not packed (native tokens beyond the cap)


def rollout_path(model_path: str | Path) -> Path:
    """Where the explanation graph of a model file lives (the name `musiq export --rollout` gives)."""
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".onnx") + ".rollout.onnx")


class RolloutRuntime(ModelRuntime):
    """The explanation graph in ONNX Runtime: a model runtime with a `rollout` output."""

    def __init__(self, path: str | Path, options: RuntimeOptions | None = None) -> None:
        super().__init__(path, options or RuntimeOptions())
        if "rollout" not in self.outputs:
            raise ValueError(
                f"{self.path}: an explanation graph needs a 'rollout' output, has {self.outputs}"
            )

    def rollout(self, packed: PackedImage) -> np.ndarray:
        """float32 [tokens]: the CLS rollout weight of every packed token (0 for padding rows)."""
        batch = collate([packed])
        feeds = {
            "patches": batch.patches.astype(np.float16) if self.float16 else batch.patches,
            "spatial": batch.spatial,
            "scale": batch.scale,
            "mask": batch.mask,
        }
        (rollout,) = self.session.run(["rollout"], feeds)
        return np.asarray(rollout[0], np.float32)


@dataclass(frozen=True)
class ScaleExplanation:
    scale_id: int
    longer_side: int | None  # None for the native scale
    height: int  # the image size the model saw at this scale
    width: int
    weights: np.ndarray  # float32 [grid_h, grid_w]; NaN where no token was packed (native cap)
    share: float  # this scale's part of the whole rollout (the shares of all scales sum to 1)
    heatmap_png: bytes  # the weights drawn over the image

    @property
    def grid_h(self) -> int:
        return int(self.weights.shape[0])

    @property
    def grid_w(self) -> int:
        return int(self.weights.shape[1])


def scale_grid(rollout: np.ndarray, layout: ScaleLayout) -> np.ndarray:
    """One scale's weights on its patch grid (row-major, as packed); unpacked cells are NaN."""
    grid = np.full(layout.grid_h * layout.grid_w, np.nan, np.float32)
    grid[: layout.valid] = rollout[layout.offset : layout.offset + layout.valid]
    return grid.reshape(layout.grid_h, layout.grid_w)


def display_size(height: int, width: int, longest: int) -> tuple[int, int]:
    ratio = min(1.0, longest / max(height, width))
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def overlay(pixels: np.ndarray, grid: np.ndarray, layout: ScaleLayout, patch: int, longest: int) -> bytes:
    """PNG of `grid` over the image, each patch's cell where the packing cut it.

    Colours are scaled to this scale's largest weight, so each heatmap uses the whole ramp; the
    raw weights (comparable across scales) are in `ScaleExplanation.weights`.
    """
    dh, dw = display_size(layout.height, layout.width, longest)
    image = np.asarray(Image.fromarray(pixels).resize((dw, dh), Image.Resampling.BILINEAR), np.float32)
    # Display pixel -> pixel at this scale -> patch cell, with the packing's SAME padding offsets.
    top = (layout.grid_h * patch - layout.height) // 2
    left = (layout.grid_w * patch - layout.width) // 2
    rows = ((np.arange(dh) + 0.5) * layout.height / dh + top) // patch
    cols = ((np.arange(dw) + 0.5) * layout.width / dw + left) // patch
    cells = grid[np.clip(rows.astype(int), 0, layout.grid_h - 1)][
        :, np.clip(cols.astype(int), 0, layout.grid_w - 1)
    ]
    peak = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
    seen = np.isfinite(cells)
    level = np.where(seen, cells, 0.0) / peak if peak > 0 else np.zeros_like(cells)
    colour = COLORMAP[np.clip((level * 255).round().astype(int), 0, 255)]
    out = np.where(seen[..., None], image * (1 - HEAT_ALPHA) + colour * HEAT_ALPHA, image * UNSEEN_DIM).clip(
        0, 255
    )
    buf = io.BytesIO()
    Image.fromarray(out.round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def explain_scales(
    pixels: np.ndarray, packed: PackedImage, rollout: np.ndarray, display_longest: int = 512
) -> list[ScaleExplanation]:
    """Splits a rollout by scale and draws each scale's heatmap (longest side <= display_longest)."""
    total = float(rollout[packed.mask].sum()) or 1.0
    sides = packed.config.longer_sides
    explanations = []
    for layout in packed.layout:
        grid = scale_grid(rollout, layout)
        explanations.append(
            ScaleExplanation(
                scale_id=layout.scale_id,
                longer_side=sides[layout.scale_id] if layout.scale_id < len(sides) else None,
                height=layout.height,
                width=layout.width,
                weights=grid,
                share=float(np.nansum(grid)) / total,
                heatmap_png=overlay(pixels, grid, layout, packed.config.patch_size, display_longest),
            )
        )
    return explanations
