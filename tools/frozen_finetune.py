"""Fine-tuning the transformer on CLIVE with the patch encoder frozen (issue 17's "freezing the
patch encoder" lever), fast enough on two CPU cores to choose a recipe by a held-out dev set.

Why: the patch encoder (ResNet + its 16384 -> D projection) holds 3.2 M of the small preset's 5.5 M
parameters and two thirds of its FLOPs. Fine-tuning all of it on 749 images overfits by epoch 9
(model card). Frozen, its output for each image (and its mirror, for flip augmentation) is computed
once; an epoch then runs only the transformer (a quarter of the FLOPs; 54 s instead of ~9 min on
2 cores, decoding and packing gone too), and the recipe can be chosen on
a dev set carved from the training split instead of on the validation split it is reported on.
Measured (model/weights/MODEL_CARD.md, "Tried and lost"): both frozen starts lost to v2's full
fine-tune; the encoder is what has to learn.

    python -m tools.frozen_finetune cache --init runs/pretrain_synthetic.fp16.safetensors \\
        --split runs/clive_split.csv --out runs/frozen/stage1b.pt
    python -m tools.frozen_finetune train --cache runs/frozen/stage1b.pt --out runs/frozen/a \\
        --epochs 20 --lr 2e-4 --seed 0 [--dev 150]

`train` writes `metrics.jsonl` (train loss, dev and validation SRCC per epoch), `best.safetensors`
(the epoch with the best dev SRCC; with --dev 0 the last epoch) and `last.safetensors`: whole
checkpoints, encoder included, that `musiq eval`, `bench.synthetic_order` and
`tools/install_default.sh` take as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import default_score_range, load_checkpoint, save_checkpoint
from model.data import read_labels
from model.decode import decode_image
from model.evaluate import iqa_metrics
from model.network import Musiq, build_model, to_checkpoint
from model.packing import PackedImage, pack
from model.train import decay_groups, lr_at, ranking_loss


@dataclass
class Encoded:
    """One image after the frozen patch encoder: tokens [n, D] and their spatial / scale ids."""

    tokens: torch.Tensor
    spatial: torch.Tensor
    scale: torch.Tensor


def _encode(model: Musiq, packed: PackedImage) -> Encoded:
    keep = packed.mask.astype(bool)
    with torch.no_grad():
        tokens = model.patch_encoder(torch.from_numpy(packed.patches[keep][None]))[0]
    return Encoded(
        tokens.clone(),
        torch.from_numpy(packed.spatial[keep].astype(np.int64)),
        torch.from_numpy(packed.scale[keep].astype(np.int64)),
    )


def _fixed_mmap_threshold() -> None:
    """Keeps glibc from growing the heap without bound here: after the first ~30 MB feature map is
    freed, glibc raises its mmap threshold and serves the next maps from the heap, where the small
    token arrays this cache keeps pin them (measured: +45 MB an image, 23 GB by image 500). A fixed
    1 MiB threshold returns each map to the system when freed (RSS flat at ~350 MB)."""
    with contextlib.suppress(OSError):  # not glibc: nothing to set
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _encode_groups(model: Musiq, count: int, max_native_tokens: int) -> list[dict]:
    """`count` synthetic ranking groups (model.data.DistortionGroups: one training photo under one
    distortion at 4 fractional levels, JPEG drawn 2x and WebP 1.5x as in stage 1c), encoded."""
    from model.data import DistortionGroups
    from model.distortions import photo_split

    packing = model.config.replace(max_native_tokens=max_native_tokens).packing()
    groups = DistortionGroups(
        photo_split()[0], packing, length=count, kind_weights={"jpeg": 2.0, "webp": 1.5}, seed=7
    )
    encoded = []
    for index in tqdm(range(count), desc="ranking groups", unit="group"):
        packed, levels, _ = groups[index]
        encoded.append({"versions": [_encode(model, p) for p in packed], "levels": torch.from_numpy(levels)})
    return encoded


def cache_groups(init: str, count: int, out: str, max_native_tokens: int) -> None:
    """Encodes `count` synthetic ranking groups once, for `train --groups`."""
    _fixed_mmap_threshold()
    model = build_model(load_checkpoint(init))
    groups = _encode_groups(model, count, max_native_tokens)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"init": init, "max_native_tokens": max_native_tokens, "groups": groups}, out)
    print(f"cached {len(groups)} ranking groups in {out}")


def cache(init: str, split: str, out: str, max_native_tokens: int) -> None:
    """Encodes every image of the split once (training images also mirrored)."""
    _fixed_mmap_threshold()
    model = build_model(load_checkpoint(init))
    packing = model.config.replace(max_native_tokens=max_native_tokens).packing()
    samples = read_labels(split)
    items = []
    for sample in tqdm(samples, desc="encoding", unit="img"):
        pixels = decode_image(sample.path)
        versions = [_encode(model, pack(pixels, packing))]
        if sample.split == "train":
            versions.append(_encode(model, pack(np.ascontiguousarray(pixels[:, ::-1]), packing)))
        items.append(
            {
                "path": str(sample.path),
                "mos": float(sample.target[0]),
                "split": sample.split,
                "versions": versions,
            }
        )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"init": init, "max_native_tokens": max_native_tokens, "items": items}, out)
    print(f"cached {len(items)} images ({sum(len(i['versions']) for i in items)} versions) in {out}")


def _batch(versions: list[Encoded]) -> tuple[torch.Tensor, ...]:
    length = max(len(v.tokens) for v in versions)
    width = versions[0].tokens.shape[1]
    tokens = torch.zeros(len(versions), length, width)
    spatial = torch.zeros(len(versions), length, dtype=torch.long)
    scale = torch.zeros(len(versions), length, dtype=torch.long)
    mask = torch.zeros(len(versions), length, dtype=torch.bool)
    for i, v in enumerate(versions):
        n = len(v.tokens)
        tokens[i, :n], spatial[i, :n], scale[i, :n], mask[i, :n] = v.tokens, v.spatial, v.scale, True
    return tokens, spatial, scale, mask


def _scores(
    model: Musiq, tokens: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    return model.score(model.head(model.encode(*model.embed_tokens(tokens, spatial, scale, mask))))


def _predict(model: Musiq, versions: list[Encoded], batch_size: int = 16) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(versions), batch_size):
            out.append(_scores(model, *_batch(versions[i : i + batch_size])).numpy())
    return np.concatenate(out)


def _srcc(model: Musiq, **sets: list[dict]) -> dict[str, float]:
    """SRCC against MOS of each named set of cached images (unflipped)."""
    record = {}
    for name, chosen in sets.items():
        if chosen:
            scores = _predict(model, [i["versions"][0] for i in chosen])
            target = np.array([i["mos"] for i in chosen])
            record[f"{name}_srcc"] = iqa_metrics(scores, target, n_boot=0)["srcc"]["value"]
    return record


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    store = torch.load(args.cache, weights_only=False)
    init = load_checkpoint(store["init"])
    model = build_model(init)
    model.config = model.config.replace(max_native_tokens=store["max_native_tokens"])
    for p in model.patch_encoder.parameters():
        p.requires_grad_(False)
    items, groups = store["items"], []
    if args.groups:
        ranked = torch.load(args.groups, weights_only=False)
        if (ranked["init"], ranked["max_native_tokens"]) != (store["init"], store["max_native_tokens"]):
            raise SystemExit(f"{args.groups} was encoded by {ranked['init']}, the cache by {store['init']}")
        groups = ranked["groups"]
    train_items = [i for i in items if i["split"] == "train"]
    val_items = [i for i in items if i["split"] in ("val", "validation")]
    order = np.random.default_rng(args.dev_seed).permutation(len(train_items))
    dev_items = [train_items[k] for k in order[: args.dev]]
    fit_items = [train_items[k] for k in order[args.dev :]]
    print(f"fit {len(fit_items)}, dev {len(dev_items)}, val {len(val_items)} images")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(fit_items) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup_fraction * total))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    card = {"name": args.name, "version": args.version, "score_range": default_score_range(model.config)}
    rng = np.random.default_rng(args.seed)
    mos = torch.tensor([i["mos"] for i in fit_items])
    best = -2.0
    step = 0
    started = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as log:
        log.write(json.dumps({"epoch": 0, **_srcc(model, dev=dev_items, val=val_items)}) + "\n")
        for epoch in range(args.epochs):
            model.train()
            model.patch_encoder.eval()
            perm = rng.permutation(len(fit_items))
            flips = rng.random(len(fit_items)) < 0.5
            losses, rank_losses = [], []
            for s in range(steps_per_epoch):
                idx = perm[s * args.batch_size : (s + 1) * args.batch_size]
                versions = [fit_items[k]["versions"][int(flips[k])] for k in idx]
                lr = lr_at(step, total, warmup, args.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                pred = _scores(model, *_batch(versions))
                loss = F.l1_loss(pred, mos[torch.from_numpy(idx)])
                if args.rank_groups and groups:
                    chosen = [groups[int(k)] for k in rng.integers(len(groups), size=args.rank_groups)]
                    ranked = _scores(model, *_batch([v for g in chosen for v in g["versions"]]))
                    levels = torch.cat([g["levels"] for g in chosen])
                    ids = torch.arange(len(chosen)).repeat_interleave(
                        torch.tensor([len(g["versions"]) for g in chosen])
                    )
                    rank = ranking_loss(ranked, levels, ids, args.rank_margin)
                    rank_losses.append(rank.item())
                    loss = loss + args.rank_weight * rank
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                step += 1
            record: dict[str, float | int] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
            if rank_losses:
                record["rank_loss"] = float(np.mean(rank_losses))
            record.update(_srcc(model, dev=dev_items, val=val_items))
            record["seconds"] = round(time.perf_counter() - started, 1)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
            ckpt = to_checkpoint(
                model, **card, source=f"frozen-encoder fine-tune {out.name} epoch {epoch + 1}"
            )
            save_checkpoint(ckpt, out / "last.safetensors")
            score = float(record.get("dev_srcc", epoch))
            if score > best:
                best = score
                save_checkpoint(ckpt, out / "best.safetensors")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="encode every image of a split CSV once")
    c.add_argument("--init", required=True)
    c.add_argument("--split", required=True, help="CSV with image, mos, split (musiq split)")
    c.add_argument("--out", required=True)
    c.add_argument("--max-native-tokens", type=int, default=512)
    g = sub.add_parser("cache-groups", help="encode synthetic ranking groups once")
    g.add_argument("--init", required=True)
    g.add_argument("--count", type=int, required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--max-native-tokens", type=int, default=512)
    t = sub.add_parser("train", help="fine-tune the transformer on a cache")
    t.add_argument("--cache", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--warmup-fraction", type=float, default=0.03)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dev", type=int, default=150, help="training images held out to choose the epoch")
    t.add_argument("--dev-seed", type=int, default=0)
    t.add_argument("--groups", help="a cache-groups file made with the same init")
    t.add_argument("--rank-groups", type=int, default=0, help="cached ranking groups mixed into each step")
    t.add_argument("--rank-weight", type=float, default=1.0)
    t.add_argument("--rank-margin", type=float, default=4.0, help="points per level (as stage 3)")
    t.add_argument("--name", default="musiq-clive-small")
    t.add_argument("--version", default="3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.command == "cache":
        cache(args.init, args.split, args.out, args.max_native_tokens)
    elif args.command == "cache-groups":
        cache_groups(args.init, args.count, args.out, args.max_native_tokens)
    else:
        train(args)


if __name__ == "__main__":
    main()
