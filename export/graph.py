"""The exported graphs: the network behind a serving-friendly signature.

Inputs (batch and tokens dynamic):
    patches  float32 (float16 for the fp16 file) [batch, tokens, P*P*3]
    spatial  int32 [batch, tokens]  hashed spatial index
    scale    int32 [batch, tokens]  scale id
    mask     bool  [batch, tokens]  True for real patches
Outputs: `score` [batch]; `distribution` [batch, K] for distribution heads (`logits` for class
heads); the rollout graph adds `rollout` [batch, tokens], the CLS attention rollout.

int32 indices and a bool mask halve or quarter the bytes of the non-patch inputs, and float16
patches halve the dominant transfer; ONNX Gather takes int32 indices as they are.

Attention is emitted as ONNX Runtime's fused `com.microsoft.Attention` (one packed QKV GEMM,
masked softmax and the per-head products in one kernel) through the TorchScript exporter's
symbolic hook; its key mask is the 2-D raw mask, which ORT turns into a -10000 bias: padded keys
get exactly zero weight in float32, as with the official -1e10.

The ResNet patch encoder is rewritten for export too (`ExportPatchEncoder`): TensorFlow's
asymmetric "SAME" padding goes into the Conv / MaxPool `pads` attribute instead of separate Pad
nodes, GroupNorm becomes one LayerNormalization over each contiguous channel group plus the
per-channel affine, and the embedding's weight rows are permuted so that it reads the feature map
in the convolutions' own (c, h, w) order, which removes a transpose of the largest activation.
Same arithmetic; ~11 % less fp32 and ~15 % less int8 time at 342 tokens (bench/results/PERFORMANCE.md).

With `chunk` > 0 the encoder's convolutions run as an ONNX Scan over that many rows (tokens) at
a time (issue 19): traced as one placeholder node (`_ChunkedEncoderFn`), which `export_graph`
replaces by the Scan (`export.optimize.chunk_patch_encoder`), its body traced separately with
static shapes, so that each chunk's 64 KiB-per-token feature maps stay in a core's L2; the
embedding stays one MatMul over all rows. Measured, it is not the default (`ENCODER_CHUNK`).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from pathlib import Path
from typing import Any, cast

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from model.network import RESNET_WIDTH, Attention, Musiq, PatchEncoder, StdConv2d, head_score

INPUT_NAMES = ("patches", "spatial", "scale", "mask")
# Rows per iteration of the patch encoder's Scan (export.optimize.chunk_patch_encoder); 0 exports
# the whole batch through each operator. Off by default: on a quiet machine the Scan's per-chunk
# overhead outweighed the cache it saves (bench/results/PERFORMANCE.md, issue 19); it won only
# while other processes contended for the caches and memory bandwidth.
ENCODER_CHUNK = 0


class _FusedAttentionFn(torch.autograd.Function):
    """Eager: the same math as `Attention`; ONNX: one `com.microsoft.Attention` node."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor,
        key_mask: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (x @ qkv_weight + qkv_bias).split(d, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, num_heads, d // num_heads).transpose(1, 2)

        bias = torch.where(key_mask.bool(), 0.0, -1e10).to(x.dtype)[:, None, None, :]
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        return y.transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(
        g: Any,  # the TorchScript exporter's GraphContext, in a private module that moves between releases
        x: torch.Value,
        qkv_weight: torch.Value,
        qkv_bias: torch.Value,
        key_mask: torch.Value,
        num_heads: int,
    ) -> torch.Value:
        out = g.op("com.microsoft::Attention", x, qkv_weight, qkv_bias, key_mask, num_heads_i=num_heads)
        out.setType(x.type())  # same shape and dtype as the input: lets shape inference continue
        return out


class FusedAttention(nn.Module):
    """Drop-in for `model.network.Attention` with packed QKV weights, for export."""

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.heads = attention.heads
        w = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight], dim=0)
        b = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias], dim=0)
        self.qkv_weight = nn.Parameter(w.t().contiguous().detach(), requires_grad=False)  # [D, 3D]
        self.qkv_bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        self.out = attention.out

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        key_mask = (key_bias[:, 0, 0, :] == 0).to(torch.int32)
        return self.out(_FusedAttentionFn.apply(x, self.qkv_weight, self.qkv_bias, key_mask, self.heads))


class _SamePadConvFn(torch.autograd.Function):
    """Eager: explicit "SAME" pad, then the convolution; ONNX: one Conv with asymmetric `pads`."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, pads: tuple[int, int, int, int], stride: int
    ) -> torch.Tensor:
        return F.conv2d(F.pad(x, pads), weight, None, stride)

    @staticmethod
    def symbolic(
        g: Any, x: torch.Value, weight: torch.Value, pads: tuple[int, int, int, int], stride: int
    ) -> torch.Value:
        left, right, top, bottom = pads
        sizes = cast(torch.TensorType, weight.type()).sizes()  # a traced weight: its shape is known
        assert sizes is not None
        k = sizes[-1]
        return g.op(
            "Conv",
            x,
            weight,
            kernel_shape_i=[k, k],
            strides_i=[stride, stride],
            pads_i=[top, left, bottom, right],
        )


class _SamePadMaxPoolFn(torch.autograd.Function):
    """3x3/2 max pool after "SAME" zero padding; ONNX MaxPool pads with -inf instead, which is
    the same here because its input is post-ReLU (>= 0) and every window holds a real value."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, pads), 3, 2)

    @staticmethod
    def symbolic(g: Any, x: torch.Value, pads: tuple[int, int, int, int]) -> torch.Value:
        left, right, top, bottom = pads
        return g.op("MaxPool", x, kernel_shape_i=[3, 3], strides_i=[2, 2], pads_i=[top, left, bottom, right])


def _same_conv(conv: StdConv2d, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
    """`plain`: the eager arithmetic only, for use inside another Function's forward (the tracer
    fails on a Function applied inside one)."""
    assert conv.pads is not None  # StdConv2d built with its input size, as the encoder's are
    args = (x, conv.standardized_weight(), conv.pads, conv.stride[0])
    return _SamePadConvFn.forward(None, *args) if plain else _SamePadConvFn.apply(*args)


def _same_max_pool(x: torch.Tensor, pads: tuple[int, int, int, int], plain: bool = False) -> torch.Tensor:
    return _SamePadMaxPoolFn.forward(None, x, pads) if plain else _SamePadMaxPoolFn.apply(x, pads)


def _normalize(norm: nn.GroupNorm, x: torch.Tensor, size: int) -> torch.Tensor:
    """GroupNorm of an NCHW map without its affine: LayerNorm over each group's contiguous
    (C/G) x H x W block. `size` (H = W) is static, so every reshape exports with constant shapes."""
    c, groups = norm.num_channels, norm.num_groups
    width = c // groups * size * size
    return F.layer_norm(x.reshape(-1, groups, width), (width,), eps=norm.eps).reshape(-1, c, size, size)


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor, size: int) -> torch.Tensor:
    """GroupNorm of an NCHW map (`_normalize`, then the per-channel affine)."""
    return _normalize(norm, x, size) * norm.weight[:, None, None] + norm.bias[:, None, None]


_ENCODERS: weakref.WeakValueDictionary[int, ExportPatchEncoder] = weakref.WeakValueDictionary()


class _ChunkedEncoderFn(torch.autograd.Function):
    """Eager: the patch encoder and its embedding over every row at once; ONNX: one placeholder
    node, `musiq::ChunkedPatchEncoder`, which `export_graph` replaces by a Scan over chunks of
    rows (`export.optimize.chunk_patch_encoder`)."""

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, key: int, chunk: int
    ) -> torch.Tensor:
        # The encoder travels as a key (a Function's arguments are tensors and scalars). While
        # tracing, its arithmetic must not be recorded (the placeholder stands for it, and the
        # tracer fails on it): tracing is paused through torch's private switch, untyped in its stubs.
        jit: Any = torch._C
        state = jit._get_tracing_state()
        jit._set_tracing_state(None)
        try:
            x = _ENCODERS[key].features(rows, plain=True)
            return torch.addmm(bias, x.reshape(x.shape[0], -1), weight_t)
        finally:
            jit._set_tracing_state(state)

    @staticmethod
    def symbolic(
        g: Any, rows: torch.Value, weight_t: torch.Value, bias: torch.Value, key: int, chunk: int
    ) -> torch.Value:
        out = g.op("musiq::ChunkedPatchEncoder", rows, weight_t, bias, chunk_i=chunk)
        d = cast(torch.TensorType, weight_t.type()).sizes()
        assert d is not None
        out.setType(cast(torch.TensorType, rows.type()).with_sizes([None, d[-1]]))
        return out


class ExportPatchEncoder(nn.Module):
    """`model.network.PatchEncoder` ("resnet" or "conv") in the form ONNX Runtime runs fastest.

    Computes the same function; the exporter's parity check compares it with the original.
    `chunk` > 0 exports the convolutions as a Scan over `chunk` rows at a time (see
    `export.optimize.chunk_patch_encoder`), so that their feature maps stay in the CPU's cache.
    """

    def __init__(self, encoder: PatchEncoder, chunk: int = 0) -> None:
        super().__init__()
        if encoder.root is None:
            raise ValueError("a linear patch encoder needs no rewrite")
        self.patch_size = p = encoder.patch_size
        self.chunk = chunk
        self.root, self.block = encoder.root, encoder.block
        channels = 4 * RESNET_WIDTH if self.block is not None else RESNET_WIDTH
        weight = encoder.embedding.weight.detach()  # [D, (h, w, c)]
        d = weight.shape[0]
        weight = weight.reshape(d, p // 4, p // 4, channels).permute(0, 3, 1, 2).reshape(d, -1)
        self.embedding = nn.Linear(weight.shape[1], d)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)
            self.embedding.bias.copy_(encoder.embedding.bias)

    def features(self, rows: torch.Tensor, plain: bool = False) -> torch.Tensor:
        """Patch rows [..., P*P*3] -> NCHW feature maps [rows, C, h, w] (`plain`: see `_same_conv`)."""
        p = self.patch_size
        root, block = self.root, self.block

        def conv(c: StdConv2d, x: torch.Tensor) -> torch.Tensor:
            return _same_conv(c, x, plain)

        x = rows.reshape(-1, p, p, 3).permute(0, 3, 1, 2)  # NHWC rows -> NCHW
        x = F.relu(_group_norm(root.norm, conv(root.conv, x), p // 2))
        x = _same_max_pool(x, root.pool_pads, plain)
        if block is not None:
            q = p // 4
            residual = _group_norm(block.gn_proj, conv(block.conv_proj, x), q)
            y = F.relu(_group_norm(block.gn1, conv(block.conv1, x), q))
            y = F.relu(_group_norm(block.gn2, conv(block.conv2, y), q))
            x = F.relu(residual + _group_norm(block.gn3, conv(block.conv3, y), q))
        return x

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, p = patches.shape[0], patches.shape[1], self.patch_size
        if self.chunk:
            rows = patches.reshape(-1, p * p * 3)
            w = self.embedding.weight.t()
            _ENCODERS[id(self)] = self
            out = _ChunkedEncoderFn.apply(rows, w, self.embedding.bias, id(self), self.chunk)
            return out.reshape(b, n, -1)
        x = self.features(patches)  # the graph exported before issue 19, node for node
        return self.embedding(x.reshape(b, n, -1))  # (c, h, w) order: the permuted weight's

    def body(self, path: str | Path, opset: int) -> Path:
        """The Scan body's computation as its own ONNX file: [chunk, P*P*3] -> [chunk, C*h*w],
        static shapes."""

        class Body(nn.Module):
            def __init__(self, encoder: ExportPatchEncoder) -> None:
                super().__init__()
                self.encoder = encoder  # a submodule: its weights trace as initializers

            def forward(self, rows: torch.Tensor) -> torch.Tensor:
                x = self.encoder.features(rows)
                return x.reshape(x.shape[0], -1)

        rows = torch.rand(self.chunk, self.patch_size**2 * 3) * 2 - 1
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Body(self),
                (rows,),
                str(path),
                dynamo=False,
                input_names=["rows"],
                output_names=["features"],
                opset_version=opset,
                do_constant_folding=True,
            )
        return Path(path)


class ScoringGraph(nn.Module):
    """What the server runs: packed tokens in, score (and distribution) out."""

    def __init__(
        self,
        model: Musiq,
        fused_attention: bool = True,
        export_encoder: bool = True,
        chunk: int = ENCODER_CHUNK,
        embed_in_chunk: bool = False,
        slice_first: bool = False,
        encoder_op: str = "Scan",
    ) -> None:
        """`export_encoder=False` keeps the network's own patch encoder (for A/B timings);
        `chunk` is the encoder Scan's rows per iteration (0: no Scan, the whole batch at once)."""
        super().__init__()
        model = copy.deepcopy(model).eval().fold_weight_standardization()
        if fused_attention:
            for block in model.blocks:
                block.attention = FusedAttention(cast(Attention, block.attention))
        if export_encoder and model.patch_encoder.root is not None:
            # The same computation in another module type (not a PatchEncoder subclass): the
            # attribute's declared type is the network's own encoder.
            model.patch_encoder = ExportPatchEncoder(model.patch_encoder, chunk)  # type: ignore[assignment]
        self.embed_in_chunk = embed_in_chunk
        self.slice_first = slice_first
        self.encoder_op = encoder_op
        self.model = model
        self.head = model.config.head

    def output_names(self) -> tuple[str, ...]:
        return {"score": ("score",), "distribution": ("score", "distribution"), "classes": ("logits",)}[
            self.head
        ]

    def _outputs(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.head == "score":
            return (raw[:, 0],)
        if self.head == "distribution":
            return head_score(raw, self.head), raw.softmax(dim=-1)
        return (raw,)

    def forward(
        self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self._outputs(self.model(patches.float(), spatial, scale, mask))


class RolloutGraph(ScoringGraph):
    """The explanation graph: the scoring outputs plus the CLS attention rollout [batch, tokens]."""

    def __init__(self, model: Musiq) -> None:
        super().__init__(model, fused_attention=False)

    def output_names(self) -> tuple[str, ...]:
        return (*super().output_names(), "rollout")

    def forward(
        self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        raw, rollout = self.model.attention_rollout(patches.float(), spatial, scale, mask)
        return (*self._outputs(raw), rollout)


class FeatureGraph(nn.Module):
    """The patch encoder's convolutions alone: rows [n, P*P*3] -> feature maps [n, C*h*w].

    With `HeadGraph` it splits the scoring graph in two (`export_split`), so that a CPU runtime
    can run this half over small chunks of rows on single-threaded sessions in parallel: each
    chunk's maps stay in a core's cache, and no operator waits on the other core
    (`service.split.SplitModel`; issue 19, bench/results/PERFORMANCE.md).

    Each GroupNorm's scale moves into the convolutions after its ReLU where that is exact
    (every scale > 0: relu(g z + b) = g relu(z + b/g), and a max pool commutes with a positive
    scale), and the last unit's two GroupNorms share one scale:
    relu(gp zp + bp + g3 z3 + b3) = gp relu(zp + (g3/gp) z3 + (bp + b3)/gp). Four multiply and
    one add pass over a feature map fewer, ~7 % of this half's time (bench/ort_experiments.py,
    experiment 9); the embedding's weights stay as stored, so the head links to the checkpoint.
    The unit's sum is flattened before its ReLU, so the last operator writes the output rows: a
    final Reshape copies them into the caller's bound array (~7 % of this half, one thread).
    """

    ratio: nn.Parameter  # gn3's scale over gn_proj's
    out_shift: nn.Parameter
    out_scale: nn.Parameter

    def __init__(self, model: Musiq, fold: bool = True, reshape_last: bool = False) -> None:
        """`fold=False` keeps every GroupNorm's affine as it is, `reshape_last=True` flattens
        the output last, as before (both for A/B timings)."""
        super().__init__()
        self.reshape_last = reshape_last
        encoder = ScoringGraph(model).model.patch_encoder
        if not isinstance(encoder, ExportPatchEncoder):
            raise ValueError("only a ResNet / conv patch encoder can be split from its transformer")
        self.encoder: ExportPatchEncoder = encoder
        self.patch_size: int = encoder.patch_size
        block = encoder.block
        self.folded: dict[str, bool] = {"root": False, "gn1": False, "gn2": False, "out": False}
        if block is None or not fold:  # conv encoder: the root's maps go straight to the embedding
            return
        with torch.no_grad():
            self._fold("root", encoder.root.norm, (block.conv_proj, block.conv1))
            self._fold("gn1", block.gn1, (block.conv2,))
            self._fold("gn2", block.gn2, (block.conv3,))
            gp, g3 = block.gn_proj.weight, block.gn3.weight
            if bool((gp > 0).all()):
                self.folded["out"] = True
                self.ratio = nn.Parameter((g3 / gp)[:, None, None].clone(), requires_grad=False)
                shift = (block.gn_proj.bias + block.gn3.bias) / gp
                self.out_shift = nn.Parameter(shift[:, None, None].clone(), requires_grad=False)
                self.out_scale = nn.Parameter(gp[:, None, None].clone(), requires_grad=False)

    def _fold(self, name: str, norm: nn.GroupNorm, after: tuple[StdConv2d, ...]) -> bool:
        if not bool((norm.weight > 0).all()):
            self.folded[name] = False
            return False
        for conv in after:
            conv.weight.mul_(norm.weight[None, :, None, None])
        self.register_parameter(
            name + "_shift",
            nn.Parameter((norm.bias / norm.weight)[:, None, None].clone(), requires_grad=False),
        )
        self.folded[name] = True
        return True

    def _norm_relu(self, name: str, norm: nn.GroupNorm, x: torch.Tensor, size: int) -> torch.Tensor:
        if self.folded[name]:
            return F.relu(_normalize(norm, x, size) + getattr(self, name + "_shift"))
        return F.relu(_group_norm(norm, x, size))

    @property
    def width(self) -> int:
        return int(self.encoder.embedding.in_features)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        e, p = self.encoder, self.patch_size
        root, block = e.root, e.block
        x = rows.float().reshape(-1, p, p, 3).permute(0, 3, 1, 2)  # NHWC rows -> NCHW
        x = _same_max_pool(
            self._norm_relu("root", root.norm, _same_conv(root.conv, x), p // 2), root.pool_pads
        )
        if block is not None:
            q = p // 4
            y = self._norm_relu("gn1", block.gn1, _same_conv(block.conv1, x), q)
            y = self._norm_relu("gn2", block.gn2, _same_conv(block.conv2, y), q)
            if self.folded["out"]:
                residual = _normalize(block.gn_proj, _same_conv(block.conv_proj, x), q)
                z3 = _normalize(block.gn3, _same_conv(block.conv3, y), q)
                total, scale = residual + z3 * self.ratio + self.out_shift, self.out_scale
            else:
                residual = _group_norm(block.gn_proj, _same_conv(block.conv_proj, x), q)
                total, scale = residual + _group_norm(block.gn3, _same_conv(block.conv3, y), q), None
            if self.reshape_last:
                x = F.relu(total) if scale is None else F.relu(total) * scale
            else:
                flat = F.relu(total.reshape(total.shape[0], -1))
                return flat if scale is None else flat * scale.expand(-1, q, q).reshape(-1)
        return x.reshape(x.shape[0], -1)


class HeadGraph(ScoringGraph):
    """The scoring graph from the encoder's feature maps on: `patches` [batch, tokens, C*h*w] are
    `FeatureGraph`'s rows; the embedding and the transformer follow, as in the whole graph."""

    def __init__(self, model: Musiq) -> None:
        super().__init__(model)
        self.model.patch_encoder = cast(ExportPatchEncoder, self.model.patch_encoder).embedding  # type: ignore[assignment]


def export_rows_graph(
    module: nn.Module, example: torch.Tensor, path: str | Path, names: tuple[str, str], opset: int = 17
) -> Path:
    """Traces a rows -> rows module ([n, ...] in and out, n symbolic) to `path`; `names`: the
    input's and the output's."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: {0: "rows"}, names[1]: {0: "rows"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    return Path(path)


def export_split(model: Musiq, features: str | Path, head: str | Path, opset: int = 17) -> tuple[Path, Path]:
    """Traces `FeatureGraph` (rows axis dynamic) and `HeadGraph` (batch and tokens dynamic) to
    `features` and `head`; the head is fused like the whole graph (`export.optimize.fuse`)."""
    import tempfile

    from export.optimize import fuse

    features, head = Path(features), Path(head)
    feature_graph = FeatureGraph(model)
    head_graph = HeadGraph(model)
    inputs = list(example_inputs(feature_graph.patch_size))
    inputs[0] = torch.rand(*inputs[0].shape[:2], feature_graph.width)
    rows = torch.rand(4, feature_graph.patch_size**2 * 3) * 2 - 1
    export_rows_graph(feature_graph, rows, features, ("rows", "features"), opset)
    with tempfile.TemporaryDirectory() as tmp:
        traced = export_graph(head_graph, Path(tmp) / "head.onnx", opset, tuple(inputs))
        cfg = model.config
        onnx.save(fuse(onnx.load(traced), cfg.num_heads, cfg.hidden_size), head)
    return features, head


def example_inputs(patch_size: int, batch: int = 2, tokens: int = 9) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[-1, tokens // 2 :] = False  # trace through a padded batch
    return (
        torch.rand(batch, tokens, patch_size * patch_size * 3, generator=g) * 2 - 1,
        torch.randint(0, 4, (batch, tokens), generator=g, dtype=torch.int32),
        torch.randint(0, 2, (batch, tokens), generator=g, dtype=torch.int32),
        mask,
    )


def export_graph(
    graph: ScoringGraph, path: str | Path, opset: int = 17, inputs: tuple[torch.Tensor, ...] | None = None
) -> Path:
    """Traces `graph` to ONNX with symbolic batch and token axes (`inputs`: the example inputs,
    by default `example_inputs` of the graph's patch size).

    The TorchScript exporter is used because it carries the fused-attention symbolic; every
    reshape is traced from runtime shapes, so nothing bakes in the token count (the tests run
    1 and 4096 tokens through one file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = graph.output_names()
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUT_NAMES}
    axes.update({name: {0: "batch"} for name in names})
    if "rollout" in names:
        axes["rollout"] = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation and tracer notes about the static patch size
        torch.onnx.export(
            graph,
            inputs or example_inputs(graph.model.config.patch_size),
            str(path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(names),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    encoder = graph.model.patch_encoder
    if isinstance(encoder, ExportPatchEncoder) and encoder.chunk:
        from export.optimize import chunk_patch_encoder

        body = onnx.load(encoder.body(path.with_name(path.name + ".body.onnx"), opset))
        path.with_name(path.name + ".body.onnx").unlink()
        onnx.save(
            chunk_patch_encoder(
                onnx.load(path), body, graph.embed_in_chunk, graph.slice_first, graph.encoder_op
            ),
            path,
        )
    return path
