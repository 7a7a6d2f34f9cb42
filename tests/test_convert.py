"""Converters and the checkpoint format, checked against the independent numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.config import MusiqConfig
from model.convert import ConversionError, Overrides, convert_file, convert_official, convert_pyiqa
from model.network import build_model, to_checkpoint
from model.packing import collate, pack, split_official_rows
from tests.reference.official_numpy import (
    make_official_params,
    official_forward,
    official_npz_entries,
    official_score,
    random_official_rows,
    save_official_npz,
    to_pyiqa_state_dict,
)

SMALL = dict(hidden=64, layers=2, heads=4, mlp=96)


def run(model: torch.nn.Module, rows: np.ndarray) -> np.ndarray:
    batch = split_official_rows(rows)
    inputs = [torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]
    with torch.inference_mode():
        out = model(*inputs)
        return out.numpy(), model.score(out).numpy() if model.config.head != "classes" else None


def real_rows(*shapes: tuple[int, int]) -> np.ndarray:
    """Official rows of real packed images (random pixels), padded into one batch."""
    rng = np.random.default_rng(7)
    packed = [pack(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    batch = collate(packed)
    return np.concatenate(
        [batch.patches, batch.spatial[..., None], batch.scale[..., None], batch.mask[..., None]], axis=-1
    ).astype(np.float32)


@pytest.mark.parametrize("num_classes", [1, 10])
@pytest.mark.parametrize("encoder", ["resnet", "conv", "linear"])
def test_official_npz_converts_to_the_official_math(tmp_path: Path, encoder: str, num_classes: int) -> None:
    params = make_official_params(1, **SMALL, num_classes=num_classes, encoder=encoder)
    src = save_official_npz(params, tmp_path / "koniq_ckpt.npz")
    checkpoint, report = convert_file("official", src)
    cfg = checkpoint.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (64, 2, 4, 96)
    assert (cfg.patch_encoder, cfg.num_outputs, cfg.patch_size, cfg.grid_size) == (
        encoder,
        num_classes,
        32,
        10,
    )
    assert cfg.head == ("score" if num_classes == 1 else "distribution")
    assert "opt/state/step" in report.ignored
    model = build_model(load_checkpoint(save_checkpoint(checkpoint, tmp_path / "out.safetensors")))
    rows = random_official_rows(2, batch=3, tokens=30, pad=9)
    rows[1, 20:, -1] = 0  # uneven padding inside the batch
    rows[1, 20:, :-3] = 0
    logits, score = run(model, rows)
    ref = official_forward(params, rows, num_heads=4, encoder=encoder)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score, official_score(ref), atol=1e-5, rtol=0)
    assert np.ptp(official_score(ref)) > 1e-2  # the images do score differently


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [1, 10])
def test_official_size_checkpoint_on_real_packing(tmp_path: Path, num_classes: int) -> None:
    params = make_official_params(4, num_classes=num_classes)
    src = save_official_npz(params, tmp_path / "ava_ckpt.npz", attention_name="SelfAttention_1")
    checkpoint, _ = convert_file("official", src)
    assert checkpoint.config.replace() == MusiqConfig(
        head="score" if num_classes == 1 else "distribution", num_outputs=num_classes
    )
    model = build_model(checkpoint)
    rows = real_rows((120, 90), (64, 300))  # 2 images, real multi-scale packing, padded batch
    logits, score = run(model, rows)
    ref = official_forward(params, rows, num_heads=6)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score, official_score(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_classes", [1, 10])
def test_pyiqa_state_dict_converts_to_the_official_math(tmp_path: Path, num_classes: int) -> None:
    params = make_official_params(5, **SMALL, num_classes=num_classes)
    path = tmp_path / "musiq_spaq_ckpt-358bb6af.pth"
    torch.save({"params": to_pyiqa_state_dict(params)}, path)
    checkpoint, report = convert_file("pyiqa", path, Overrides(num_heads=4))
    assert checkpoint.name == "spaq" and len(report.mapped) == len(checkpoint.tensors)
    model = build_model(checkpoint)
    rows = random_official_rows(3, batch=2, tokens=25, pad=5)
    logits, score = run(model, rows)
    ref = official_forward(params, rows, num_heads=4)
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score, official_score(ref), atol=1e-5, rtol=0)


def test_pyiqa_and_official_conversions_agree() -> None:
    params = make_official_params(6, **SMALL)
    _, from_npz, _ = convert_official(official_npz_entries(params))
    state = {k: v.numpy() for k, v in to_pyiqa_state_dict(params).items()}
    _, from_pth, _ = convert_pyiqa({f"module.{k}": v for k, v in state.items()}, Overrides(num_heads=4))
    assert from_npz.keys() == from_pth.keys()
    for k in from_npz:
        np.testing.assert_array_equal(from_npz[k], from_pth[k], err_msg=k)


def test_structure_matching_tolerates_other_names() -> None:
    params = make_official_params(8, **SMALL)
    entries = official_npz_entries(params, prefix="checkpoint/params/", attention_name="SelfAttention_1")
    # LayerNorm / MLP modules renamed too: found by what they contain, ordered by suffix
    entries = {
        k.replace("LayerNorm_0", "LN_0").replace("MlpBlock_3", "FeedForward_3"): v for k, v in entries.items()
    }
    config, weights, _ = convert_official(entries)
    assert config.num_heads == 4 and len(weights) == len(convert_official(official_npz_entries(params))[1])


def test_missing_and_unmapped_tensors_are_all_reported() -> None:
    params = make_official_params(9, **SMALL)
    entries = official_npz_entries(params)
    del entries["opt/target/Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    del entries["opt/target/block1/unit1/gn2/scale"]
    entries["opt/target/pre_logits/kernel"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_official(entries)
    text = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in text and "Dense_1/bias" in text
    assert "patch_encoder.block.gn2.weight" in text
    assert "unmapped source tensor pre_logits/kernel" in text
    assert len(err.value.problems) >= 3


def test_shape_mismatch_is_reported() -> None:
    params = make_official_params(10, **SMALL)
    params["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"] = np.zeros((95, 64), np.float32)
    with pytest.raises(ConversionError, match=r"blocks\.0\.mlp\.fc2\.weight.*shape"):
        convert_official(official_npz_entries(params))


def test_not_a_musiq_file(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not a MUSIQ"):
        convert_official({"foo/bar": np.zeros(3)})
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConversionError, match="npz"):
        convert_file("official", bad)
    with pytest.raises(ConversionError, match="no such file"):
        convert_file("official", tmp_path / "missing.npz")


def test_checkpoint_round_trip_keeps_card_and_weights(tmp_path: Path) -> None:
    model = build_model(
        Checkpoint(
            MusiqConfig(
                hidden_size=32, num_layers=1, num_heads=2, mlp_dim=48, head="distribution", num_outputs=10
            ),
            convert_official(
                official_npz_entries(
                    make_official_params(11, hidden=32, layers=1, heads=2, mlp=48, num_classes=10)
                )
            )[1],
        )
    )
    ck = to_checkpoint(model, name="ava", version="3", source="test")
    path = save_checkpoint(ck, tmp_path / "m.safetensors")
    back = load_checkpoint(path)
    assert (back.name, back.version, back.source, back.score_range) == ("ava", "3", "test", (1.0, 10.0))
    assert back.config == model.config and back.packing == model.config.packing()
    for k, v in ck.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)


def test_bad_checkpoint_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(junk)
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, foreign)
    with pytest.raises(CheckpointError, match="musiq convert"):
        load_checkpoint(foreign)
    cfg = MusiqConfig(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=48)
    with pytest.raises(CheckpointError, match=r"missing head\.weight"):
        save_checkpoint(Checkpoint(cfg, {}), tmp_path / "empty.safetensors")
