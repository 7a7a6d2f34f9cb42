"""MUSIQ vs BRISQUE on the same validation images, side by side, with a paired bootstrap.

Usage (`make brisque-compare` does all of it):
    musiq split --data ../shared/data/clive/labels.csv -o runs/clive_split.csv
    musiq eval --data runs/clive_split.csv --split val --out runs/eval_default
    .venv-brisque/bin/python bench/brisque_compare.py runs/eval_default/predictions.csv

BRISQUE comes from PyPI `brisque` (its shipped, trained model; OpenCV features), installed in its
own virtualenv because it needs numpy < 2. Lower BRISQUE means better quality, so its negated
score is correlated with MOS. The paired bootstrap resamples the same images for both models and
gives an interval for the SRCC difference.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.evaluate import format_metrics, iqa_metrics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("predictions", help="predictions.csv written by `musiq eval --out` (image,mos,pred)")
    parser.add_argument("--out", default="bench/results/brisque_vs_musiq.md")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    from brisque import BRISQUE

    with open(args.predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    mos = np.array([float(r["mos"]) for r in rows])
    musiq = np.array([float(r["pred"]) for r in rows])
    model = BRISQUE(url=False)
    brisque = np.array([model.score(np.asarray(Image.open(r["image"]).convert("RGB"))) for r in rows])

    ours = iqa_metrics(musiq, mos, n_boot=args.n_boot, seed=0)
    theirs = iqa_metrics(-brisque, mos, n_boot=args.n_boot, seed=0)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(args.n_boot):
        i = rng.integers(0, len(mos), len(mos))
        rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
        diffs.append(
            np.corrcoef(rank(musiq[i]), rank(mos[i]))[0, 1]
            - np.corrcoef(rank(-brisque[i]), rank(mos[i]))[0, 1]
        )
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    delta = ours["srcc"]["value"] - theirs["srcc"]["value"]
    text = "\n".join(
        [
            f"Validation images: {len(mos)} ({args.predictions})",
            "",
            "MUSIQ (predictions file):",
            format_metrics(ours),
            "",
            "BRISQUE (PyPI brisque, shipped model; score negated):",
            format_metrics(theirs),
            "",
            f"SRCC difference MUSIQ - BRISQUE: {delta:+.4f}, paired bootstrap 95% CI [{lo:+.4f}, {hi:+.4f}]",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
