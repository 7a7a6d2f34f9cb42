"""`musiq train`."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train or fine-tune from a TOML recipe (see configs/)")
    t.add_argument("--config", required=True, help="recipe file (.toml)")
    t.add_argument("--out", help="output folder (default: the recipe's)")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT/state.pt exists")
    t.add_argument("--max-steps", type=int, help="stop after N optimiser steps (smoke runs)")
    t.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    t.add_argument("--device", help="cpu or cuda (default: the recipe's)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.set_defaults(handler=cmd_train)

    s = sub.add_parser("split", help="write a CSV with the train/val split a training recipe uses")
    s.add_argument("--data", required=True, help="labels CSV (image, mos or dist_1..K)")
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0, help="the recipe's split_seed")
    s.add_argument("-o", "--output", required=True, help="CSV with absolute image paths and a split column")
    s.set_defaults(handler=cmd_split)


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, train

    cfg = TrainConfig.load(args.config)
    for attr in ("out", "max_steps", "epochs", "device"):
        if getattr(args, attr) is not None:
            setattr(cfg, attr, getattr(args, attr))
    best = train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps({"out": cfg.out, "best": best}))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    """The seeded split of `model.data.split_samples`, as a file `musiq eval --split val` reads."""
    import csv
    from pathlib import Path

    from model.data import read_labels, split_samples

    samples = read_labels(args.data)
    train, val = split_samples(samples, args.val_fraction, args.seed)
    names = {id(s): "train" for s in train} | {id(s): "val" for s in val}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "mos", "split"])
        for sample in samples:
            writer.writerow([str(sample.path.resolve()), float(sample.target[0]), names.get(id(sample), "")])
    print(f"{out}: {len(train)} train, {len(val)} val")
    return 0
