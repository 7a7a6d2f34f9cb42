"""The PyTorch network: parameter count, layout, masking/batching invariance, heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import expected_shapes
from model.config import OFFICIAL, OFFICIAL_PARAMETER_COUNT, SMALL, MusiqConfig, preset
from model.network import Musiq, count_parameters, head_score, same_padding
from model.packing import collate, pack, split_official_rows
from tests.reference.official_numpy import official_forward, random_official_rows

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
    """Garbage in the padding rows (patches, positions, scales) leaves the output unchanged.

    The garbage goes into copies: `torch.from_numpy` shares memory, so writing through `tensors(batch)`
    would change the "clean" batch too and the comparison could never fail.
    """
    model = randomised(TINY)
    batch = collate([pack(images((100, 80))[0])], pad_to=400)
    pad = ~batch.mask[0]
    assert pad.sum() > 100  # a lot of padding to fill
    clean = tensors(batch)
    garbage = [t.clone() for t in clean]
    rng = np.random.default_rng(2)
    rows = torch.from_numpy(pad)
    garbage[0][0, rows] = torch.from_numpy(rng.uniform(-1, 1, (int(pad.sum()), 3072)).astype(np.float32))
    garbage[1][0, rows] = torch.from_numpy(rng.integers(0, 100, int(pad.sum())).astype(np.int32))
    garbage[2][0, rows] = torch.from_numpy(rng.integers(0, 3, int(pad.sum())).astype(np.int32))
    assert (garbage[0] != clean[0]).any() and not (clean[0][0, rows] != 0).any()  # the clean rows stay zero
    with torch.inference_mode():
        torch.testing.assert_close(model(*garbage), model(*clean), atol=1e-5, rtol=0)


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


def official_params(model: Musiq) -> dict[str, np.ndarray]:
    """A linear-encoder network's weights in the official Flax names and layouts (float64), written
    here from the reference's layout rather than taken from `model.convert`, to stay independent."""
    c = model.config
    assert c.patch_encoder == "linear"
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    d, h, t = c.hidden_size, c.num_heads, "Transformer"
    p = {
        "embedding/kernel": sd["patch_encoder.embedding.weight"].T,
        "embedding/bias": sd["patch_encoder.embedding.bias"],
        f"{t}/posembed_input/pos_embedding": sd["pos_embedding"][None],
        f"{t}/scaleembed_input/scale_embedding": sd["scale_embedding"][None],
        f"{t}/cls": sd["cls"],
        f"{t}/encoder_norm/scale": sd["encoder_norm.weight"],
        f"{t}/encoder_norm/bias": sd["encoder_norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(c.num_layers):
        b, o = f"{t}/encoderblock_{i}", f"blocks.{i}"
        a = f"{b}/MultiHeadDotProductAttention_1"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            p[f"{b}/{ln}/scale"], p[f"{b}/{ln}/bias"] = sd[f"{o}.{norm}.weight"], sd[f"{o}.{norm}.bias"]
        for proj in ("query", "key", "value"):
            p[f"{a}/{proj}/kernel"] = sd[f"{o}.attention.{proj}.weight"].T.reshape(d, h, d // h)
            p[f"{a}/{proj}/bias"] = sd[f"{o}.attention.{proj}.bias"].reshape(h, d // h)
        p[f"{a}/out/kernel"] = sd[f"{o}.attention.out.weight"].T.reshape(h, d // h, d)
        p[f"{a}/out/bias"] = sd[f"{o}.attention.out.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            p[f"{b}/MlpBlock_3/{dense}/kernel"] = sd[f"{o}.mlp.{fc}.weight"].T
            p[f"{b}/MlpBlock_3/{dense}/bias"] = sd[f"{o}.mlp.{fc}.bias"]
    return p


# float32 against the float64 reference: about 1e-6 here; the two GELU flavours: about 5e-3.
GELU_ATOL = 5e-5


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_network_computes_the_reference_with_its_gelu_flavour(gelu: str) -> None:
    """The whole network against the independent numpy reference, tight enough to tell the GELU
    flavours apart (tanh is the official one and the default; erf exists for ports that use it).

    Random weights (`randomised`) and a head of 10x its usual gain give scores from about 10 to 25
    that differ by 5e-3 between the flavours, against 1e-5 of float32 rounding. The runtime tests'
    trained checkpoint scores every image about 22.4 and moves by less than their atol of 1e-4.
    """
    config = TINY.replace(patch_encoder="linear", gelu=gelu)
    assert MusiqConfig().gelu == "tanh"  # the official flavour is the default
    model = randomised(config, seed=5)
    with torch.no_grad():
        model.head.weight.mul_(10)
    params = official_params(model)
    rows = random_official_rows(3, batch=4, tokens=40, pad=8)
    rows[1, 25:] = 0  # uneven padding inside the batch
    with torch.inference_mode():
        got = model(*tensors(split_official_rows(rows))).numpy()
    want = {
        g: official_forward(params, rows, num_heads=TINY.num_heads, encoder="linear", gelu=g)
        for g in ("tanh", "erf")
    }
    other = "erf" if gelu == "tanh" else "tanh"
    assert np.ptp(want[gelu]) > 5  # varied scores
    assert np.abs(want[gelu] - want[other]).max() > 20 * GELU_ATOL  # the tolerance separates the flavours
    np.testing.assert_allclose(got, want[gelu], atol=GELU_ATOL, rtol=0)


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
