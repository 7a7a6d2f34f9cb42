"""The PyTorch network: parameter count, layout, masking/batching invariance, heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import expected_shapes
from model.config import OFFICIAL, OFFICIAL_PARAMETER_COUNT, SMALL, MusiqConfig, preset
from model.network import Musiq, count_parameters, head_score, same_padding
from model.packing import collate, pack

TINY = MusiqConfig(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=96)


def randomised(config: MusiqConfig, seed: int = 0) -> Musiq:
    """A network whose every parameter (head and CLS included) is random, so outputs differ by input."""
    torch.manual_seed(seed)
    model = Musiq(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "gn" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn_like(p) / max(fan_in, 1) ** 0.5)
        model.cls.normal_(0, 0.5)
        model.head.weight.normal_(0, 0.2)  # outputs of a few units, like a quality score
    return model.eval()


def tensors(batch) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]


def images(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_official_parameter_count() -> None:
    assert count_parameters(Musiq(OFFICIAL)) == OFFICIAL_PARAMETER_COUNT == 27_125_825


@pytest.mark.parametrize(
    "config",
    [
        OFFICIAL,
        SMALL,
        TINY.replace(patch_encoder="conv"),
        TINY.replace(patch_encoder="linear", patch_size=16),
        TINY.replace(head="distribution", num_outputs=10),
        TINY.replace(longer_sides=(), grid_size=7),
    ],
)
def test_expected_shapes_match_the_module(config: MusiqConfig) -> None:
    state = Musiq(config).state_dict()
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in state.items()}


def test_same_padding_matches_tensorflow() -> None:
    assert same_padding(32, 7, 2) == (2, 3)
    assert same_padding(16, 3, 2) == (0, 1)
    assert same_padding(8, 3, 1) == (1, 1)
    assert same_padding(8, 1, 1) == (0, 0)


@pytest.mark.parametrize("encoder", ["resnet", "conv", "linear"])
def test_batched_padded_forward_equals_single(encoder: str) -> None:
    model = randomised(TINY.replace(patch_encoder=encoder))
    packed = [pack(img, model.config.packing()) for img in images((40, 50), (300, 120), (64, 64), (17, 400))]
    with torch.inference_mode():
        single = torch.cat([model(*tensors(collate([p]))) for p in packed])
        batched = model(*tensors(collate(packed)))
        heavy = model(*tensors(collate(packed, pad_to=max(p.num_tokens for p in packed) + 700)))
    assert single.std() > 0.1  # the check below is meaningful: outputs differ by image
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(heavy, single, atol=1e-5, rtol=0)


def test_padding_content_is_ignored() -> None:
    model = randomised(TINY)
    batch = collate([pack(images((100, 80))[0])], pad_to=400)
    n = int(batch.mask.sum()) + 49 + 144 - int(batch.mask[0, :193].sum())  # first padding row index
    garbage = tensors(batch)
    rng = np.random.default_rng(2)
    pad = ~batch.mask[0]
    garbage[0][0, torch.from_numpy(pad)] = torch.from_numpy(
        rng.uniform(-1, 1, (int(pad.sum()), 3072)).astype(np.float32)
    )
    garbage[1][0, torch.from_numpy(pad)] = torch.from_numpy(
        rng.integers(0, 100, int(pad.sum())).astype(np.int32)
    )
    assert n > 0
    with torch.inference_mode():
        torch.testing.assert_close(model(*garbage), model(*tensors(batch)), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_official_size_batched_equals_single() -> None:
    model = randomised(OFFICIAL, seed=3)
    packed = [pack(img) for img in images((384, 512), (100, 700), (32, 32))]
    with torch.inference_mode():
        single = torch.cat([model(*tensors(collate([p]))) for p in packed])
        batched = model(*tensors(collate(packed)))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_distribution_head_score_is_expectation() -> None:
    logits = torch.tensor([[0.0] * 10, [0.0] * 9 + [50.0]])
    np.testing.assert_allclose(head_score(logits, "distribution").numpy(), [5.5, 10.0], rtol=1e-6)
    assert head_score(torch.tensor([[3.25]]), "score").item() == 3.25
    with pytest.raises(ValueError, match="no quality score"):
        head_score(logits, "classes")


def test_gelu_flavour_changes_output() -> None:
    tanh = randomised(TINY)
    erf = Musiq(TINY.replace(gelu="erf"))
    erf.load_state_dict(tanh.state_dict())
    batch = tensors(collate([pack(images((96, 96))[0], TINY.packing())]))
    with torch.inference_mode():
        assert (tanh(*batch) - erf.eval()(*batch)).abs().max() > 1e-5


def test_token_count_is_not_baked_in() -> None:
    model = randomised(TINY)
    for n in (1, 7, 513):
        batch = collate([pack(images((32, 32))[0], TINY.packing(max_native_tokens=0))], pad_to=max(n, 193))
        with torch.inference_mode():
            assert model(*tensors(batch)).shape == (1, 1)


def test_config_validation_and_presets() -> None:
    assert preset("official") == OFFICIAL and preset("small", num_layers=2).num_layers == 2
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        MusiqConfig(hidden_size=100, num_heads=6)
    with pytest.raises(ValueError, match="exactly one output"):
        MusiqConfig(num_outputs=10)
    assert MusiqConfig.from_dict(OFFICIAL.to_dict()) == OFFICIAL
