"""`musiq train --config CFG.toml`: native-resolution training with resume, logs and plots.

One config file holds the recipe (see `configs/`). Two data modes share the loop:
- `[data] csv = ...`: labelled images (MOS -> L1 loss, or 10-bin distributions -> EMD r=2);
- `[data] synthetic = true`: pristine photos with graded synthetic distortions and a pseudo
  quality target (pretraining without downloads).
Each epoch ends with a validation pass (SRCC / PLCC on the validation split), a metrics line in
`metrics.jsonl`, `last.safetensors` + `state.pt` (optimizer, schedule, RNG: resume continues
exactly) and `best.safetensors` when validation SRCC improved; `plots.png` is redrawn.
"""

from __future__ import annotations

import json
import math
import random
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model.checkpoint import default_score_range, load_checkpoint, save_checkpoint
from model.config import PRESETS, MusiqConfig, PackingConfig
from model.data import (
    DistortionGroups,
    LabelledImages,
    SyntheticDistortions,
    collate_batch,
    collate_groups,
    read_labels,
    split_samples,
)
from model.network import Musiq, build_model, to_checkpoint

ImageDataset = LabelledImages | SyntheticDistortions | DistortionGroups


@dataclass
class TrainConfig:
    """The recipe. Paths are relative to the config file."""

    # model
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)  # MusiqConfig overrides
    init: str = ""  # project checkpoint to start from (e.g. the pretraining stage's best)
    name: str = "musiq"
    version: str = "1"
    # data
    csv: str = ""
    synthetic: bool = False
    photos: list[str] = field(default_factory=list)  # synthetic: folders (default: BSDS500 + wheel photos)
    items_per_epoch: int = 2000  # synthetic
    # Ranking (issue 17): with rank_weight > 0, synthetic training draws groups of `group_size`
    # versions of one photo under one distortion (model.data.DistortionGroups) and adds a hinge
    # loss that orders each group by strength; CSV training mixes `rank_groups` such groups into
    # every step (ranking loss only: their pseudo targets are not on the MOS scale).
    rank_weight: float = 0.0
    rank_margin: float = 4.0  # score points per level of strength difference
    group_size: int = 4
    rank_groups: int = 2  # CSV training: groups per step
    kind_weights: dict[str, float] = field(default_factory=dict)  # distortion kind -> sampling weight
    val_fraction: float = 0.2
    split_seed: int = 0
    max_native_tokens: int = 512
    # optimisation
    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    workers: int = 2
    device: str = "cpu"
    # "bf16": autocast matmuls and convolutions to bfloat16 (norms and the loss stay float32), and
    # allow TF32 elsewhere on CUDA; the weights and optimizer state stay float32. "" = float32.
    precision: str = ""
    out: str = "runs/train"
    max_steps: int = 0  # stop early after this many steps (smoke runs); 0 = no limit
    # A wall-clock budget (seconds) for runs on lent machines: the schedule's progress is the
    # elapsed share of the budget (so the cosine reaches zero on time), and training stops there.
    time_budget_s: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Flattens TOML sections ([model], [data], [train]) into one config; unknown keys fail."""
        path = Path(path)
        raw = tomllib.loads(path.read_text())
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "model" and isinstance(value, dict):
                flat["preset"] = value.pop("preset", cls.preset)
                for k in ("init", "name", "version"):
                    if k in value:
                        flat[k] = value.pop(k)
                flat["model"] = value
            elif isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {', '.join(unknown)}")
        config = cls(**flat)
        base = path.parent
        for attr in ("csv", "init", "out"):
            value = getattr(config, attr)
            if value and not Path(value).is_absolute():
                setattr(config, attr, str((base / value).resolve()))
        config.photos = [str((base / p).resolve()) for p in config.photos]
        config.check_precision()
        config.network()  # fail at load, naming the setting, not halfway into a run
        from model.distortions import kind_probabilities

        try:
            kind_probabilities(config.kind_weights)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return config

    def check_precision(self) -> None:
        if self.precision not in ("", "bf16"):
            raise ValueError(f"precision must be '' or 'bf16', got {self.precision!r}")

    def autocast(self) -> torch.autocast:
        self.check_precision()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def network(self) -> MusiqConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        overrides = dict(self.model)
        cap = overrides.pop("max_native_tokens", self.max_native_tokens)
        try:
            return PRESETS[self.preset].replace(**overrides, max_native_tokens=cap)
        except TypeError as exc:  # an unknown [model] key
            raise ValueError(f"bad [model] settings: {exc}") from None


def emd_loss(logits: torch.Tensor, target: torch.Tensor, r: float = 2.0) -> torch.Tensor:
    """Earth mover's distance between predicted and target bin distributions (NIMA, r = 2)."""
    cdf_p = torch.cumsum(logits.softmax(dim=-1), dim=-1)
    cdf_t = torch.cumsum(target, dim=-1)
    return ((cdf_p - cdf_t).abs().pow(r).mean(dim=-1)).pow(1.0 / r).mean()


def loss_fn(model: Musiq, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if model.config.head == "distribution":
        return emd_loss(output, target)
    return F.l1_loss(output[:, 0], target[:, 0])


def ranking_loss(
    scores: torch.Tensor, levels: torch.Tensor, groups: torch.Tensor, margin: float
) -> torch.Tensor:
    """Hinge on every pair of one group: the milder version must score `margin` points per level higher.

    Pairs closer than 0.05 levels are ignored (too close to call). A margin that grows with the
    level gap keeps far-apart pairs from being satisfied by a hair's difference.
    """
    gap = levels[None, :] - levels[:, None]  # [i, j]: how much worse j is than i
    valid = (groups[:, None] == groups[None, :]) & (gap > 0.05)
    if not bool(valid.any()):
        return scores.sum() * 0.0
    shortfall = F.relu(margin * gap - (scores[:, None] - scores[None, :]))
    return shortfall[valid].mean()


def lr_at(step: int, total: int, warmup: int, base: float, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to zero (by step, or by a given progress in [0, 1])."""
    if step < warmup:
        return base * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups of the trainable parameters: weight decay on matrices and
    kernels, none on biases, norms and the position / scale embeddings."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.ndim > 1 and "embedding" not in name.split(".")[-1]
            (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - for third-party code on the legacy global RNG; ours uses Generators
    torch.manual_seed(seed)


def _datasets(cfg: TrainConfig, packing: PackingConfig) -> tuple[ImageDataset, ImageDataset]:
    """(training dataset, validation samples)."""
    if cfg.synthetic:
        from model.distortions import photo_split

        # Every tenth photo (its distorted versions) is held out for validation: unseen content.
        train_photos, val_photos = photo_split(cfg.photos)
        val = SyntheticDistortions(
            val_photos, packing, length=min(300, 20 * len(val_photos)), seed=cfg.seed + 1
        )
        if cfg.rank_weight > 0:
            groups = _groups(cfg, train_photos, packing, cfg.items_per_epoch // cfg.group_size)
            return groups, val
        return SyntheticDistortions(train_photos, packing, length=cfg.items_per_epoch, seed=cfg.seed), val
    if not cfg.csv:
        raise ValueError("set [data] csv = ... or synthetic = true")
    train_samples, val_samples = split_samples(read_labels(cfg.csv), cfg.val_fraction, cfg.split_seed)
    return (
        LabelledImages(train_samples, packing, flip=True, seed=cfg.seed),
        LabelledImages(val_samples, packing, flip=False),
    )


def _groups(cfg: TrainConfig, photos: list[Path], packing: PackingConfig, length: int) -> DistortionGroups:
    return DistortionGroups(
        photos,
        packing,
        length=max(1, length),
        group_size=cfg.group_size,
        kind_weights=cfg.kind_weights,
        seed=cfg.seed + 7,
    )


def _mixed_groups(cfg: TrainConfig, packing: PackingConfig, steps: int) -> DistortionGroups | None:
    """CSV training's ranking groups: the training photos of synthetic pretraining (never its held-out ones)."""
    if cfg.synthetic or cfg.rank_weight <= 0 or cfg.rank_groups <= 0:
        return None
    from model.distortions import photo_split

    return _groups(cfg, photo_split(cfg.photos)[0], packing, steps * cfg.rank_groups)


def _loader(
    dataset: ImageDataset, cfg: TrainConfig, shuffle: bool, batch_size: int | None = None
) -> DataLoader:
    g = torch.Generator().manual_seed(cfg.seed + getattr(dataset, "epoch", 0))
    grouped = isinstance(dataset, DistortionGroups)
    if batch_size is None:  # a synthetic group batch holds batch_size images
        batch_size = max(1, cfg.batch_size // cfg.group_size) if grouped else cfg.batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=cfg.workers,
        collate_fn=collate_groups if grouped else collate_batch,
        persistent_workers=False,
        pin_memory=cfg.device.startswith("cuda"),
        drop_last=shuffle and len(dataset) > batch_size,
    )


@torch.inference_mode()
def evaluate(model: Musiq, dataset: ImageDataset, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(predicted scores, target scores) over a validation dataset."""
    from model.network import head_score

    model.eval()
    preds, targets = [], []
    for batch in _loader(dataset, cfg, shuffle=False):
        inputs = [batch[k].to(cfg.device) for k in ("patches", "spatial", "scale", "mask")]
        with cfg.autocast():
            out = model(*inputs)
        preds.append(model.score(out.float()).cpu().numpy())
        t = batch["target"]
        if t.shape[-1] > 1:  # distributions: compare expectations
            t = head_score(torch.log(t.clamp_min(1e-8)), "distribution")[:, None]
        targets.append(t[:, 0].numpy())
    return np.concatenate(preds), np.concatenate(targets)


def train(cfg: TrainConfig, *, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) a training; returns the best validation metrics."""
    from tqdm import tqdm

    from model.evaluate import iqa_metrics

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    seed_everything(cfg.seed)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    net_cfg = cfg.network()
    packing = net_cfg.packing()
    train_set, val_set = _datasets(cfg, packing)

    model = Musiq(net_cfg)
    if cfg.init:
        init = load_checkpoint(cfg.init)
        if init.config.replace(max_native_tokens=net_cfg.max_native_tokens) != net_cfg:
            raise ValueError(f"{cfg.init} has config {init.config}, this recipe asks for {net_cfg}")
        model.load_state_dict(build_model(init).state_dict())
    else:
        if net_cfg.head == "score":  # start at the mean target: the L1 loss then learns the ranking first
            mean = float(np.mean([s.target[0] for s in getattr(train_set, "samples", [])] or [50.0]))
            torch.nn.init.constant_(model.head.bias, mean)
    model.to(cfg.device)
    groups = decay_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")

    steps_per_epoch = len(_loader(train_set, cfg, shuffle=True))
    mixed = _mixed_groups(cfg, packing, steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_fraction * total))
    start_epoch, step, best = 0, 0, {"srcc": -2.0}
    state_path = out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed from {state_path} at epoch {start_epoch}, step {step}")

    card = {"name": cfg.name, "version": cfg.version, "score_range": default_score_range(net_cfg)}
    log = (out / "metrics.jsonl").open("a")
    clock = time.perf_counter()

    def budget_progress() -> float | None:
        return (time.perf_counter() - clock) / cfg.time_budget_s if cfg.time_budget_s else None

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        train_set.epoch = epoch
        started, seen, losses, rank_losses = time.perf_counter(), 0, [], []
        group_batches = None
        if mixed is not None:
            mixed.epoch = epoch
            group_batches = iter(_loader(mixed, cfg, shuffle=True, batch_size=cfg.rank_groups))
        bar = tqdm(
            _loader(train_set, cfg, shuffle=True),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
        )
        for batch in bar:
            lr = lr_at(step, total, warmup, cfg.lr, budget_progress())
            for g in optimizer.param_groups:
                g["lr"] = lr
            inputs = [
                batch[k].to(cfg.device, non_blocking=True) for k in ("patches", "spatial", "scale", "mask")
            ]
            target = batch["target"].to(cfg.device)
            with cfg.autocast():
                output = model(*inputs)
            loss = loss_fn(model, output.float(), target)
            ranked, ranked_out = None, None
            if "group" in batch:  # synthetic ranking groups: the same batch is ranked too
                ranked, ranked_out = batch, output
            elif group_batches is not None:  # CSV training: a batch of synthetic groups besides
                ranked = next(group_batches)
                with cfg.autocast():
                    ranked_out = model(
                        *[ranked[k].to(cfg.device) for k in ("patches", "spatial", "scale", "mask")]
                    )
            if ranked is not None and ranked_out is not None:
                rank = ranking_loss(
                    model.score(ranked_out.float()),
                    ranked["level"].to(cfg.device),
                    ranked["group"].to(cfg.device),
                    cfg.rank_margin,
                )
                rank_losses.append(rank.item())
                loss = loss + cfg.rank_weight * rank
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            seen += len(target)
            losses.append(loss.item())
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", img_s=f"{rate:.1f}", lr=f"{lr:.2e}")
            if (cfg.max_steps and step >= cfg.max_steps) or (budget_progress() or 0) >= 1:
                break
        pred, target = evaluate(model, val_set, cfg)
        metrics = iqa_metrics(pred, target, n_boot=200, seed=epoch)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "rank_loss": float(np.mean(rank_losses)) if rank_losses else None,
            "images_per_s": seen / (time.perf_counter() - started),
            "lr": lr_at(step, total, warmup, cfg.lr, budget_progress()),
            "val_srcc": metrics["srcc"]["value"],
            "val_plcc": metrics["plcc"]["value"],
            "val_n": len(pred),
            "seconds": time.perf_counter() - started,
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record))
        ckpt = to_checkpoint(model.cpu(), **card, source=f"trained: {out.name} epoch {epoch + 1}")
        model.to(cfg.device)
        save_checkpoint(ckpt, out / "last.safetensors")
        if record["val_srcc"] > best["srcc"]:
            best = {"srcc": record["val_srcc"], "plcc": record["val_plcc"], "epoch": epoch + 1}
            save_checkpoint(ckpt, out / "best.safetensors")
            np.savetxt(
                out / "best_val_predictions.csv",
                np.stack([target, pred], 1),
                delimiter=",",
                header="target,pred",
                comments="",
            )
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "best": best,
                "torch_rng": torch.get_rng_state(),
            },
            state_path,
        )
        plot_history(out)
        if (cfg.max_steps and step >= cfg.max_steps) or (budget_progress() or 0) >= 1:
            break
    log.close()
    return best


def plot_history(out: Path) -> None:
    """Loss and validation SRCC/PLCC per epoch, and the best epoch's predicted-vs-target scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o")
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].plot(epochs, [r["val_srcc"] for r in rows], marker="o", label="SRCC")
    axes[1].plot(epochs, [r["val_plcc"] for r in rows], marker="s", label="PLCC")
    axes[1].set(title="validation", xlabel="epoch")
    axes[1].legend()
    best = out / "best_val_predictions.csv"
    if best.exists():
        data = np.loadtxt(best, delimiter=",", skiprows=1, ndmin=2)
        axes[2].scatter(data[:, 0], data[:, 1], s=8, alpha=0.6)
        axes[2].set(title="best epoch: predicted vs target", xlabel="target", ylabel="predicted")
    fig.tight_layout()
    fig.savefig(out / "plots.png", dpi=100)
    plt.close(fig)
