"""Floating-point operations of one forward pass, from the config and the token count.

Counts multiply-adds as two FLOPs in every convolution, dense layer and attention product;
normalisations, activations and softmax are left out (a few per cent at most). Used by the
benchmarks to express throughput against the machine's measured matrix-multiply peak.
"""

from __future__ import annotations

from model.config import MusiqConfig


def patch_encoder_flops(config: MusiqConfig) -> int:
    """Per patch."""
    p, d = config.patch_size, config.hidden_size
    if config.patch_encoder == "linear":
        return 2 * p * p * 3 * d
    root = (p // 2) ** 2 * 64 * (7 * 7 * 3)  # 7x7/2 conv, 3 -> 64
    cells = (p // 4) ** 2
    if config.patch_encoder == "conv":
        return 2 * (root + cells * 64 * d)
    unit = cells * (64 * 256 + 64 * 64 + 9 * 64 * 64 + 64 * 256)  # proj, conv1, conv2, conv3
    return 2 * (root + unit + cells * 256 * d)


def forward_flops(config: MusiqConfig, tokens: int) -> int:
    """One image of `tokens` patch tokens (padding included: it is computed too), plus CLS."""
    d, n = config.hidden_size, tokens + 1
    # q/k/v/out projections and the MLP per token, then QK^T and AV over all token pairs
    per_layer = 2 * n * (4 * d * d + 2 * d * config.mlp_dim) + 2 * 2 * n * n * d
    return tokens * patch_encoder_flops(config) + config.num_layers * per_layer + 2 * d * config.num_outputs
