"""Training: the TOML recipe, labels, losses, schedule, datasets, the loop (resume included), the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from model.checkpoint import load_checkpoint
from model.config import PackingConfig
from model.data import LabelledImages, Sample, collate_batch, read_labels, split_samples
from model.decode import decode_image
from model.packing import pack
from model.train import TrainConfig, emd_loss, lr_at, train
from tests.helpers import musiq

# A tiny network: one 64-px resized scale (4 tokens) + 16 native tokens, one transformer layer.
TINY_MODEL = """
[model]
preset = "small"
hidden_size = 32
num_layers = 1
num_heads = 2
mlp_dim = 48
longer_sides = [64]
"""
TOKENS = 4 + 16


def write_recipe(path: Path, *, data: str, train: str = "", model: str = TINY_MODEL) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{model}\n[data]\nmax_native_tokens = 16\n{data}\n"
        f'[train]\nbatch_size = 4\nworkers = 0\nseed = 0\nout = "out"\n{train}\n'
    )
    return path


def write_noise_set(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """`n` random JPEGs of varied sizes with a random MOS each; returns the labels.csv path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image,mos"]
    for i in range(n):
        h, w = int(rng.integers(40, 130)), int(rng.integers(40, 130))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
        rows.append(f"{i}.jpg,{rng.uniform(10, 90):.2f}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def write_photos(folder: Path, n: int = 3) -> Path:
    """`n` small noisy gradient PNGs standing in for pristine photos; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        y, x = np.mgrid[0:96, 0:128]
        base = np.stack([x * 2, y * 2, (x + y)], -1) % 256
        noisy = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"p{i}.png")
    return folder


def write_brightness_set(folder: Path, n: int = 20) -> Path:
    """Uniformly coloured images whose MOS (0..5) is proportional to their brightness (trivially learnable)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,mos"]
    for i in range(n):
        level = round(255 * i / (n - 1))
        Image.fromarray(np.full((64, 64, 3), level, np.uint8)).save(folder / f"{i}.jpg", quality=95)
        rows.append(f"{i}.jpg,{5 * level / 255:.4f}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# TrainConfig.load
# --------------------------------------------------------------------------------------------


def test_load_flattens_sections_and_resolves_paths(tmp_path: Path) -> None:
    recipe = tmp_path / "configs" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text(
        TINY_MODEL
        + 'init = "../runs/pre/best.safetensors"\nname = "tiny"\nversion = "7"\n'
        + '[data]\ncsv = "../data/labels.csv"\nphotos = ["photos", "/abs/photos"]\nmax_native_tokens = 16\n'
        + '[train]\nepochs = 3\nlr = 1e-3\nout = "../runs/x"\n'
    )
    cfg = TrainConfig.load(recipe)
    assert cfg.preset == "small" and cfg.name == "tiny" and cfg.version == "7"
    assert cfg.model == {
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "mlp_dim": 48,
        "longer_sides": [64],
    }
    assert cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.max_native_tokens == 16
    assert cfg.batch_size == TrainConfig().batch_size  # untouched settings keep their defaults
    root = tmp_path.resolve()
    assert cfg.csv == str(root / "data" / "labels.csv")
    assert cfg.init == str(root / "runs" / "pre" / "best.safetensors")
    assert cfg.out == str(root / "runs" / "x")
    assert cfg.photos == [str(root / "configs" / "photos"), "/abs/photos"]
    net = cfg.network()
    assert (net.hidden_size, net.num_layers, net.longer_sides, net.max_native_tokens) == (32, 1, (64,), 16)
    assert net.packing().max_native_tokens == 16


def test_load_keeps_absolute_paths_and_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\ncsv = "{tmp_path / "labels.csv"}"\n')
    cfg = TrainConfig.load(recipe)
    assert cfg.csv == str(tmp_path / "labels.csv")
    assert cfg.preset == "small" and cfg.model == {} and cfg.init == ""
    assert cfg.out == str((tmp_path / "runs" / "train").resolve())


def test_load_rejects_unknown_keys_naming_them(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[data]\ncsv = 'x.csv'\nbogus_data = 1\n[train]\nepochz = 3\nlr = 1e-3\n")
    with pytest.raises(ValueError, match="unknown settings bogus_data, epochz"):
        TrainConfig.load(recipe)
    recipe.write_text("stray = true\n")
    with pytest.raises(ValueError, match="stray"):
        TrainConfig.load(recipe)


def test_bad_preset_is_a_value_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "huge"\n')
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig.load(recipe).network()


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.toml"))
)
def test_shipped_recipes_load(name: str) -> None:
    cfg = TrainConfig.load(Path(__file__).parents[1] / "configs" / name)
    assert cfg.network().max_native_tokens == cfg.max_native_tokens
    assert Path(cfg.out).is_absolute()


# --------------------------------------------------------------------------------------------
# Labels and splits
# --------------------------------------------------------------------------------------------


def test_read_labels_mos(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(f"image,mos\na.jpg,12.5\nsub/b.jpg,80\n{tmp_path / 'abs.jpg'},3\n")
    samples = read_labels(csv)
    assert [s.path for s in samples] == [tmp_path / "a.jpg", tmp_path / "sub" / "b.jpg", tmp_path / "abs.jpg"]
    assert [s.target.tolist() for s in samples] == [[12.5], [80.0], [3.0]]
    assert all(s.target.dtype == np.float32 and s.split == "" for s in samples)
    assert read_labels(csv, root=tmp_path / "elsewhere")[0].path == tmp_path / "elsewhere" / "a.jpg"


def test_read_labels_distributions_are_normalised(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    # Columns out of numeric order on purpose: dist_10 must come after dist_2.
    header = ",".join(["image", *(f"dist_{k}" for k in (1, 10, *range(2, 10)))])
    csv.write_text(f"{header}\na.jpg,1,10,2,3,4,5,6,7,8,9\nb.jpg,0,0,0,0,0,0,0,0,0,5\n")
    a, b = read_labels(csv)
    assert a.target.shape == (10,) and math.isclose(float(a.target.sum()), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(a.target, np.arange(1, 11) / 55, rtol=1e-6)
    np.testing.assert_allclose(b.target, [0] * 8 + [1, 0], rtol=0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("image,score\na.jpg,3\n", "needs an 'image' column"),
        ("path,mos\na.jpg,3\n", "needs an 'image' column"),
        ("image,mos\na.jpg,3\nb.jpg,good\n", r"labels\.csv:3: bad label"),
        ("image,mos\na.jpg,3\nb.jpg,4\nc.jpg,\n", r"labels\.csv:4: bad label"),
        ("image,mos\na.jpg\n", r"labels\.csv:2: bad label"),  # a short row: the value is missing
        ("image,dist_1,dist_2\na.jpg,1,x\n", r"labels\.csv:2: bad label"),
        ("image,dist_1,dist_2\na.jpg,1,1\nb.jpg,0,0\n", r"labels\.csv:3: bad label.*not all zero"),
        ("image,dist_1,dist_2\na.jpg,-1,2\n", r"labels\.csv:2: bad label.*non-negative"),
        ("image,mos\n", "no rows"),
    ],
)
def test_read_labels_errors_name_the_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_labels(csv)


def test_split_uses_the_split_column(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "image,mos,split\na.jpg,1,train\nb.jpg,2,val\nc.jpg,3,train\nd.jpg,4,validation\ne.jpg,5,test\n"
    )
    train_set, val_set = split_samples(read_labels(csv), val_fraction=0.5, seed=3)
    assert [s.path.name for s in train_set] == ["a.jpg", "c.jpg"]
    assert [s.path.name for s in val_set] == ["b.jpg", "d.jpg"]  # "test" rows are in neither


def test_random_split_is_seeded_disjoint_and_complete() -> None:
    samples = [Sample(Path(f"{i}.jpg"), np.array([i], np.float32)) for i in range(50)]
    train_a, val_a = split_samples(samples, 0.2, seed=0)
    train_b, val_b = split_samples(samples, 0.2, seed=0)
    assert train_a == train_b and val_a == val_b
    names_train, names_val = {s.path.name for s in train_a}, {s.path.name for s in val_a}
    assert len(val_a) == 10 and len(train_a) == 40
    assert not names_train & names_val and len(names_train | names_val) == 50
    _, val_c = split_samples(samples, 0.2, seed=1)
    assert {s.path.name for s in val_c} != names_val
    assert [int(s.target[0]) for s in train_a] == sorted(int(s.target[0]) for s in train_a)  # CSV order kept
    assert split_samples(samples, 0.0, seed=0)[1] == []


# --------------------------------------------------------------------------------------------
# Loss and schedule
# --------------------------------------------------------------------------------------------


def test_emd_loss_zero_for_identical_distributions() -> None:
    target = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    assert emd_loss(torch.log(target), target).item() == pytest.approx(0.0, abs=1e-6)
    # Logits are only defined up to a constant: a shift changes nothing.
    assert emd_loss(torch.log(target) + 5.0, target).item() == pytest.approx(0.0, abs=1e-6)


def test_emd_loss_matches_hand_computation() -> None:
    p = torch.tensor([0.2, 0.3, 0.5])
    t = torch.tensor([0.5, 0.3, 0.2])
    # cdf_p = [.2, .5, 1], cdf_t = [.5, .8, 1]: differences -.3, -.3, 0 -> sqrt(.18 / 3)
    expected = math.sqrt((0.3**2 + 0.3**2 + 0.0) / 3)
    assert emd_loss(torch.log(p)[None], t[None]).item() == pytest.approx(expected, rel=1e-5)
    # The batch mean of per-item distances, positive whenever they differ.
    both = emd_loss(torch.log(torch.stack([p, t])), torch.stack([t, t]))
    assert both.item() == pytest.approx(expected / 2, rel=1e-5)
    assert emd_loss(torch.zeros(1, 3), t[None]).item() > 0


def test_emd_loss_has_gradients() -> None:
    logits = torch.zeros(2, 5, requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    emd_loss(logits, target).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_lr_warmup_then_cosine() -> None:
    base, total, warmup = 1e-3, 100, 10
    warm = [lr_at(s, total, warmup, base) for s in range(warmup)]
    np.testing.assert_allclose(warm, base * np.arange(1, warmup + 1) / warmup, rtol=1e-12)
    assert lr_at(warmup, total, warmup, base) == pytest.approx(base)
    decay = [lr_at(s, total, warmup, base) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(55, total, warmup, base) == pytest.approx(base / 2)  # halfway through the cosine
    assert lr_at(total - 1, total, warmup, base) < 1e-2 * base
    assert lr_at(total, total, warmup, base) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(total + 50, total, warmup, base) == pytest.approx(0.0, abs=1e-15)  # clamped


def test_lr_progress_overrides_step() -> None:
    base = 2e-4
    assert lr_at(20, 100, 10, base, progress=0.5) == pytest.approx(base / 2)
    assert lr_at(20, 100, 10, base, progress=0.0) == pytest.approx(base)
    assert lr_at(20, 100, 10, base, progress=1.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(99, 100, 10, base, progress=0.25) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(20, 100, 10, base, progress=3.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(4, 100, 10, base, progress=0.9) == pytest.approx(base * 5 / 10)  # warm-up still first


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_packing(tmp_path: Path) -> PackingConfig:
    recipe = write_recipe(tmp_path / "r.toml", data='csv = "labels.csv"')
    return TrainConfig.load(recipe).network().packing()


def test_flips_are_deterministic_per_seed_epoch_index(tmp_path: Path, tiny_packing: PackingConfig) -> None:
    samples = read_labels(write_noise_set(tmp_path / "data", n=6))
    data = LabelledImages(samples, tiny_packing, flip=True, seed=5)
    plain = [pack(decode_image(s.path), tiny_packing).patches for s in samples]
    flipped = [
        pack(np.ascontiguousarray(decode_image(s.path)[:, ::-1]), tiny_packing).patches for s in samples
    ]

    def flips(epoch: int) -> list[bool]:
        data.epoch = epoch
        out = []
        for i in range(len(data)):
            patches = data[i][0].patches
            assert np.array_equal(patches, plain[i]) or np.array_equal(patches, flipped[i])
            out.append(not np.array_equal(patches, plain[i]))
        return out

    by_epoch = [flips(e) for e in range(4)]
    assert flips(2) == by_epoch[2]  # same (seed, epoch, index): same flips
    assert LabelledImages(samples, tiny_packing, flip=True, seed=5).__getitem__(0)[0].patches.tobytes() == (
        (flipped if by_epoch[0][0] else plain)[0].tobytes()
    )
    assert any(len({e[i] for e in by_epoch}) == 2 for i in range(len(data)))  # differ across epochs
    assert any(any(e) for e in by_epoch) and not all(all(e) for e in by_epoch)
    no_flip = LabelledImages(samples, tiny_packing, flip=False, seed=5)
    assert all(np.array_equal(no_flip[i][0].patches, plain[i]) for i in range(len(samples)))


def test_packed_tokens_and_collate_shapes(tmp_path: Path, tiny_packing: PackingConfig) -> None:
    samples = read_labels(write_noise_set(tmp_path / "data", n=5))
    data = LabelledImages(samples, tiny_packing, flip=True)
    items = [data[i] for i in range(len(data))]
    for (packed, target), sample in zip(items, samples, strict=True):
        h, w = decode_image(sample.path).shape[:2]
        # training packs with a cap, not a fixed length: no padding rows beyond the batch's own
        assert packed.num_tokens == int(packed.mask.sum()) + (4 - packed.layout[0].valid) <= TOKENS
        assert int(packed.mask.sum()) == packed.layout[0].valid + min(16, -(-h // 32) * -(-w // 32))
        assert set(packed.scale[packed.mask].tolist()) == {0, 1}
        assert np.array_equal(target, sample.target)
    batch = collate_batch(items[:4])
    longest = max(p.num_tokens for p, _ in items[:4])
    assert batch["patches"].shape == (4, longest, 32 * 32 * 3) and batch["patches"].dtype == torch.float32
    assert batch["spatial"].shape == batch["scale"].shape == batch["mask"].shape == (4, longest)
    assert batch["mask"].dtype == torch.bool
    assert batch["target"].shape == (4, 1) and batch["target"].dtype == torch.float32
    dist = [(items[i][0], np.full(10, 0.1, np.float32)) for i in range(3)]
    assert collate_batch(dist)["target"].shape == (3, 10)


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def noise_recipe(tmp_path: Path, train_lines: str = "epochs = 2") -> TrainConfig:
    write_noise_set(tmp_path / "data", n=15)  # 12 training images (3 steps of 4), 3 validation images
    return TrainConfig.load(
        write_recipe(tmp_path / "r.toml", data='csv = "data/labels.csv"', train=train_lines)
    )


KEYS = {
    "epoch",
    "step",
    "train_loss",
    "images_per_s",
    "lr",
    "val_srcc",
    "val_plcc",
    "val_n",
    "seconds",
    "rank_loss",
}


def test_train_end_to_end(tmp_path: Path) -> None:
    cfg = noise_recipe(tmp_path)
    best = train(cfg, progress=False)
    out = Path(cfg.out)
    rows = metrics(out)
    assert len(rows) == 2 and [r["epoch"] for r in rows] == [1, 2]
    assert all(set(r) == KEYS for r in rows)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["val_n"] == 3 and math.isfinite(r["train_loss"]) for r in rows)
    assert best["epoch"] in (1, 2) and best["srcc"] == rows[best["epoch"] - 1]["val_srcc"]
    for name in ("best.safetensors", "last.safetensors"):
        ckpt = load_checkpoint(out / name)
        assert ckpt.config == cfg.network() and ckpt.name == cfg.name
        assert ckpt.config.hidden_size == 32 and ckpt.config.longer_sides == (64,)
    assert (out / "plots.png").stat().st_size > 0
    assert (out / "state.pt").exists() and (out / "best_val_predictions.csv").exists()
    assert json.loads((out / "config.json").read_text())["csv"] == cfg.csv


def test_train_distribution_head(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_noise_set(folder, n=15)
    rng = np.random.default_rng(4)
    rows = ["image," + ",".join(f"dist_{k}" for k in range(1, 6))]
    rows += [f"{i}.jpg," + ",".join(str(int(v)) for v in rng.integers(0, 20, 5) + 1) for i in range(15)]
    (folder / "dist.csv").write_text("\n".join(rows) + "\n")
    model = TINY_MODEL + 'head = "distribution"\nnum_outputs = 5\n'
    cfg = TrainConfig.load(
        write_recipe(tmp_path / "r.toml", data='csv = "data/dist.csv"', train="epochs = 1", model=model)
    )
    train(cfg, progress=False)
    (row,) = metrics(Path(cfg.out))
    assert math.isfinite(row["train_loss"]) and 0 < row["train_loss"] < 1  # an EMD of CDFs is at most 1
    assert load_checkpoint(Path(cfg.out) / "last.safetensors").score_range == (1.0, 5.0)


@pytest.mark.parametrize("precision", ["", "bf16"])
def test_training_loss_decreases_on_a_learnable_target(tmp_path: Path, precision: str) -> None:
    # A score on a 0..5 scale: with an L1 loss, a few dozen steps at this lr move the head enough
    # (on a 0..100 scale the same run only shaves ~1 % off the loss). bf16 autocasts the compute;
    # the weights stay float32.
    write_brightness_set(tmp_path / "data", n=20)
    cfg = TrainConfig.load(
        write_recipe(
            tmp_path / "r.toml",
            data='csv = "data/labels.csv"',
            train=f'epochs = 6\nlr = 3e-3\nweight_decay = 0.0\nwarmup_fraction = 0.1\nprecision = "{precision}"',
        )
    )
    train(cfg, progress=False)
    losses = [r["train_loss"] for r in metrics(Path(cfg.out))]
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0], losses  # about 1.14 -> 0.70 with seed 0 in float32
    assert all(w.dtype == np.float32 for w in weights(Path(cfg.out) / "last.safetensors").values())


def test_unknown_precision_fails_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        noise_recipe(tmp_path, 'precision = "fp8"')


def weights(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], atol=1e-5, rtol=0, err_msg=key)


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    cfg = noise_recipe(tmp_path, "epochs = 1")
    train(cfg, progress=False)
    assert [r["epoch"] for r in metrics(Path(cfg.out))] == [1]
    cfg.epochs = 2
    train(cfg, resume=True, progress=False)
    rows = metrics(Path(cfg.out))
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [3, 6]
    # Already complete: resuming again runs nothing and adds no line.
    train(cfg, resume=True, progress=False)
    assert len(metrics(Path(cfg.out))) == 2


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = noise_recipe(tmp_path, "epochs = 2")
    straight.out = str(tmp_path / "straight")
    train(straight, progress=False)

    # Interrupted after the first epoch (same recipe, so the same schedule), then resumed.
    interrupted = noise_recipe(tmp_path, "epochs = 2")
    interrupted.out = str(tmp_path / "resumed")
    interrupted.max_steps = 3  # one epoch of 3 steps
    train(interrupted, progress=False)
    assert [r["epoch"] for r in metrics(Path(interrupted.out))] == [1]
    interrupted.max_steps = 0
    train(interrupted, resume=True, progress=False)

    rows, ref = metrics(Path(interrupted.out)), metrics(Path(straight.out))
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [3, 6]
    for mine, theirs in zip(rows, ref, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["lr"] == pytest.approx(theirs["lr"])
    assert_same_weights(Path(interrupted.out) / "last.safetensors", Path(straight.out) / "last.safetensors")

    # resume=False starts over, ignoring state.pt.
    restart = noise_recipe(tmp_path, "epochs = 1")
    restart.out = interrupted.out
    train(restart, resume=False, progress=False)
    assert [r["epoch"] for r in metrics(Path(restart.out))] == [1, 2, 1]


def test_synthetic_mode_one_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import model.distortions

    # Only the photos given here: BSDS500 (when on disk) would make a 300-item validation set.
    monkeypatch.setattr(model.distortions, "default_roots", lambda: [])
    photos = write_photos(tmp_path / "photos")
    cfg = TrainConfig.load(
        write_recipe(
            tmp_path / "r.toml",
            data='synthetic = true\nphotos = ["photos"]\nitems_per_epoch = 8',
            train="epochs = 1",
        )
    )
    assert cfg.photos == [str(photos.resolve())]
    train(cfg, progress=False)
    (row,) = metrics(Path(cfg.out))
    assert (
        set(row) == KEYS and row["step"] == 2 and row["val_n"] == 20
    )  # 20 distortions of the held-out photo
    assert math.isfinite(row["train_loss"])
    assert load_checkpoint(Path(cfg.out) / "last.safetensors").config.hidden_size == 32


def test_missing_data_source_is_a_value_error(tmp_path: Path) -> None:
    cfg = TrainConfig.load(write_recipe(tmp_path / "r.toml", data=""))
    with pytest.raises(ValueError, match="csv"):
        train(cfg, progress=False)


# --------------------------------------------------------------------------------------------
# `musiq train`
# --------------------------------------------------------------------------------------------


def test_cli_train_smoke_run(tmp_path: Path) -> None:
    write_noise_set(tmp_path / "data", n=15)
    recipe = write_recipe(tmp_path / "r.toml", data='csv = "data/labels.csv"', train="epochs = 3")
    out = tmp_path / "cli_out"
    result = musiq("train", "--config", recipe, "--out", out, "--max-steps", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["out"] == str(out) and set(final["best"]) >= {"srcc"}
    rows = metrics(out)
    assert len(rows) == 1 and rows[0]["step"] == 1  # --max-steps stops inside the first epoch
    assert (out / "last.safetensors").exists()
    assert "epoch 1/" not in result.stderr  # --no-progress: no bar


def test_cli_train_unknown_key_is_a_one_line_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.toml", data='csv = "data/labels.csv"', train="learning_rate = 1e-3")
    result = musiq("train", "--config", recipe, "--no-progress")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("musiq train: error:"), result.stderr
    assert "learning_rate" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_table_errors_fail_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[model]\npreset = "small"\nnot_a_setting = 3\n[data]\nsynthetic = true\n')
    with pytest.raises(ValueError, match="not_a_setting"):
        TrainConfig.load(cfg)
    cfg.write_text('[model]\npreset = "small"\nmax_native_tokens = 64\n[data]\nsynthetic = true\n')
    assert TrainConfig.load(cfg).network().max_native_tokens == 64


# --------------------------------------------------------------------------------------------
# Ranking on synthetic groups (issue 17)
# --------------------------------------------------------------------------------------------


def test_ranking_loss_counts_only_misordered_pairs_of_one_group() -> None:
    from model.train import ranking_loss

    levels = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    ordered = torch.tensor([90.0, 80.0, 70.0, 10.0, 0.0])  # 10 points a level: margin 4 met
    assert ranking_loss(ordered, levels, groups, margin=4.0).item() == 0.0
    # Group 1's pair swapped: one of the four pairs falls 4 + 10 = 14 points short.
    swapped = torch.tensor([90.0, 80.0, 70.0, 0.0, 10.0])
    assert ranking_loss(swapped, levels, groups, margin=4.0).item() == pytest.approx(14.0 / 4)
    # Across groups nothing is compared: group 1 scoring far above group 0 costs nothing.
    assert ranking_loss(ordered + torch.tensor([0, 0, 0, 500.0, 500.0]), levels, groups, 4.0).item() == 0.0
    # A margin that grows with the gap: 5 points between levels 0 and 2 falls 3 short of 2 x 4.
    near = torch.tensor([75.0, 72.0, 70.0, 10.0, 0.0])
    assert ranking_loss(near, levels, groups, margin=4.0).item() == pytest.approx((1 + 2 + 3) / 4)


def test_distortion_groups_are_one_photo_one_kind_graded(tmp_path: Path) -> None:
    from model.data import DistortionGroups, collate_groups
    from model.distortions import KINDS

    photo = tmp_path / "p.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(photo)
    packing = PackingConfig(32, 10, (64,), 16)
    only_jpeg = {k: float(k == "jpeg") for k in KINDS}
    data = DistortionGroups([photo], packing, length=5, group_size=3, kind_weights=only_jpeg)
    packed, levels, targets = data[2]
    assert len(packed) == 3 and np.all(np.diff(levels) >= 0) and levels.max() <= 5
    assert not np.array_equal(packed[0].patches, packed[-1].patches)  # graded, not copies
    np.testing.assert_allclose(targets[:, 0], 100 - 18 * levels, rtol=1e-6)
    again = data[2]
    assert all(np.array_equal(a.patches, b.patches) for a, b in zip(packed, again[0], strict=True))
    batch = collate_groups([data[0], data[1]])
    assert batch["group"].tolist() == [0, 0, 0, 1, 1, 1] and batch["target"].shape == (6, 1)
    with pytest.raises(ValueError, match="unknown distortion kinds"):
        DistortionGroups([photo], packing, length=1, kind_weights={"jpg": 1.0})
    with pytest.raises(ValueError, match="at least 2"):
        DistortionGroups([photo], packing, length=1, group_size=1)


def test_fractional_levels_interpolate_the_strength_table() -> None:
    from model.distortions import STRENGTHS, distort, distort_at, strength_at

    assert strength_at("jpeg", 0.5) == 70.0 and strength_at("jpeg", 2) == STRENGTHS["jpeg"][1]
    assert strength_at("gaussian_noise", 5) == STRENGTHS["gaussian_noise"][-1]
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(distort_at(image, "jpeg", 0.0, np.random.default_rng(0)), image)
    np.testing.assert_array_equal(
        distort_at(image, "gaussian_noise", 3, np.random.default_rng(4)),
        distort(image, "gaussian_noise", 3, np.random.default_rng(4)),
    )
    with pytest.raises(ValueError, match="level"):
        strength_at("jpeg", 5.5)


@pytest.mark.parametrize("mode", ["synthetic", "csv"])
def test_ranking_training_runs_and_logs_its_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    import model.distortions

    monkeypatch.setattr(model.distortions, "default_roots", lambda: [])
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    if mode == "synthetic":
        data = 'synthetic = true\nphotos = ["photos"]\nitems_per_epoch = 16'
    else:
        csv_path = write_noise_set(tmp_path / "data", n=10)
        data = f'csv = "{csv_path}"\nphotos = ["photos"]'
    cfg = TrainConfig.load(
        write_recipe(
            tmp_path / "r.toml",
            data=data + "\nrank_weight = 1.0\ngroup_size = 2\nrank_groups = 2",
            train="epochs = 1",
        )
    )
    train(cfg, progress=False)
    (row,) = metrics(Path(cfg.out))
    assert row["rank_loss"] is not None and math.isfinite(row["rank_loss"]) and row["rank_loss"] >= 0
    assert row["step"] == (4 if mode == "synthetic" else 2)  # 8 groups of 2 / 2 groups a step; 8 // 4


def test_a_misspelt_kind_weight_fails_at_load(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "r.toml", data="synthetic = true\nrank_weight = 1.0\nkind_weights = { jpg = 2.0 }"
    )
    with pytest.raises(ValueError, match="unknown distortion kinds in kind_weights: jpg"):
        TrainConfig.load(recipe)
