"""The MUSIQ network in PyTorch (MUSIQ_SPEC section 2), written to export cleanly to ONNX.

Inputs are the packed arrays, batched and padded: patches [B, N, P*P*3] in (row, col, channel)
order, spatial index [B, N], scale id [B, N], mask [B, N]. Nothing here depends on N being fixed:
attention takes an additive key mask through `scaled_dot_product_attention`, and every reshape
keeps the batch and token axes symbolic, so one exported graph serves 1 to thousands of tokens.

Faithfulness notes (each is a place where the PyTorch port drifts from the official scores):
weight standardisation uses the population std (ddof 0) with eps 1e-5 added to the std; the MLP
uses the tanh approximation of GELU; padded keys get a -1e10 bias; the patch is read as NHWC.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import Checkpoint, default_score_range
from model.config import MusiqConfig

RESNET_WIDTH = 64  # channels of the ResNet root; the bottleneck unit outputs 4x this
MASK_BIAS = -1e10  # the official attention bias for padded positions


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for a static input size."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StdConv2d(nn.Conv2d):
    """Bias-free conv with weight standardisation and TensorFlow "SAME" padding.

    Standardised per output channel over (in, kh, kw) with the population std, eps added to the
    std, as `resnet.weight_standardize` does. Patch sizes are static, so the padding is too.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, size: int | None = None) -> None:
        super().__init__(cin, cout, kernel, stride=stride, bias=False)
        self.eps = 1e-5
        self.folded = False  # True once `weight` holds the standardised kernel (inference only)
        # With the input size known up front the padding is a constant, so an exported graph
        # carries fixed Pad nodes instead of shape arithmetic.
        self.pads = _same_pads(size, size, kernel, stride) if size is not None else None

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.folded:
            return w
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).sqrt()
        return (w - mean) / (std + self.eps)

    @torch.no_grad()
    def fold(self) -> None:
        """Stores the standardised kernel in place, so inference and export skip recomputing it."""
        if not self.folded:
            self.weight.copy_(self.standardized_weight())
            self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pads or _same_pads(x.shape[-2], x.shape[-1], self.kernel_size[0], self.stride[0])
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.standardized_weight(), None, self.stride)


def _same_pads(h: int, w: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """F.pad order (left, right, top, bottom) of "SAME" padding for an h x w input."""
    top, bottom = same_padding(h, kernel, stride)
    left, right = same_padding(w, kernel, stride)
    return left, right, top, bottom


class ResNetRoot(nn.Module):
    """7x7/2 StdConv, GroupNorm(32, eps 1e-6), ReLU, 3x3/2 "SAME" max pool: P x P -> P/4 x P/4."""

    def __init__(self, patch_size: int, width: int = RESNET_WIDTH) -> None:
        super().__init__()
        self.conv = StdConv2d(3, width, 7, stride=2, size=patch_size)
        self.norm = nn.GroupNorm(32, width, eps=1e-6)
        self.pool_pads = _same_pads(patch_size // 2, patch_size // 2, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        # Zero padding equals the official -inf padding here: the input is post-ReLU (>= 0).
        x = F.pad(x, self.pool_pads)
        return F.max_pool2d(x, 3, 2)


class Bottleneck(nn.Module):
    """The one ResNet v1 bottleneck unit (stride 1, 64 -> 256), GroupNorm eps 1e-4."""

    def __init__(self, size: int, cin: int = RESNET_WIDTH, width: int = RESNET_WIDTH) -> None:
        super().__init__()
        cout = 4 * width
        self.conv_proj = StdConv2d(cin, cout, 1, size=size)
        self.gn_proj = nn.GroupNorm(32, cout, eps=1e-4)
        self.conv1 = StdConv2d(cin, width, 1, size=size)
        self.gn1 = nn.GroupNorm(32, width, eps=1e-4)
        self.conv2 = StdConv2d(width, width, 3, size=size)
        self.gn2 = nn.GroupNorm(32, width, eps=1e-4)
        self.conv3 = StdConv2d(width, cout, 1, size=size)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class PatchEncoder(nn.Module):
    """Embeds each P x P patch independently into D dims.

    "resnet" (official): root + bottleneck; "conv": root only; "linear": the raw pixels. Feature
    maps are flattened in (h, w, c) order, as the official Flax code does.
    """

    def __init__(self, config: MusiqConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.kind = config.patch_encoder
        cells = (config.patch_size // 4) ** 2
        self.root = ResNetRoot(config.patch_size) if self.kind in ("resnet", "conv") else None
        self.block = Bottleneck(config.patch_size // 4) if self.kind == "resnet" else None
        features = {
            "resnet": cells * 4 * RESNET_WIDTH,
            "conv": cells * RESNET_WIDTH,
            "linear": config.patch_size**2 * 3,
        }[self.kind]
        self.embedding = nn.Linear(features, config.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n = patches.shape[0], patches.shape[1]
        if self.root is None:
            return self.embedding(patches)
        p = self.patch_size
        x = patches.reshape(-1, p, p, 3).permute(0, 3, 1, 2)  # NHWC rows -> NCHW
        x = self.root(x)
        if self.block is not None:
            x = self.block(x)
        x = x.permute(0, 2, 3, 1).reshape(b, n, -1)  # (h, w, c) flatten, as the official Dense sees it
        return self.embedding(x)


class Attention(nn.Module):
    """Multi-head self-attention with an additive key-padding bias.

    The official bias masks a logit when its query or its key is padding. Padded queries only
    produce padded outputs, which never reach a valid token (they are masked as keys in every
    layer) nor the CLS token, so masking keys alone gives identical valid outputs with an O(N)
    mask instead of O(N^2).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout
        # When a list, forward computes the probabilities explicitly and appends their mean over
        # heads [B, N, N] to it: the attention-rollout explanation reads them from here.
        self.record: list[torch.Tensor] | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, N, D]; key_bias [B, 1, 1, N] (0 for valid keys, -1e10 for padding)."""
        b, n = x.shape[0], x.shape[1]
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        if self.record is not None:
            probs = ((q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1) + key_bias).softmax(dim=-1)
            self.record.append(probs.mean(dim=1))
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=key_bias, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: MusiqConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attention = Attention(d, config.num_heads, config.attention_dropout)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = Mlp(d, config.mlp_dim, config.gelu, config.dropout)
        self.drop = nn.Dropout(config.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.drop(self.attention(self.norm1(x), key_bias)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Musiq(nn.Module):
    """Multi-scale image quality transformer.

    `forward` returns the head's raw output [B, num_outputs]; `score` turns it into the quality
    score (the raw value for a one-output head, the expectation over bins 1..K for a distribution
    head). Padding rows (mask False) never change a valid image's output.
    """

    def __init__(self, config: MusiqConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_encoder = PatchEncoder(config)
        self.pos_embedding = nn.Parameter(torch.empty(config.grid_size**2, d))
        self.scale_embedding = nn.Parameter(torch.empty(config.num_scales, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        rates = [config.drop_path * i / max(config.num_layers - 1, 1) for i in range(config.num_layers)]
        self.blocks = nn.ModuleList(EncoderBlock(config, r) for r in rates)
        self.encoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, config.num_outputs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisers: N(0, 0.02) embeddings, zero CLS, Xavier-uniform transformer
        kernels, zero head (the published code's choice), He-normal convolutions."""
        nn.init.normal_(self.pos_embedding, std=0.02)
        nn.init.normal_(self.scale_embedding, std=0.02)
        nn.init.zeros_(self.cls)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(
        self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens with embeddings and CLS prepended [B, 1+N, D], and the key bias [B, 1, 1, 1+N]."""
        return self.embed_tokens(self.patch_encoder(patches), spatial, scale, mask)

    def embed_tokens(
        self, tokens: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`embed` from the patch encoder's output [B, N, D]: fine-tuning with a frozen encoder
        (tools/frozen_finetune.py) computes that once per image and starts here."""
        x = tokens + self.pos_embedding[spatial.long()]
        if self.config.use_scale_embedding:
            x = x + self.scale_embedding[scale.long()]
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        valid = torch.cat([torch.ones_like(mask[:, :1], dtype=torch.bool), mask.bool()], dim=1)
        key_bias = torch.where(valid, 0.0, MASK_BIAS).to(x.dtype)[:, None, None, :]
        return x, key_bias

    def forward_features(
        self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The normalised CLS embedding [B, D]."""
        return self.encode(*self.embed(patches, spatial, scale, mask))

    def encode(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """The transformer over embedded tokens (`embed`'s outputs): the normalised CLS [B, D]."""
        for block in self.blocks:
            x = block(x, key_bias)
        return self.encoder_norm(x[:, 0])

    def forward(
        self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return self.head(self.forward_features(patches, spatial, scale, mask))

    def fold_weight_standardization(self) -> Musiq:
        """Bakes the standardised conv kernels into the weights (inference and export only)."""
        for m in self.modules():
            if isinstance(m, StdConv2d):
                m.fold()
        return self

    def attention_rollout(
        self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head output [B, K] and the attention rollout from CLS to each token [B, N].

        As in the paper's attention visualisation (after Abnar & Zuidema, 2020): per layer the
        attention averaged over heads, plus the identity for the residual path, renormalised;
        multiplied through the layers; the CLS row of the product, without CLS itself. Padded
        tokens get zero (they are masked as keys everywhere).
        """
        attentions = [cast(Attention, block.attention) for block in self.blocks]
        records: list[torch.Tensor] = []
        for a in attentions:
            a.record = records
        try:
            output = self(patches, spatial, scale, mask)
        finally:
            for a in attentions:
                a.record = None
        n = records[0].shape[-1]
        eye = torch.eye(n, dtype=records[0].dtype, device=records[0].device)
        row = eye[:1].expand(records[0].shape[0], 1, n)  # CLS row, [B, 1, 1+N]
        for probs in reversed(records):  # e0^T A_L ... A_1, evaluated from the left: O(N^2) per layer
            joint = probs + eye
            row = row @ (joint / joint.sum(dim=-1, keepdim=True))
        return output, row[:, 0, 1:]

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """Head output [B, K] -> quality score [B]."""
        return head_score(output, self.config.head)


def head_score(output: torch.Tensor, head: str) -> torch.Tensor:
    """Score from a head's raw output: raw value (score), expectation over 1..K (distribution)."""
    if head == "score":
        return output[:, 0]
    if head == "distribution":
        bins = torch.arange(1, output.shape[-1] + 1, dtype=output.dtype, device=output.device)
        return (output.softmax(dim=-1) * bins).sum(dim=-1)
    raise ValueError(f"a {head!r} head has no quality score")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(checkpoint: Checkpoint) -> Musiq:
    """A network in eval mode holding a checkpoint's weights (strict: every tensor must fit)."""
    model = Musiq(checkpoint.config)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in checkpoint.tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def to_checkpoint(model: Musiq, **card: Any) -> Checkpoint:
    """Snapshot of a network's weights and config; `card` sets name, version, score_range, source."""
    tensors = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    card.setdefault("score_range", default_score_range(model.config))
    return Checkpoint(config=model.config, tensors=tensors, **card)
