"""Training data: labelled images from a CSV, or pristine photos with graded synthetic distortions.

Every item is decoded and packed at its native resolution by the one packing implementation, in
DataLoader worker processes, so both cores stay busy while the other trains. Images are never
resized or cropped (MUSIQ's point); a random horizontal flip is the only augmentation.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from model.config import PackingConfig
from model.decode import decode_image
from model.packing import PackedImage, collate, pack


@dataclass(frozen=True)
class Sample:
    path: Path
    target: np.ndarray  # [1] MOS, or [K] opinion-score distribution
    split: str = ""


def read_labels(csv_path: str | Path, *, root: str | Path | None = None) -> list[Sample]:
    """Rows of `image,mos[,split]` or `image,dist_1..dist_K[,split]`; paths relative to the CSV.

    A distribution is normalised to sum 1. Raises ValueError naming the first bad row.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root else csv_path.parent
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        dist_cols = sorted((c for c in fields if c.startswith("dist_")), key=lambda c: int(c[5:]))
        if "image" not in fields or ("mos" not in fields and not dist_cols):
            raise ValueError(
                f"{csv_path}: needs an 'image' column and 'mos' or 'dist_1..dist_K' columns, got {fields}"
            )
        samples = []
        for i, row in enumerate(reader, start=2):
            try:
                if dist_cols:
                    target = np.array([float(row[c]) for c in dist_cols], np.float32)
                    if (target < 0).any() or target.sum() <= 0:
                        raise ValueError("distribution must be non-negative and not all zero")
                    target /= target.sum()
                else:
                    target = np.array([float(row["mos"])], np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{csv_path}:{i}: bad label ({exc})") from exc
            path = Path(row["image"])
            samples.append(
                Sample(path if path.is_absolute() else base / path, target, row.get("split") or "")
            )
    if not samples:
        raise ValueError(f"{csv_path}: no rows")
    return samples


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """The CSV's own split column when it has one (train / val), else a seeded random split."""
    if any(s.split for s in samples):
        return [s for s in samples if s.split == "train"], [
            s for s in samples if s.split in ("val", "validation")
        ]
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = round(len(samples) * val_fraction)
    val = {int(i) for i in order[:n_val]}
    return [s for i, s in enumerate(samples) if i not in val], [s for i, s in enumerate(samples) if i in val]


class LabelledImages(Dataset):
    """Decoded, optionally flipped, packed images with their labels."""

    def __init__(
        self, samples: Sequence[Sample], packing: PackingConfig, *, flip: bool, seed: int = 0
    ) -> None:
        self.samples = list(samples)
        self.packing = packing
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[PackedImage, np.ndarray]:
        sample = self.samples[index]
        image = decode_image(sample.path)
        # Seeded by (seed, epoch, index): the same run flips the same images, whatever the workers.
        if self.flip and np.random.default_rng((self.seed, self.epoch, index)).random() < 0.5:
            image = image[:, ::-1]
        return pack(np.ascontiguousarray(image), self.packing), sample.target


class SyntheticDistortions(Dataset):
    """Pristine photos with one random graded distortion each; the target is a pseudo quality.

    `length` items per epoch, drawn with replacement from the photos; deterministic per
    (seed, epoch, index).
    """

    def __init__(self, photos: Sequence[Path], packing: PackingConfig, *, length: int, seed: int = 0) -> None:
        from model import distortions

        self.photos = list(photos)
        self.packing = packing
        self.length = length
        self.seed = seed
        self.epoch = 0
        self._distortions = distortions
        if not self.photos:
            raise ValueError("no pristine photos found for synthetic pretraining")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[PackedImage, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = decode_image(self.photos[int(rng.integers(len(self.photos)))])
        if rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
        distorted, _, _, quality = self._distortions.random_distortion(image, rng)
        return pack(distorted, self.packing), np.array([quality], np.float32)


class DistortionGroups(Dataset):
    """Groups of one photo under one distortion at `group_size` fractional levels (for ranking).

    Why: a regression target per image ("JPEG level 2 = 64") says nothing about *this* photo; a
    group says "these versions of the same photo, distorted the same way, must be ordered by
    strength", which is what the synthetic order check and real users ask of a quality model. The
    levels are drawn uniformly from [0, LEVELS] (fractional: `distortions.strength_at`), so strengths
    between the table's knots (JPEG quality 60, say) are seen too. The random draws (noise
    pattern, blur angle) are the same for every level of a group. Kinds are drawn by
    `kind_weights` (kind -> weight; missing kinds weigh 1). Deterministic per (seed, epoch, index).
    Items are (packed versions, levels [group_size], pseudo-quality targets [group_size, 1]).
    """

    def __init__(
        self,
        photos: Sequence[Path],
        packing: PackingConfig,
        *,
        length: int,
        group_size: int = 4,
        kind_weights: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        from model import distortions

        if group_size < 2:
            raise ValueError(f"group_size must be at least 2 to rank, got {group_size}")
        self.photos = list(photos)
        if not self.photos:
            raise ValueError("no pristine photos found for synthetic ranking groups")
        self.packing = packing
        self.length = length
        self.group_size = group_size
        self.kinds = distortions.KINDS
        self.kind_p = distortions.kind_probabilities(kind_weights)
        self.seed = seed
        self.epoch = 0
        self._distortions = distortions

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[list[PackedImage], np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = decode_image(self.photos[int(rng.integers(len(self.photos)))])
        if rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        levels = np.sort(rng.uniform(0.0, self._distortions.LEVELS, self.group_size))
        draw_seed = int(rng.integers(2**31))
        packed = [
            pack(
                self._distortions.distort_at(image, kind, float(lv), np.random.default_rng(draw_seed)),
                self.packing,
            )
            for lv in levels
        ]
        targets = np.array([[self._distortions.pseudo_quality_at(float(lv))] for lv in levels], np.float32)
        return packed, levels.astype(np.float32), targets


def collate_groups(
    items: Sequence[tuple[list[PackedImage], np.ndarray, np.ndarray]],
) -> dict[str, torch.Tensor]:
    """DataLoader collate for `DistortionGroups`: the groups' versions flattened into one batch."""
    batch = collate([p for packed, _, _ in items for p in packed])
    return {
        "patches": torch.from_numpy(batch.patches),
        "spatial": torch.from_numpy(batch.spatial),
        "scale": torch.from_numpy(batch.scale),
        "mask": torch.from_numpy(batch.mask),
        "target": torch.from_numpy(np.concatenate([t for _, _, t in items])),
        "level": torch.from_numpy(np.concatenate([lv for _, lv, _ in items])),
        "group": torch.arange(len(items)).repeat_interleave(torch.tensor([len(p) for p, _, _ in items])),
    }


def collate_batch(items: Sequence[tuple[PackedImage, np.ndarray]]) -> dict[str, torch.Tensor]:
    """DataLoader collate: pad to the longest item; targets stacked."""
    batch = collate([packed for packed, _ in items])
    return {
        "patches": torch.from_numpy(batch.patches),
        "spatial": torch.from_numpy(batch.spatial),
        "scale": torch.from_numpy(batch.scale),
        "mask": torch.from_numpy(batch.mask),
        "target": torch.from_numpy(np.stack([t for _, t in items])),
    }
