"""Averages the weights of fine-tunes that share one starting point (a uniform "model soup",
Wortsman et al., ICML 2022): often better than each ingredient, at one model's cost.

    python tools/soup.py OUT.safetensors A.safetensors B.safetensors [...]

The ingredients must have the same config; the soup keeps the first one's metadata.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from model.checkpoint import load_checkpoint, save_checkpoint


def main(out: str, *paths: str) -> None:
    ingredients = [load_checkpoint(p) for p in paths]
    first = ingredients[0]
    if any(c.config != first.config for c in ingredients):
        raise SystemExit("soup: the checkpoints have different configs")
    tensors = {
        k: np.mean([c.tensors[k].astype(np.float64) for c in ingredients], axis=0).astype(np.float32)
        for k in first.tensors
    }
    names = ", ".join(paths)
    save_checkpoint(dataclasses.replace(first, tensors=tensors, source=f"soup of {names}"), out)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], *sys.argv[2:])
