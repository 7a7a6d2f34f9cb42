"""Checks an exported file against the PyTorch model it came from, before it is written.

Two kinds of evidence:
- shapes: random and real inputs over batch 1..8 and tokens 1..4096, with no padding and with
  heavy padding, scored by ONNX Runtime and by PyTorch; the largest score difference decides,
  against a bound that grows with the largest score (`export.exporter.fp32_bound`);
- photos: a reduced-precision file against the fp32 file on real photographs with graded
  distortions: score deviation and rank agreement (Spearman's rho).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from model.config import PackingConfig
from model.network import Musiq
from model.packing import PackedBatch, collate, pack

# (batch, tokens, padding): the token axis from 1 to 4096, batches 1..8, full and ragged masks.
SHAPES: tuple[tuple[int, int, str], ...] = (
    (1, 1, "none"),
    (8, 1, "none"),
    (1, 4096, "none"),
    (8, 64, "heavy"),
    (3, 513, "none"),
    (5, 385, "heavy"),
    (2, 1500, "heavy"),
)


@dataclass(frozen=True)
class ShapeCheck:
    batch: int
    tokens: int
    padding: str
    max_abs_diff: float
    seconds: float
    max_abs_value: float = 0.0  # the largest |output| PyTorch gave on this shape: the scale of the diff


def random_batch(
    batch: int, tokens: int, padding: str, patch_size: int, grid: int, scales: int, seed: int
) -> PackedBatch:
    """Uniform patches in [-1, 1]; with heavy padding each item keeps a random prefix (>= 1 token)."""
    rng = np.random.default_rng(seed)
    patches = rng.uniform(-1, 1, (batch, tokens, patch_size * patch_size * 3)).astype(np.float32)
    mask = np.ones((batch, tokens), bool)
    if padding == "heavy":
        for i, n in enumerate(rng.integers(1, tokens + 1, batch)):
            mask[i, n:] = False
    patches[~mask] = 0.0
    spatial = np.where(mask, rng.integers(0, grid * grid, (batch, tokens)), 0).astype(np.int32)
    scale = np.where(mask, rng.integers(0, scales, (batch, tokens)), 0).astype(np.int32)
    return PackedBatch(patches, spatial, scale, mask)


def feeds(batch: PackedBatch, float16: bool = False) -> dict[str, np.ndarray]:
    return {
        "patches": batch.patches.astype(np.float16) if float16 else batch.patches,
        "spatial": batch.spatial,
        "scale": batch.scale,
        "mask": batch.mask,
    }


def is_float16(session: ort.InferenceSession) -> bool:
    return session.get_inputs()[0].type == "tensor(float16)"


def ort_outputs(session: ort.InferenceSession, batch: PackedBatch) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, feeds(batch, is_float16(session)))
    return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values, strict=True)}


@torch.inference_mode()
def torch_outputs(model: Musiq, batch: PackedBatch, rollout: bool = False) -> dict[str, np.ndarray]:
    inputs = [torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]
    if rollout:
        raw, roll = model.attention_rollout(*inputs)
    else:
        raw, roll = model(*inputs), None
    out: dict[str, np.ndarray] = {}
    if model.config.head == "classes":
        out["logits"] = raw.numpy()
    else:
        out["score"] = model.score(raw).numpy()
    if model.config.head == "distribution":
        out["distribution"] = raw.softmax(-1).numpy()
    if roll is not None:
        out["rollout"] = roll.numpy()
    return out


def check_shapes(
    session: ort.InferenceSession,
    model: Musiq,
    shapes: Iterable[tuple[int, int, str]] = SHAPES,
    real: Sequence[np.ndarray] = (),
) -> list[ShapeCheck]:
    """ORT against PyTorch on every shape (and on the real images, packed and padded together)."""
    import time

    cfg = model.config
    rollout = any(o.name == "rollout" for o in session.get_outputs())
    batches = [
        (b, n, pad, random_batch(b, n, pad, cfg.patch_size, cfg.grid_size, cfg.num_scales, seed=i))
        for i, (b, n, pad) in enumerate(shapes)
    ]
    if real:
        batch = collate([pack(img, cfg.packing()) for img in real])
        batches.append((len(real), batch.mask.shape[1], "photos", batch))
    results = []
    for b, n, pad, batch in batches:
        start = time.perf_counter()
        got = ort_outputs(session, batch)
        seconds = time.perf_counter() - start
        want = torch_outputs(model, batch, rollout)
        diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        value = max(float(np.abs(want[k]).max()) for k in want)
        results.append(ShapeCheck(b, n, pad, diff, seconds, value))
    return results


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties (no scipy at export time)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):  # average the ranks of tied values
            tied = x == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def photo_scores(
    session: ort.InferenceSession, images: Sequence[np.ndarray], packing: PackingConfig
) -> np.ndarray:
    key = "score" if any(o.name == "score" for o in session.get_outputs()) else "logits"
    return np.array([ort_outputs(session, collate([pack(img, packing)]))[key][0] for img in images]).reshape(
        len(images), -1
    )[:, 0]


@dataclass(frozen=True)
class PrecisionCheck:
    images: int
    max_abs_dev: float
    mean_abs_dev: float
    srcc: float
    fp32_score_spread: float  # std of the fp32 scores: the scale the deviations compare with

    def as_dict(self) -> dict[str, float]:
        return {
            "images": self.images,
            "max_abs_dev": round(self.max_abs_dev, 6),
            "mean_abs_dev": round(self.mean_abs_dev, 6),
            "srcc_vs_fp32": round(self.srcc, 6),
            "fp32_score_std": round(self.fp32_score_spread, 6),
        }


def compare_precision(reference: np.ndarray, candidate: np.ndarray) -> PrecisionCheck:
    dev = np.abs(reference - candidate)
    return PrecisionCheck(
        len(reference),
        float(dev.max()),
        float(dev.mean()),
        spearman(reference, candidate),
        float(reference.std()),
    )
