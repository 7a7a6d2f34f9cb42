"""Fine-tuning with a frozen patch encoder (tools/frozen_finetune.py): the encoder's weights stay
those of the start, the transformer's move, and the cached tokens give the scores the whole
network gives on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import preset
from model.data import read_labels
from model.decode import decode_image
from model.network import Musiq, build_model, to_checkpoint
from model.packing import collate, pack
from tests.test_train import write_noise_set, write_photos
from tools import frozen_finetune

TINY = preset("small", hidden_size=32, num_layers=1, num_heads=2, mlp_dim=48, longer_sides=(64,))


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    labels = write_noise_set(tmp_path / "data", n=12)
    rows = labels.read_text().splitlines()
    split = [rows[0] + ",split"] + [f"{r},{'val' if i < 3 else 'train'}" for i, r in enumerate(rows[1:])]
    labels.write_text("\n".join(split) + "\n")
    torch.manual_seed(0)
    model = Musiq(TINY)
    torch.nn.init.constant_(model.head.bias, 50.0)
    init = save_checkpoint(to_checkpoint(model, name="tiny"), tmp_path / "init.safetensors")
    return labels, init


def test_encoder_stays_transformer_moves_scores_match(tmp_path: Path) -> None:
    labels, init = _setup(tmp_path)
    store = tmp_path / "cache.pt"
    frozen_finetune.main(
        [
            "cache",
            "--init",
            str(init),
            "--split",
            str(labels),
            "--out",
            str(store),
            "--max-native-tokens",
            "16",
        ]
    )
    items = torch.load(store, weights_only=False)["items"]
    assert [len(i["versions"]) for i in items] == [1 if i["split"] == "val" else 2 for i in items]

    out = tmp_path / "run"
    frozen_finetune.main(
        [
            "train",
            "--cache",
            str(store),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--dev",
            "2",
            "--lr",
            "1e-2",
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all("dev_srcc" in r and "val_srcc" in r for r in rows)

    start, tuned = load_checkpoint(init).tensors, load_checkpoint(out / "last.safetensors").tensors
    encoder = [k for k in start if k.startswith("patch_encoder.")]
    assert encoder and all(np.array_equal(start[k], tuned[k]) for k in encoder)
    moved = [k for k in start if k not in encoder and not np.array_equal(start[k], tuned[k])]
    assert any(k.startswith("blocks.") for k in moved) and "head.weight" in moved

    # The cache was made with the start's encoder, which the tuned checkpoint still holds: its
    # scores from cached tokens equal the whole network's on the decoded images.
    model = build_model(load_checkpoint(out / "last.safetensors"))
    val = [s for s in read_labels(labels) if s.split == "val"]
    packing = model.config.replace(max_native_tokens=16).packing()
    batch = collate([pack(decode_image(s.path), packing) for s in val])
    with torch.no_grad():
        whole = model.score(
            model(*(torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)))
        )
    cached = frozen_finetune._predict(model, [i["versions"][0] for i in items if i["split"] == "val"])
    np.testing.assert_allclose(cached, whole.numpy(), atol=1e-4)


def test_ranking_groups_mix_in_and_must_come_from_the_same_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.distortions

    photos = write_photos(tmp_path / "photos")
    monkeypatch.setattr(model.distortions, "default_roots", lambda: [photos])
    labels, init = _setup(tmp_path)
    store, groups = tmp_path / "cache.pt", tmp_path / "groups.pt"
    common = ["--init", str(init), "--max-native-tokens", "16"]
    frozen_finetune.main(["cache", *common, "--split", str(labels), "--out", str(store)])
    frozen_finetune.main(["cache-groups", *common, "--count", "3", "--out", str(groups)])
    ranked = torch.load(groups, weights_only=False)["groups"]
    assert [len(g["versions"]) for g in ranked] == [4, 4, 4]
    assert all(bool((g["levels"][1:] >= g["levels"][:-1]).all()) for g in ranked)

    out = tmp_path / "run"
    train = ["train", "--cache", str(store), "--out", str(out), "--epochs", "1", "--batch-size", "4"]
    frozen_finetune.main([*train, "--dev", "2", "--groups", str(groups), "--rank-groups", "2"])
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["rank_loss"] >= 0.0

    other = save_checkpoint(load_checkpoint(init), tmp_path / "other.safetensors")
    frozen_finetune.main(
        [
            "cache-groups",
            "--init",
            str(other),
            "--max-native-tokens",
            "16",
            "--count",
            "1",
            "--out",
            str(groups),
        ]
    )
    with pytest.raises(SystemExit, match="was encoded by"):
        frozen_finetune.main([*train, "--groups", str(groups), "--rank-groups", "2"])
