"""A plain numpy re-implementation of Google's official MUSIQ forward pass (the test ground truth).

It follows the JAX/Flax code in google-research/google-research `musiq/model/` (multiscale_transformer.py,
resnet.py, multiscale_transformer_utils.py, and the old `flax.nn` layers they call), NOT the PyTorch port:

- patches are NHWC, flattened in (row, col, channel) order; convs are weight-standardised with the
  population std (ddof=0) and TF "SAME" padding; GroupNorm statistics run over H, W and the channels of
  each group; max pool pads with -inf;
- parameters keep their Flax names, shapes and layouts (HWIO conv kernels, (D, H, dh) attention
  kernels, (1, 1, 1, C) GroupNorm scales, (1, G*G, D) position table ...);
- GELU is the tanh approximation (`jax.nn.gelu` default); the padding mask adds -1e10 to the logits
  wherever query or key is padding.

Everything runs in float64 so that it is a clean reference for float32 ports. Nothing here imports the
project's `model` package: the point is to be an independent second implementation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

Encoder = Literal["resnet", "conv", "linear"]
Gelu = Literal["tanh", "erf"]
Params = dict[str, np.ndarray]

ENCODERS: tuple[str, ...] = ("resnet", "conv", "linear")
RESNET_TOKEN_DIM = 64  # official RESNET_TOKEN_DIM
ROOT_GN_EPS = 1e-6  # flax.nn.GroupNorm default, used by gn_root
UNIT_GN_EPS = 1e-4  # resnet.ResidualUnit passes epsilon=1e-4
GN_GROUPS = 32  # flax.nn.GroupNorm default num_groups
LN_EPS = 1e-6  # flax.nn.LayerNorm default
WS_EPS = 1e-5  # resnet.weight_standardize eps
MASK_BIAS = -1e10  # flax.nn.attention: bias where the padding mask is False

# Names of the bottleneck unit's convs/norms and their (kernel size, cin, cout) in units of the root width.
_UNIT_CONVS = {"conv1": (1, 1, 1), "conv2": (3, 1, 1), "conv3": (1, 1, 4), "conv_proj": (1, 1, 4)}
_UNIT_NORMS = {"gn1": 1, "gn2": 1, "gn3": 4, "gn_proj": 4}


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def official_param_shapes(
    *,
    hidden: int = 384,
    layers: int = 14,
    heads: int = 6,
    mlp: int = 1152,
    patch: int = 32,
    grid: int = 10,
    num_scales: int = 3,
    num_classes: int = 1,
    encoder: Encoder = "resnet",
) -> dict[str, tuple[int, ...]]:
    """The Flax parameter names (no `opt/target/` prefix) and shapes of the official model."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} not divisible by heads {heads}")
    if encoder != "linear" and patch % 4:
        raise ValueError("the resnet/conv encoders need a patch size divisible by 4")
    c = RESNET_TOKEN_DIM
    dh = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {}
    if encoder in ("resnet", "conv"):
        shapes["conv_root/kernel"] = (7, 7, 3, c)
        shapes["gn_root/scale"] = (1, 1, 1, c)
        shapes["gn_root/bias"] = (1, 1, 1, c)
    if encoder == "resnet":
        for name, (k, cin, cout) in _UNIT_CONVS.items():
            shapes[f"block1/unit1/{name}/kernel"] = (k, k, cin * c, cout * c)
        for name, mult in _UNIT_NORMS.items():
            shapes[f"block1/unit1/{name}/scale"] = (1, 1, 1, mult * c)
            shapes[f"block1/unit1/{name}/bias"] = (1, 1, 1, mult * c)
    token_dim = {
        "resnet": (patch // 4) ** 2 * 4 * c,
        "conv": (patch // 4) ** 2 * c,
        "linear": patch * patch * 3,
    }[encoder]
    shapes["embedding/kernel"] = (token_dim, hidden)
    shapes["embedding/bias"] = (hidden,)
    t = "Transformer"
    shapes[f"{t}/posembed_input/pos_embedding"] = (1, grid * grid, hidden)
    shapes[f"{t}/scaleembed_input/scale_embedding"] = (1, num_scales, hidden)
    shapes[f"{t}/cls"] = (1, 1, hidden)
    for i in range(layers):
        b = f"{t}/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{b}/{ln}/scale"] = (hidden,)
            shapes[f"{b}/{ln}/bias"] = (hidden,)
        a = f"{b}/MultiHeadDotProductAttention_1"
        for proj in ("query", "key", "value"):
            shapes[f"{a}/{proj}/kernel"] = (hidden, heads, dh)
            shapes[f"{a}/{proj}/bias"] = (heads, dh)
        shapes[f"{a}/out/kernel"] = (heads, dh, hidden)
        shapes[f"{a}/out/bias"] = (hidden,)
        shapes[f"{b}/MlpBlock_3/Dense_0/kernel"] = (hidden, mlp)
        shapes[f"{b}/MlpBlock_3/Dense_0/bias"] = (mlp,)
        shapes[f"{b}/MlpBlock_3/Dense_1/kernel"] = (mlp, hidden)
        shapes[f"{b}/MlpBlock_3/Dense_1/bias"] = (hidden,)
    shapes[f"{t}/encoder_norm/scale"] = (hidden,)
    shapes[f"{t}/encoder_norm/bias"] = (hidden,)
    shapes["head/kernel"] = (hidden, num_classes)
    shapes["head/bias"] = (num_classes,)
    return shapes


def make_official_params(
    seed: int,
    *,
    hidden: int = 384,
    layers: int = 14,
    heads: int = 6,
    mlp: int = 1152,
    patch: int = 32,
    grid: int = 10,
    num_scales: int = 3,
    num_classes: int = 1,
    encoder: Encoder = "resnet",
) -> Params:
    """Random float32 weights with the official names/shapes, scaled to keep activations lively.

    Unlike the official init (zero cls, zero head, zero gn3 scale, tiny embeddings) every tensor is
    non-trivial, so that a wrong layout, transposition or GELU flavour moves the output a lot.
    """
    shapes = official_param_shapes(
        hidden=hidden,
        layers=layers,
        heads=heads,
        mlp=mlp,
        patch=patch,
        grid=grid,
        num_scales=num_scales,
        num_classes=num_classes,
        encoder=encoder,
    )
    rng = np.random.default_rng(seed)
    params: Params = {}
    for name, shape in shapes.items():
        leaf = name.rsplit("/", 1)[-1]
        if name == "head/kernel":
            # The CLS output differs only mildly between inputs: a large one-output head spreads the
            # scores over several units; a milder one keeps a C-bin softmax from saturating.
            gain = 8.0 if num_classes == 1 else 2.0
            value = rng.normal(0.0, gain / math.sqrt(shape[0]), shape)
        elif leaf == "kernel":
            if len(shape) == 4:  # HWIO conv
                fan_in = shape[0] * shape[1] * shape[2]
            elif name.endswith("/out/kernel"):  # (H, dh, D)
                fan_in = shape[0] * shape[1]
            else:  # (in, out) Dense or (D, H, dh) DenseGeneral
                fan_in = shape[0]
            value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
        elif leaf == "scale":
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        elif leaf == "bias":
            value = rng.normal(0.0, 0.05, shape)
        elif leaf in ("pos_embedding", "scale_embedding", "cls"):
            value = rng.normal(0.0, 0.5, shape)
        else:  # pragma: no cover - every name above is covered
            raise AssertionError(name)
        params[name] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def infer_encoder(params: Mapping[str, np.ndarray]) -> Encoder:
    """Which patch encoder a flat parameter dict belongs to."""
    if "block1/unit1/conv1/kernel" in params:
        return "resnet"
    if "conv_root/kernel" in params:
        return "conv"
    return "linear"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def random_official_rows(
    seed: int,
    *,
    batch: int = 2,
    tokens: int = 20,
    pad: int = 0,
    patch: int = 32,
    grid: int = 10,
    num_scales: int = 3,
) -> np.ndarray:
    """Random float32 official rows [batch, tokens + pad, P*P*3 + 3]; the last `pad` rows are padding.

    Patch values are uniform in [-1, 1] (the official input range); padding rows are all zeros, as
    the official packing writes them.
    """
    rng = np.random.default_rng(seed)
    rows = np.zeros((batch, tokens + pad, patch * patch * 3 + 3), dtype=np.float32)
    rows[:, :tokens, :-3] = rng.uniform(-1.0, 1.0, (batch, tokens, patch * patch * 3))
    rows[:, :tokens, -3] = rng.integers(0, grid * grid, (batch, tokens))
    rows[:, :tokens, -2] = rng.integers(0, num_scales, (batch, tokens))
    rows[:, :tokens, -1] = 1.0
    return rows


# --------------------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------------------


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF/XLA "SAME": (output size, pad before, pad after); the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def _windows(x: np.ndarray, kh: int, kw: int, stride: int, pad_value: float) -> list[np.ndarray]:
    """Strided views of a SAME-padded NHWC input, one per kernel offset in (dy, dx) row-major order."""
    _, h, w, _ = x.shape
    oh, top, bottom = _same_pads(h, kh, stride)
    ow, left, right = _same_pads(w, kw, stride)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=pad_value)
    return [
        xp[:, dy : dy + stride * (oh - 1) + 1 : stride, dx : dx + stride * (ow - 1) + 1 : stride]
        for dy in range(kh)
        for dx in range(kw)
    ]


def std_conv(x: np.ndarray, kernel: np.ndarray, stride: int = 1, chunk: int = 128) -> np.ndarray:
    """resnet.StdConv: weight-standardised (population std), bias-free, SAME conv on NHWC / HWIO.

    Done as im2col (columns ordered (dy, dx, cin), i.e. the HWIO kernel flattened) in chunks of
    `chunk` images so that memory stays bounded.
    """
    w = kernel - kernel.mean(axis=(0, 1, 2))
    w = w / (w.std(axis=(0, 1, 2)) + WS_EPS)
    kh, kw, cin, cout = w.shape
    w2 = w.reshape(kh * kw * cin, cout)
    outs = []
    for start in range(0, x.shape[0], chunk):
        views = _windows(x[start : start + chunk], kh, kw, stride, 0.0)
        n, oh, ow, _ = views[0].shape
        cols = np.concatenate(views, axis=-1).reshape(n * oh * ow, kh * kw * cin)
        outs.append((cols @ w2).reshape(n, oh, ow, cout))
    return np.concatenate(outs, axis=0)


def max_pool_same(x: np.ndarray, window: int = 3, stride: int = 2) -> np.ndarray:
    """flax.nn.max_pool(padding="SAME"): lax.reduce_window with -inf padding."""
    views = _windows(x, window, window, stride, -np.inf)
    out = views[0].copy()
    for view in views[1:]:
        np.maximum(out, view, out=out)
    return out


def group_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float, groups: int = GN_GROUPS):
    """flax.nn.GroupNorm: stats over H, W and the (contiguous) channels of each group."""
    n, h, w, c = x.shape
    # [n, groups, h*w*(c/groups)]: one contiguous row of statistics per (image, group).
    g = x.reshape(n, h * w, groups, c // groups).transpose(0, 2, 1, 3).reshape(n, groups, -1)
    mean = g.mean(axis=-1, keepdims=True)
    var = g.var(axis=-1, keepdims=True)
    y = (g - mean) / np.sqrt(var + eps)
    y = y.reshape(n, groups, h * w, c // groups).transpose(0, 2, 1, 3).reshape(n, h, w, c)
    return y * scale + bias  # scale/bias are (1, 1, 1, C)


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    """flax.nn.LayerNorm over the last axis, population variance."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu(x: np.ndarray, kind: Gelu = "tanh") -> np.ndarray:
    """jax.nn.gelu: the tanh approximation by default; "erf" is the exact form (the port's choice)."""
    if kind == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))
    if kind == "erf":
        erf = np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2.0)).astype(np.float64)
        return 0.5 * x * (1.0 + erf)
    raise ValueError(f"unknown gelu {kind!r}")


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def patch_encoder(p: Mapping[str, np.ndarray], patches: np.ndarray, encoder: Encoder) -> np.ndarray:
    """Official patch encoder on [M, P*P*3] rows (row, col, channel order) -> [M, token_dim]."""
    m, width = patches.shape
    if encoder == "linear":
        return patches
    size = math.isqrt(width // 3)
    x = patches.reshape(m, size, size, 3)
    x = std_conv(x, p["conv_root/kernel"], stride=2)
    x = group_norm(x, p["gn_root/scale"], p["gn_root/bias"], ROOT_GN_EPS)
    x = max_pool_same(_relu(x), 3, 2)
    if encoder == "resnet":  # resnet.ResidualUnit "block1/unit1": bottleneck, stride 1, 64 -> 256

        def conv_gn(t: np.ndarray, conv: str, norm: str) -> np.ndarray:
            u = "block1/unit1"
            t = std_conv(t, p[f"{u}/{conv}/kernel"])
            return group_norm(t, p[f"{u}/{norm}/scale"], p[f"{u}/{norm}/bias"], UNIT_GN_EPS)

        residual = conv_gn(x, "conv_proj", "gn_proj")
        y = _relu(conv_gn(x, "conv1", "gn1"))
        y = _relu(conv_gn(y, "conv2", "gn2"))
        y = conv_gn(y, "conv3", "gn3")
        x = _relu(residual + y)
    elif encoder != "conv":
        raise ValueError(f"unknown encoder {encoder!r}")
    return x.reshape(m, -1)  # (h, w, c) order, as jnp.reshape on NHWC


def self_attention(
    p: Mapping[str, np.ndarray], prefix: str, x: np.ndarray, mask: np.ndarray, num_heads: int
) -> np.ndarray:
    """flax.nn.attention.MultiHeadDotProductAttention as a self-attention with a padding mask."""
    wq = p[f"{prefix}/query/kernel"]
    if wq.shape[1] != num_heads:
        raise ValueError(f"num_heads={num_heads} but {prefix}/query/kernel has shape {wq.shape}")
    b, length, d = x.shape
    dh = wq.shape[2]

    def project(name: str) -> np.ndarray:  # DenseGeneral features=(H, dh) -> [b, H, l, dh]
        kernel = p[f"{prefix}/{name}/kernel"].reshape(d, num_heads * dh)
        y = x @ kernel + p[f"{prefix}/{name}/bias"].reshape(num_heads * dh)
        return y.reshape(b, length, num_heads, dh).transpose(0, 2, 1, 3)

    q, k, v = project("query"), project("key"), project("value")
    q = q / np.sqrt(dh)
    logits = q @ k.transpose(0, 1, 3, 2)  # [b, H, lq, lk]
    valid = mask[:, None, :, None] & mask[:, None, None, :]
    logits = logits + np.where(valid, 0.0, MASK_BIAS)
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, length, num_heads * dh)  # heads-major (H, dh)
    out_kernel = p[f"{prefix}/out/kernel"].reshape(num_heads * dh, d)  # DenseGeneral axis=(-2, -1)
    return out @ out_kernel + p[f"{prefix}/out/bias"]


def transformer(
    p: Mapping[str, np.ndarray],
    x: np.ndarray,
    spatial: np.ndarray,
    scale_ids: np.ndarray,
    mask: np.ndarray,
    *,
    num_heads: int,
    gelu_kind: Gelu = "tanh",
) -> np.ndarray:
    """multiscale_transformer_utils.Encoder: embeddings, CLS, pre-LN blocks, encoder_norm."""
    t = "Transformer"
    x = x + p[f"{t}/posembed_input/pos_embedding"][0][spatial]
    x = x + p[f"{t}/scaleembed_input/scale_embedding"][0][scale_ids]
    n, _, d = x.shape
    cls = np.broadcast_to(p[f"{t}/cls"], (n, 1, d))
    x = np.concatenate([cls, x], axis=1)
    mask = np.concatenate([np.ones((n, 1), dtype=bool), mask], axis=1)
    i = 0
    while f"{t}/encoderblock_{i}/LayerNorm_0/scale" in p:
        b = f"{t}/encoderblock_{i}"
        y = layer_norm(x, p[f"{b}/LayerNorm_0/scale"], p[f"{b}/LayerNorm_0/bias"])
        x = x + self_attention(p, f"{b}/MultiHeadDotProductAttention_1", y, mask, num_heads)
        y = layer_norm(x, p[f"{b}/LayerNorm_2/scale"], p[f"{b}/LayerNorm_2/bias"])
        y = y @ p[f"{b}/MlpBlock_3/Dense_0/kernel"] + p[f"{b}/MlpBlock_3/Dense_0/bias"]
        y = gelu(y, gelu_kind)
        y = y @ p[f"{b}/MlpBlock_3/Dense_1/kernel"] + p[f"{b}/MlpBlock_3/Dense_1/bias"]
        x = x + y
        i += 1
    return layer_norm(x, p[f"{t}/encoder_norm/scale"], p[f"{t}/encoder_norm/bias"])


def official_forward(
    params: Mapping[str, np.ndarray],
    rows: np.ndarray,
    *,
    num_heads: int,
    encoder: Encoder = "resnet",
    gelu: Gelu = "tanh",
) -> np.ndarray:
    """Head logits [B, C] of the official model on official rows [B, N, P*P*3 + 3], in float64.

    `gelu="erf"` swaps in the exact GELU; it exists only so tests can show that the choice matters.
    """
    rows = np.asarray(rows)
    if rows.ndim != 3:
        raise ValueError(f"rows must be [batch, tokens, P*P*3+3], got shape {rows.shape}")
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    b, n, _ = rows.shape
    # As the official code: float -> int32 truncates, float -> bool is "nonzero".
    spatial = rows[:, :, -3].astype(np.int64)
    scale_ids = rows[:, :, -2].astype(np.int64)
    mask = rows[:, :, -1].astype(bool)
    patches = rows[:, :, :-3].astype(np.float64).reshape(b * n, -1)
    tokens = patch_encoder(p, patches, encoder).reshape(b, n, -1)
    x = tokens @ p["embedding/kernel"] + p["embedding/bias"]
    x = transformer(p, x, spatial, scale_ids, mask, num_heads=num_heads, gelu_kind=gelu)
    return x[:, 0] @ p["head/kernel"] + p["head/bias"]


def official_score(logits: np.ndarray) -> np.ndarray:
    """run_predict_image.py: raw output for one class, else the softmax mean over bins 1..C."""
    logits = np.asarray(logits, dtype=np.float64)
    c = logits.shape[-1]
    if c == 1:
        return logits[..., 0]
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return probs @ np.arange(1, c + 1, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Checkpoint formats
# --------------------------------------------------------------------------------------------------


def official_npz_entries(
    params: Mapping[str, np.ndarray],
    *,
    prefix: str = "opt/target/",
    attention_name: str = "MultiHeadDotProductAttention_1",
) -> dict[str, np.ndarray]:
    """The flat name -> array mapping of a published checkpoint, training-state extras included."""
    entries: dict[str, np.ndarray] = {}
    for name, value in params.items():
        name = name.replace("/MultiHeadDotProductAttention_1/", f"/{attention_name}/")
        entries[prefix + name] = np.asarray(value)
    # flax.optim checkpoints also carry the optimizer state; a converter must skip it. The momentum
    # entries deliberately share names' tails and shapes with real parameters.
    entries["opt/state/step"] = np.array(123_456, dtype=np.int32)
    for name in ("head/kernel", "head/bias"):
        if name in params:
            entries[f"opt/state/param_states/{name}/momentum"] = np.full_like(params[name], 0.25)
    return entries


def save_official_npz(
    params: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    prefix: str = "opt/target/",
    attention_name: str = "MultiHeadDotProductAttention_1",
) -> Path:
    """Write `params` as a flat npz like the published `*_ckpt.npz` files (np.savez, no compression)."""
    path = Path(path)
    entries = official_npz_entries(params, prefix=prefix, attention_name=attention_name)
    with path.open("wb") as f:  # a file object keeps np.savez from appending ".npz"
        np.savez(f, **entries)
    return path


def to_pyiqa_state_dict(params: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The same weights laid out as chaofengc/IQA-PyTorch `pyiqa/archs/musiq_arch.py` MUSIQ.state_dict().

    Convs HWIO -> OIHW; Dense kernels (in, out) -> Linear weights (out, in); attention (D, H, dh)
    kernels flatten heads-major, matching the port's reshape(B, N, H, dh). The embedding kernel
    transposes directly because the port permutes its ResNet output to (h, w, c) before flattening.
    """
    import torch

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).copy())

    p = params
    sd: dict[str, torch.Tensor] = {}
    if "conv_root/kernel" in p:
        sd["conv_root.weight"] = tensor(p["conv_root/kernel"].transpose(3, 2, 0, 1))
        sd["gn_root.weight"] = tensor(p["gn_root/scale"].reshape(-1))
        sd["gn_root.bias"] = tensor(p["gn_root/bias"].reshape(-1))
    if "block1/unit1/conv1/kernel" in p:
        for name in _UNIT_CONVS:
            sd[f"block1.{name}.weight"] = tensor(p[f"block1/unit1/{name}/kernel"].transpose(3, 2, 0, 1))
        for name in _UNIT_NORMS:
            sd[f"block1.{name}.weight"] = tensor(p[f"block1/unit1/{name}/scale"].reshape(-1))
            sd[f"block1.{name}.bias"] = tensor(p[f"block1/unit1/{name}/bias"].reshape(-1))
    sd["embedding.weight"] = tensor(p["embedding/kernel"].T)
    sd["embedding.bias"] = tensor(p["embedding/bias"])

    te, t = "transformer_encoder", "Transformer"
    sd[f"{te}.posembed_input.position_emb"] = tensor(p[f"{t}/posembed_input/pos_embedding"])
    sd[f"{te}.scaleembed_input.scale_emb"] = tensor(p[f"{t}/scaleembed_input/scale_embedding"][0])
    sd[f"{te}.cls"] = tensor(p[f"{t}/cls"])
    i = 0
    while f"{t}/encoderblock_{i}/LayerNorm_0/scale" in p:
        b, o = f"{t}/encoderblock_{i}", f"{te}.transformer.encoderblock_{i}"
        a = f"{b}/MultiHeadDotProductAttention_1"
        sd[f"{o}.norm1.weight"] = tensor(p[f"{b}/LayerNorm_0/scale"])
        sd[f"{o}.norm1.bias"] = tensor(p[f"{b}/LayerNorm_0/bias"])
        for proj in ("query", "key", "value"):
            kernel = p[f"{a}/{proj}/kernel"]
            d = kernel.shape[0]
            sd[f"{o}.attention.{proj}.weight"] = tensor(kernel.reshape(d, -1).T)
            sd[f"{o}.attention.{proj}.bias"] = tensor(p[f"{a}/{proj}/bias"].reshape(-1))
        out = p[f"{a}/out/kernel"]
        sd[f"{o}.attention.out.weight"] = tensor(out.reshape(-1, out.shape[-1]).T)
        sd[f"{o}.attention.out.bias"] = tensor(p[f"{a}/out/bias"])
        sd[f"{o}.norm2.weight"] = tensor(p[f"{b}/LayerNorm_2/scale"])
        sd[f"{o}.norm2.bias"] = tensor(p[f"{b}/LayerNorm_2/bias"])
        sd[f"{o}.mlp.fc1.weight"] = tensor(p[f"{b}/MlpBlock_3/Dense_0/kernel"].T)
        sd[f"{o}.mlp.fc1.bias"] = tensor(p[f"{b}/MlpBlock_3/Dense_0/bias"])
        sd[f"{o}.mlp.fc2.weight"] = tensor(p[f"{b}/MlpBlock_3/Dense_1/kernel"].T)
        sd[f"{o}.mlp.fc2.bias"] = tensor(p[f"{b}/MlpBlock_3/Dense_1/bias"])
        i += 1
    sd[f"{te}.encoder_norm.weight"] = tensor(p[f"{t}/encoder_norm/scale"])
    sd[f"{te}.encoder_norm.bias"] = tensor(p[f"{t}/encoder_norm/bias"])

    head = "head" if p["head/kernel"].shape[1] == 1 else "head.0"
    sd[f"{head}.weight"] = tensor(p["head/kernel"].T)
    sd[f"{head}.bias"] = tensor(p["head/bias"])
    return sd
