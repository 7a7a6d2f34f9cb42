"""Checks of the numpy reference (tests/reference/official_numpy.py) against independent facts.

The reference is the ground truth for the port and the converters, so it is checked here against
(a) a second, deliberately different implementation written with torch.nn.functional on the
PyTorch-port (pyiqa) weight layout, (b) the masking invariant, (c) the parameter count implied by the
official shapes, and (d) its sensitivity to the deviations it must expose (GELU flavour, ddof).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.reference.official_numpy import (
    ENCODERS,
    make_official_params,
    official_forward,
    official_npz_entries,
    official_param_shapes,
    official_score,
    random_official_rows,
    save_official_npz,
    to_pyiqa_state_dict,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

SMALL = {"hidden": 64, "layers": 2, "heads": 4, "mlp": 96}


# --------------------------------------------------------------------------------------------------
# A tiny independent torch implementation on the pyiqa state-dict layout (NCHW, OIHW, Linear weights)
# --------------------------------------------------------------------------------------------------


def _pad_same(x: torch.Tensor, k: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Explicit TF "SAME" padding for NCHW (extra pixel after)."""
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad wants (left, right, top, bottom)
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _std_conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, ddof: int = 0) -> torch.Tensor:
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    w = w / (torch.std(w, dim=(1, 2, 3), correction=ddof, keepdim=True) + 1e-5)
    return F.conv2d(_pad_same(x, w.shape[-1], stride), w, stride=stride)


def torch_forward(
    sd: dict[str, torch.Tensor],
    rows: np.ndarray,
    *,
    num_heads: int,
    encoder: str,
    gelu: str = "tanh",
    ddof: int = 0,
) -> np.ndarray:
    """MUSIQ forward with torch ops on pyiqa-layout weights; float32 throughout."""
    x = torch.from_numpy(np.asarray(rows, dtype=np.float32))
    b, n, width = x.shape
    spatial, scale, mask = x[..., -3].long(), x[..., -2].long(), x[..., -1] != 0
    patches = x[..., :-3].reshape(b * n, width - 3)
    if encoder == "linear":
        tokens = patches
    else:
        p = math.isqrt((width - 3) // 3)
        h = patches.reshape(b * n, p, p, 3).permute(0, 3, 1, 2)  # rows are (row, col, channel)
        h = _std_conv(h, sd["conv_root.weight"], 2, ddof)
        h = F.relu(F.group_norm(h, 32, sd["gn_root.weight"], sd["gn_root.bias"], eps=1e-6))
        h = F.max_pool2d(_pad_same(h, 3, 2, value=-math.inf), 3, 2)
        if encoder == "resnet":

            def gn(t: torch.Tensor, name: str) -> torch.Tensor:
                return F.group_norm(t, 32, sd[f"block1.{name}.weight"], sd[f"block1.{name}.bias"], eps=1e-4)

            res = gn(_std_conv(h, sd["block1.conv_proj.weight"], 1, ddof), "gn_proj")
            y = F.relu(gn(_std_conv(h, sd["block1.conv1.weight"], 1, ddof), "gn1"))
            y = F.relu(gn(_std_conv(y, sd["block1.conv2.weight"], 1, ddof), "gn2"))
            y = gn(_std_conv(y, sd["block1.conv3.weight"], 1, ddof), "gn3")
            h = F.relu(res + y)
        tokens = h.permute(0, 2, 3, 1).reshape(b * n, -1)
    e = F.linear(tokens, sd["embedding.weight"], sd["embedding.bias"]).reshape(b, n, -1)
    te = "transformer_encoder"
    e = (
        e
        + sd[f"{te}.posembed_input.position_emb"][0][spatial]
        + sd[f"{te}.scaleembed_input.scale_emb"][scale]
    )
    d = e.shape[-1]
    h = torch.cat([sd[f"{te}.cls"].expand(b, 1, d), e], dim=1)
    mask = torch.cat([torch.ones(b, 1, dtype=torch.bool), mask], dim=1)
    bias = torch.where(mask[:, None, :, None] & mask[:, None, None, :], 0.0, -1e10)
    dh = d // num_heads
    i = 0
    while f"{te}.transformer.encoderblock_{i}.norm1.weight" in sd:
        k = f"{te}.transformer.encoderblock_{i}"

        def lin(t: torch.Tensor, name: str, k: str = k) -> torch.Tensor:
            return F.linear(t, sd[f"{k}.{name}.weight"], sd[f"{k}.{name}.bias"])

        y = F.layer_norm(h, (d,), sd[f"{k}.norm1.weight"], sd[f"{k}.norm1.bias"], eps=1e-6)
        q, kk, v = (
            lin(y, f"attention.{m}").reshape(b, -1, num_heads, dh).transpose(1, 2)
            for m in ("query", "key", "value")
        )
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(dh) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, -1, d)
        h = h + lin(y, "attention.out")
        y = F.layer_norm(h, (d,), sd[f"{k}.norm2.weight"], sd[f"{k}.norm2.bias"], eps=1e-6)
        y = F.gelu(lin(y, "mlp.fc1"), approximate="tanh" if gelu == "tanh" else "none")
        h = h + lin(y, "mlp.fc2")
        i += 1
    h = F.layer_norm(h, (d,), sd[f"{te}.encoder_norm.weight"], sd[f"{te}.encoder_norm.bias"], eps=1e-6)
    head = "head" if "head.weight" in sd else "head.0"
    return F.linear(h[:, 0], sd[f"{head}.weight"], sd[f"{head}.bias"]).double().numpy()


# --------------------------------------------------------------------------------------------------
# (a) agreement with the independent torch implementation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 10])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_matches_independent_torch_implementation(encoder: str, num_classes: int) -> None:
    params = make_official_params(11, encoder=encoder, num_classes=num_classes, **SMALL)
    rows = random_official_rows(12, batch=3, tokens=14, pad=3)
    ref = official_forward(params, rows, num_heads=SMALL["heads"], encoder=encoder)
    got = torch_forward(to_pyiqa_state_dict(params), rows, num_heads=SMALL["heads"], encoder=encoder)
    assert ref.shape == (3, num_classes)
    assert ref.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    # The inputs must actually be told apart, or agreement would prove little.
    assert np.ptp(ref[:, 0]) > 0.1


def test_matches_independent_torch_implementation_official_size() -> None:
    params = make_official_params(3)
    rows = random_official_rows(4, batch=2, tokens=60, pad=8)
    ref = official_forward(params, rows, num_heads=6)
    got = torch_forward(to_pyiqa_state_dict(params), rows, num_heads=6, encoder="resnet")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    assert abs(ref[0, 0] - ref[1, 0]) > 0.1


def test_pyiqa_state_dict_layout() -> None:
    """Key set and shapes of pyiqa's MUSIQ.state_dict() (official size, 1- and 10-output heads)."""
    sd = to_pyiqa_state_dict(make_official_params(0, layers=2))
    assert tuple(sd["conv_root.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["block1.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["block1.conv_proj.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["block1.gn3.weight"].shape) == (256,)
    assert tuple(sd["embedding.weight"].shape) == (384, 16384)
    assert tuple(sd["transformer_encoder.posembed_input.position_emb"].shape) == (1, 100, 384)
    assert tuple(sd["transformer_encoder.scaleembed_input.scale_emb"].shape) == (3, 384)
    assert tuple(sd["transformer_encoder.cls"].shape) == (1, 1, 384)
    blk = "transformer_encoder.transformer.encoderblock_1"
    assert tuple(sd[f"{blk}.attention.query.weight"].shape) == (384, 384)
    assert tuple(sd[f"{blk}.attention.out.bias"].shape) == (384,)
    assert tuple(sd[f"{blk}.mlp.fc1.weight"].shape) == (1152, 384)
    assert tuple(sd[f"{blk}.mlp.fc2.weight"].shape) == (384, 1152)
    assert tuple(sd["head.weight"].shape) == (1, 384)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())
    sd10 = to_pyiqa_state_dict(make_official_params(0, layers=1, num_classes=10))
    assert tuple(sd10["head.0.weight"].shape) == (10, 384) and "head.weight" not in sd10
    # 3 root + 12 block1 + 2 embedding + 3 pos/scale/cls + 16 per block + 2 encoder_norm + 2 head
    assert len(sd) == 3 + 12 + 2 + 3 + 16 * 2 + 2 + 2


# --------------------------------------------------------------------------------------------------
# (b) masking
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padded_rows_do_not_change_logits(encoder: str) -> None:
    params = make_official_params(21, encoder=encoder, num_classes=10, **SMALL)
    rows = random_official_rows(22, batch=2, tokens=10)
    base = official_forward(params, rows, num_heads=SMALL["heads"], encoder=encoder)

    # Trailing all-zero rows, as the packing writes them.
    padded = np.concatenate([rows, np.zeros((2, 5, rows.shape[2]), np.float32)], axis=1)
    np.testing.assert_allclose(
        official_forward(params, padded, num_heads=SMALL["heads"], encoder=encoder), base, rtol=0, atol=1e-9
    )

    # Padding between the valid rows (the packing pads each resized scale in place), and padding
    # rows carrying garbage patch/index values: only the mask column may matter.
    rng = np.random.default_rng(23)
    junk = random_official_rows(24, batch=2, tokens=4)
    junk[:, :, -1] = 0.0
    mixed = np.concatenate([rows[:, :3], junk, rows[:, 3:], np.zeros_like(junk)], axis=1)
    perm = np.concatenate([rng.permutation(3), 3 + np.arange(4), 7 + rng.permutation(7), 14 + np.arange(4)])
    mixed = mixed[:, perm]
    # Reordering valid tokens is harmless too: attention is permutation-equivariant, CLS is first.
    np.testing.assert_allclose(
        official_forward(params, mixed, num_heads=SMALL["heads"], encoder=encoder), base, rtol=0, atol=1e-9
    )


def test_masked_tokens_really_are_ignored_and_valid_ones_are_not() -> None:
    params = make_official_params(31, **SMALL)
    rows = random_official_rows(32, batch=1, tokens=8)
    base = official_forward(params, rows, num_heads=SMALL["heads"])
    changed = rows.copy()
    changed[0, 2, :-3] *= -1.0
    assert abs(official_forward(params, changed, num_heads=SMALL["heads"])[0, 0] - base[0, 0]) > 1e-3
    changed[0, 2, -1] = 0.0  # now the changed token is masked: it must drop out entirely
    dropped = np.delete(rows, 2, axis=1)
    np.testing.assert_allclose(
        official_forward(params, changed, num_heads=SMALL["heads"]),
        official_forward(params, dropped, num_heads=SMALL["heads"]),
        rtol=0,
        atol=1e-9,
    )


# --------------------------------------------------------------------------------------------------
# (c) parameter names, shapes, count
# --------------------------------------------------------------------------------------------------

# Closed-form count of the official model from the shapes in MUSIQ_SPEC section 2/3:
#   ResNet root + bottleneck: 7*7*3*64 + 2*64 + 64*64 + 3*3*64*64 + 2*(64*256) + 2*64 + 2*64 + 2*256 + 2*256
#   embedding 16384*384 + 384; pos 100*384; scale 3*384; cls 384
#   14 blocks x (2 LayerNorms 4*384, q/k/v/out 4*(384*384 + 384), MLP 2*384*1152 + 1152 + 384)
#   encoder_norm 2*384; head 384 + 1
# = 84,544 + 6,291,840 + 39,936 + 14 * 1,479,168 + 768 + 385 = 27,125,825.
# (The pyiqa port, which has the same tensors, gives the same total.)
OFFICIAL_PARAMETER_COUNT = 27_125_825


def test_official_parameter_count() -> None:
    params = make_official_params(0)
    resnet = 7 * 7 * 3 * 64 + 2 * 64 + 64 * 64 + 9 * 64 * 64 + 2 * 64 * 256 + 4 * 64 + 4 * 256
    block = 4 * 384 + 4 * (384 * 384 + 384) + 2 * 384 * 1152 + 1152 + 384
    embeddings = (16384 * 384 + 384) + 100 * 384 + 3 * 384 + 384  # embedding, pos, scale, cls
    closed_form = resnet + embeddings + 14 * block + 2 * 384 + 385
    assert closed_form == OFFICIAL_PARAMETER_COUNT
    assert sum(v.size for v in params.values()) == OFFICIAL_PARAMETER_COUNT
    # 3 root + 12 block1 + 2 embedding + 3 pos/scale/cls + 16 per block + 2 encoder_norm + 2 head
    assert len(params) == 3 + 12 + 2 + 3 + 14 * 16 + 2 + 2


def test_official_names_shapes_and_layout() -> None:
    params = make_official_params(0, layers=2)
    assert params["conv_root/kernel"].shape == (7, 7, 3, 64)
    assert params["gn_root/scale"].shape == (1, 1, 1, 64)
    assert params["block1/unit1/conv2/kernel"].shape == (3, 3, 64, 64)
    assert params["block1/unit1/conv3/kernel"].shape == (1, 1, 64, 256)
    assert params["block1/unit1/gn_proj/bias"].shape == (1, 1, 1, 256)
    assert params["embedding/kernel"].shape == (16384, 384)
    assert params["Transformer/scaleembed_input/scale_embedding"].shape == (1, 3, 384)
    att = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    assert params[f"{att}/key/kernel"].shape == (384, 6, 64)
    assert params[f"{att}/value/bias"].shape == (6, 64)
    assert params[f"{att}/out/kernel"].shape == (6, 64, 384)
    assert params["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"].shape == (1152, 384)
    assert params["head/kernel"].shape == (384, 1)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in params.values())
    assert set(params) == set(official_param_shapes(layers=2))
    # Deterministic in the seed, different across seeds.
    again = make_official_params(0, layers=2)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["Transformer/cls"], make_official_params(1, layers=2)["Transformer/cls"])
    # Subsets for the ablation encoders.
    conv = make_official_params(0, layers=1, encoder="conv")
    assert conv["embedding/kernel"].shape == (4096, 384) and not any(k.startswith("block1") for k in conv)
    linear = make_official_params(0, layers=1, encoder="linear")
    assert linear["embedding/kernel"].shape == (3072, 384) and "conv_root/kernel" not in linear


def test_save_official_npz(tmp_path) -> None:
    params = make_official_params(5, **SMALL)
    path = save_official_npz(params, tmp_path / "ckpt.npz")
    with np.load(path) as f:
        assert f[
            "opt/target/Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
        ].shape == (
            64,
            4,
            16,
        )
        assert "opt/state/step" in f.files
        target = {k.removeprefix("opt/target/"): f[k] for k in f.files if k.startswith("opt/target/")}
        assert target.keys() == params.keys()
        assert all(np.array_equal(target[k], params[k]) and target[k].dtype == np.float32 for k in params)
    renamed = official_npz_entries(params, prefix="", attention_name="SelfAttention_1")
    assert "Transformer/encoderblock_1/SelfAttention_1/out/kernel" in renamed
    assert not any("MultiHeadDotProductAttention_1" in k for k in renamed)


def test_official_score() -> None:
    np.testing.assert_allclose(official_score(np.array([[3.5], [-1.0]])), [3.5, -1.0])
    uniform = official_score(np.zeros((1, 10)))
    np.testing.assert_allclose(uniform, [5.5])
    peaked = np.full((1, 10), -50.0)
    peaked[0, 6] = 50.0
    np.testing.assert_allclose(official_score(peaked), [7.0])


# --------------------------------------------------------------------------------------------------
# (d) the deviations the reference must be able to expose
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1, 10])
def test_gelu_flavour_is_detectable(num_classes: int) -> None:
    params = make_official_params(41, num_classes=num_classes, **SMALL)
    rows = random_official_rows(42, batch=2, tokens=12)
    tanh = official_forward(params, rows, num_heads=SMALL["heads"])
    erf = official_forward(params, rows, num_heads=SMALL["heads"], gelu="erf")
    assert np.abs(tanh - erf).max() > 1e-4
    # ... and the independent implementation agrees with the reference on both flavours.
    sd = to_pyiqa_state_dict(params)
    np.testing.assert_allclose(
        torch_forward(sd, rows, num_heads=SMALL["heads"], encoder="resnet", gelu="erf"),
        erf,
        rtol=0,
        atol=1e-4,
    )


def test_weight_standardisation_ddof_is_nearly_invisible_end_to_end() -> None:
    """Every StdConv is followed by a GroupNorm, which cancels the per-channel factor
    sqrt(n / (n - 1)) that ddof=1 introduces; only the epsilons leak it. So an end-to-end comparison
    cannot catch the port's ddof=1 deviation: it must be checked at the conv itself."""
    params = make_official_params(51, **SMALL)
    rows = random_official_rows(52, batch=2, tokens=12)
    ref = official_forward(params, rows, num_heads=SMALL["heads"])
    sd = to_pyiqa_state_dict(params)
    ported = torch_forward(sd, rows, num_heads=SMALL["heads"], encoder="resnet", ddof=1)
    assert np.abs(ported - ref).max() < 1e-4
    x = torch.from_numpy(rows[0, :4, :-3].reshape(4, 32, 32, 3)).permute(0, 3, 1, 2)
    w = sd["conv_root.weight"]
    a, b = _std_conv(x, w, 2, ddof=0), _std_conv(x, w, 2, ddof=1)
    n = w[0].numel()  # 7 * 7 * 3 values per output channel
    rel = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))
    assert rel == pytest.approx(math.sqrt(n / (n - 1)) - 1, rel=0.05)  # ~3.4e-3 at the conv
