"""`musiq eval`: score a labelled data set and report SRCC / PLCC with bootstrap intervals.

The data set is a CSV with an `image` column (a path, relative to the CSV's folder unless
absolute) and a `mos` column; an optional `split` column lets one file describe train/val/test
and `--split test` pick one. The CSV is checked in full (columns, numbers, files present) before
the model is loaded, so a typo costs a second, not a scoring run. torch is imported only once
the checks pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import default_checkpoint_path, load_named_or_default

REQUIRED_COLUMNS = ("image", "mos")
MAX_LISTED = 5  # missing files named in an error message; the rest are counted


@dataclass(frozen=True)
class LabelledImages:
    images: list[str]  # as written in the CSV (reported back in predictions.csv)
    paths: list[Path]  # resolved against the CSV's folder
    mos: np.ndarray  # float64 [n]


def read_dataset(path: str | Path, *, split: str | None = None, limit: int | None = None) -> LabelledImages:
    """Reads and validates an evaluation CSV; every problem is a ValueError naming the file."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError:
        raise ValueError(f"no such CSV file: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read {path} as CSV: {exc}") from exc

    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        found = ", ".join(header) if header else "no header"
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {found}); "
            f"expected columns image, mos and optionally split"
        )
    if split is not None:
        if "split" not in header:
            raise ValueError(f"{path}: --split {split} given but the CSV has no 'split' column")
        present = sorted({(r.get("split") or "").strip() for _, r in rows})
        rows = [(n, r) for n, r in rows if (r.get("split") or "").strip() == split]
        if not rows:
            raise ValueError(f"{path}: no rows with split {split!r} (splits present: {', '.join(present)})")
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{path}: no data rows")

    images: list[str] = []
    mos: list[float] = []
    for line, row in rows:
        name = (row.get("image") or "").strip()
        value = (row.get("mos") or "").strip()
        if not name:
            raise ValueError(f"{path}:{line}: empty image field")
        try:
            score = float(value)
        except ValueError:
            raise ValueError(f"{path}:{line}: mos {value!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{path}:{line}: mos {value!r} is not finite")
        images.append(name)
        mos.append(score)

    base = path.parent
    paths = [Path(name) if Path(name).is_absolute() else base / name for name in images]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        listed = ", ".join(absent[:MAX_LISTED])
        more = f" and {len(absent) - MAX_LISTED} more" if len(absent) > MAX_LISTED else ""
        raise ValueError(f"{path}: {len(absent)} image file(s) not found: {listed}{more}")
    return LabelledImages(images, paths, np.asarray(mos, dtype=np.float64))


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="score a labelled data set (CSV of image,mos) and report SRCC/PLCC",
        description=(
            "Scores every image of a CSV (columns: image, mos, optional split; image paths are "
            "relative to the CSV's folder) and prints SRCC, KRCC, PLCC and RMSE with bootstrap "
            "intervals as a Markdown table."
        ),
    )
    e.add_argument("--checkpoint", help="project checkpoint (.safetensors); default: the embedded model")
    e.add_argument("--data", required=True, help="CSV with columns image, mos [, split]")
    e.add_argument("--split", help="keep only rows whose split column equals this")
    e.add_argument("--out", help="folder for metrics.json, predictions.csv and scatter.png")
    e.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    e.add_argument("--workers", type=int, default=0, help="decode processes (default 0: in-process)")
    e.add_argument("--limit", type=int, help="score only the first N rows (after --split)")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000; 0: none)")
    e.add_argument(
        "--flip",
        action="store_true",
        help="test-time flip averaging: the mean of each image's score and its mirror's (two "
        "forwards an image; the service scores one)",
    )
    e.set_defaults(handler=cmd_eval)


def _json_safe(value: Any) -> Any:
    """NaN / inf become null: strict JSON has no representation for them."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def cmd_eval(args: argparse.Namespace) -> int:
    from model.evaluate import format_metrics, iqa_metrics, scatter_plot

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    data = read_dataset(args.data, split=args.split, limit=args.limit)
    checkpoint = load_named_or_default(args.checkpoint)

    from model.network import build_model
    from model.scoring import flip_averaged, score_images

    model = build_model(checkpoint)
    scorer = flip_averaged if args.flip else score_images
    pred = scorer(
        model,
        data.paths,
        packing=checkpoint.packing,
        batch_size=args.batch_size,
        progress=True,
        workers=args.workers,
    )
    metrics = iqa_metrics(pred, data.mos, n_boot=args.n_boot)
    print(format_metrics(metrics), flush=True)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            **metrics,
            "model": checkpoint.name,
            "model_version": checkpoint.version,
            "checkpoint": str(args.checkpoint or default_checkpoint_path()),
            "data": str(args.data),
            "split": args.split,
            "flip_averaged": bool(args.flip),
        }
        (out / "metrics.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
        with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "mos", "pred"])
            for name, mos, score in zip(data.images, data.mos, pred, strict=True):
                writer.writerow([name, repr(float(mos)), repr(float(score))])
        title = f"{checkpoint.name} on {Path(args.data).name}" + (f" ({args.split})" if args.split else "")
        scatter_plot(pred, data.mos, out / "scatter.png", title=title, metrics=metrics)
        print(f"musiq eval: wrote metrics.json, predictions.csv, scatter.png to {out}", file=sys.stderr)
    return 0
