"""Graph fusions and the reduced-precision variants of an exported model."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx

# Fused operators worth reporting: what ONNX Runtime's kernels gain over the plain ops.
FUSED_OPS = (
    "Attention",
    "QAttention",
    "MultiHeadAttention",
    "LayerNormalization",
    "SkipLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "GemmFastGelu",
)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = op_counts(model)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def fuse(model: onnx.ModelProto, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    """ONNX Runtime's transformer fusions (LayerNorm, Skip+LayerNorm, bias+GELU -> FastGelu).

    Run offline at level 0 (the fusion passes only, no hardware-specific layouts), so the file
    stays portable between CPU and GPU; the session applies its own graph optimisations on load.
    The attention is already one fused node (see `export.graph`).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    model, region = _set_aside_chunked_encoder(model)
    optimizer = BertOnnxModel(_copy(model), num_heads=num_heads, hidden_size=hidden_size)
    optimizer.optimize(FusionOptions("bert"), add_dynamic_axes=False)
    optimizer.topological_sort()
    return _restore_chunked_encoder(optimizer.model, region) if region else optimizer.model


_REGION = "chunked_encoder/"  # name prefix of every node `chunk_patch_encoder` adds to the main graph
_STAND_IN = _REGION + "stand_in"


def _set_aside_chunked_encoder(
    model: onnx.ModelProto,
) -> tuple[onnx.ModelProto, tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None]:
    """The fusions rely on ONNX Runtime's symbolic shape inference, which fails on a Loop; without
    it Add + LayerNormalization is not fused into SkipLayerNormalization. So the chunked encoder's
    nodes are replaced, while `fuse` runs, by a stand-in of the same shapes (rows [M, P*P*3] times a
    zero [P*P*3, D] matrix), and put back afterwards (`_restore_chunked_encoder`)."""
    from onnx import helper, numpy_helper

    region = [n for n in model.graph.node if n.name.startswith(_REGION)]
    if not region:
        return model, None
    import numpy as np

    produced = {o for n in region for o in n.output}
    (result,) = [o for n in region for o in n.output if not o.startswith(_REGION)]
    rows = next(n.input[0] for n in region if n.op_type == "Pad")
    inits = {i.name: i for i in model.graph.initializer}
    loop_body = next(n.attribute[0].g for n in region if n.op_type in ("Loop", "Scan"))
    weight = next(
        n.input[1] for n in [*region, *loop_body.node] if n.op_type == "MatMul" and n.input[1] in inits
    )
    dims = (model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value, inits[weight].dims[1])
    used = {i for n in region for i in _inputs_with_subgraphs(n) if i not in produced}
    out = _copy(model)
    nodes = list(out.graph.node)
    first = nodes.index(next(n for n in nodes if n.name.startswith(_REGION)))
    stand_in = helper.make_node("MatMul", [rows, _STAND_IN], [result], name=_STAND_IN)
    del out.graph.node[:]
    out.graph.node.extend(
        [*nodes[:first], stand_in, *[n for n in nodes[first:] if not n.name.startswith(_REGION)]]
    )
    out.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, np.float32), _STAND_IN))
    return out, ([_copy_node(n) for n in region], [inits[i] for i in used if i in inits])


def _restore_chunked_encoder(
    model: onnx.ModelProto, region: tuple[list[onnx.NodeProto], list[onnx.TensorProto]]
) -> onnx.ModelProto:
    nodes, inits = region
    graph = model.graph
    kept = list(graph.node)
    position = kept.index(next(n for n in kept if n.name == _STAND_IN))
    del graph.node[:]
    graph.node.extend([*kept[:position], *nodes, *kept[position + 1 :]])
    present = {i.name for i in graph.initializer}
    others = [i for i in graph.initializer if i.name != _STAND_IN]
    del graph.initializer[:]
    graph.initializer.extend([*others, *[i for i in inits if i.name not in present]])
    return model


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _inputs_with_subgraphs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs and the outer-scope names its subgraphs read."""
    names = list(node.input)
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            names += [i for n in attr.g.node for i in _inputs_with_subgraphs(n)]
    return names


def to_fp16(model: onnx.ModelProto, keep_float32: tuple[str, ...]) -> onnx.ModelProto:
    """Weights and activations in float16; `patches` becomes a float16 input.

    Outputs named in `keep_float32` stay float32 (scores are compared and served as float32).
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(_copy(model))  # the converter edits in place; the fp32 model stays as is
    wrapped.convert_float_to_float16(keep_io_types=list(keep_float32))
    return wrapped.model


def to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantisation of the MatMul / Gemm / Attention weights (activations are
    quantised per call from their observed range; the convolutions of the patch encoder stay
    float32).

    Weights are 7-bit, per output channel (`reduce_range`, `per_channel`): x86 CPUs without VNNI
    (AVX2, AVX-512F) multiply u8 x s8 pairs into saturating 16-bit sums, which full-range
    weights overflow. On an AMD EPYC (AVX2) the official-size model's int8 file ranked 56 photos
    at SRCC 0.9285 against fp32 with full-range weights, 0.9961 with these (0.9977 with u8
    weights, 10 % slower): the file now scores alike on every CPU that may serve it, not only on
    the one that exported it (bench/results/PERFORMANCE.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" notice
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        quantize_dynamic(
            Path(src),
            Path(dst),
            op_types_to_quantize=["MatMul", "Gemm", "Attention"],
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        return onnx.load(dst)


def to_fp16_weights(model: onnx.ModelProto, min_elements: int = 1024) -> onnx.ModelProto:
    """Large float32 weights stored as float16 and cast back to float32 in the graph.

    Halves the file while every operation still computes in float32: ONNX Runtime folds the
    Casts into float32 constants when the session loads, so the only change is the weights'
    rounding to float16. Used for the explanation graph, whose heatmaps must stay faithful to
    the fp32 model (an fp16 compute graph would also round the attention probabilities).
    """
    from onnx import helper, numpy_helper

    out = _copy(model)
    graph = out.graph
    casts = []
    kept = []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and _elements(init) >= min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype("float16"), init.name + "_fp16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*casts, *nodes])
    return out


def _elements(init: onnx.TensorProto) -> int:
    n = 1
    for d in init.dims:
        n *= d
    return n


PLACEHOLDER = "ChunkedPatchEncoder"  # musiq:: domain node that export.graph traces for the encoder


def chunk_patch_encoder(
    model: onnx.ModelProto,
    body: onnx.ModelProto,
    embed: bool = False,
    slice_first: bool = False,
    op: str = "Scan",
) -> onnx.ModelProto:
    """Replaces the traced `musiq::ChunkedPatchEncoder` node (rows [M, P*P*3], embedding weight
    [F, D] and bias [D] -> [M, D]) by a Loop that runs `body` (the patch encoder's convolutions,
    [chunk, P*P*3] -> [chunk, F], static shapes) on `chunk` rows at a time, then one MatMul for
    the embedding over all rows.

    Why: each of the encoder's feature maps is 64 KiB per token; over a whole image (hundreds of
    tokens) every GroupNorm, ReLU, residual add and layout reorder is a pass through main memory.
    A chunk of a few tokens keeps them in the core's L2. The rows are zero-padded to a multiple of
    the chunk (the Loop stacks equal-shaped outputs) and the padding rows are sliced off after the
    embedding, where a row is D values instead of F. `embed` moves the embedding into the body
    too (an A/B variant: it re-reads the [F, D] weight once per chunk); `slice_first` drops the
    padding rows before the embedding instead (another variant: one more copy of the features).

    `op` "Scan" (default) hands each iteration a view of its chunk and writes its output straight
    into the stacked result; "Loop" (the first version, kept for the A/B) slices a copy of each
    chunk and concatenates the outputs at the end, one more pass over the 64 KiB per token.
    """
    if op not in ("Scan", "Loop"):
        raise ValueError(f"op must be Scan or Loop, not {op!r}")
    import numpy as np
    from onnx import helper, numpy_helper

    out = _copy(model)
    graph = out.graph
    nodes = [n for n in graph.node if n.op_type == PLACEHOLDER and n.domain == "musiq"]
    if len(nodes) != 1:
        raise ValueError(f"expected one musiq::{PLACEHOLDER} node, found {len(nodes)}")
    node = nodes[0]
    chunk = next(a.i for a in node.attribute if a.name == "chunk")
    rows, weight, bias = node.input
    (result,) = node.output
    p = "chunked_encoder/"

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), p + name))
        return p + name

    body_graph = onnx.GraphProto()
    body_graph.CopyFrom(body.graph)
    (body_in,) = [i.name for i in body_graph.input]
    (body_out,) = [o.name for o in body_graph.output]
    # Every name inside the body gets the prefix (no clash with the outer graph's names).
    rename = {body_in: p + "chunk"}
    for init in body_graph.initializer:
        rename[init.name] = p + init.name
        init.name = p + init.name
    for n in body_graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, p + name if name else name)
        for i, name in enumerate(n.output):
            n.output[i] = p + name
        n.name = p + n.name if n.name else n.name
    features = p + body_out
    if embed:
        body_graph.node.extend(
            [
                helper.make_node("MatMul", [features, weight], [p + "embedded_chunk"]),
                helper.make_node("Add", [p + "embedded_chunk", bias], [p + "embedded_chunk_b"]),
            ]
        )
        features = p + "embedded_chunk_b"
    c = const("chunk_size", [chunk])
    zero = const("zero", [0])
    axis0 = const("axis0", [0])
    pixels = body.graph.input[0].type.tensor_type.shape.dim[1].dim_value  # P*P*3
    if op == "Loop":  # the body slices its own chunk out of the outer padded rows
        lead = [
            helper.make_node("Unsqueeze", [p + "iter", axis0], [p + "iter1"]),
            helper.make_node("Mul", [p + "iter1", c], [p + "start"]),
            helper.make_node("Add", [p + "start", c], [p + "end"]),
            helper.make_node("Slice", [p + "padded", p + "start", p + "end", axis0], [p + "chunk"]),
            helper.make_node("Identity", [p + "cond"], [p + "cond_out"]),
        ]
        inputs = [
            helper.make_tensor_value_info(p + "iter", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info(p + "cond", onnx.TensorProto.BOOL, []),
        ]
        outputs = [helper.make_tensor_value_info(p + "cond_out", onnx.TensorProto.BOOL, [])]
    else:  # Scan hands the body each [chunk, P*P*3] slice of its input (a view, no copy)
        lead = []
        inputs = [helper.make_tensor_value_info(p + "chunk", onnx.TensorProto.FLOAT, [chunk, pixels])]
        outputs = []
    body_nodes = list(body_graph.node)
    del body_graph.node[:]
    body_graph.node.extend([*lead, *body_nodes])
    del body_graph.input[:]
    body_graph.input.extend(inputs)
    del body_graph.output[:]
    body_graph.output.extend(
        [*outputs, helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None)]
    )
    del body_graph.value_info[:]
    body_graph.name = "chunked_patch_encoder"
    # Main graph: pad rows to a multiple of the chunk, loop, embed, drop the padding rows.
    minus_one = const("minus_one", [-1])
    outer = [
        helper.make_node("Shape", [rows], [p + "m"], start=0, end=1),
        helper.make_node("Add", [p + "m", const("chunk_less_one", [chunk - 1])], [p + "m_up"]),
        helper.make_node("Div", [p + "m_up", c], [p + "iters1"]),
        helper.make_node("Squeeze", [p + "iters1", axis0], [p + "iters"]),
        helper.make_node("Mul", [p + "iters1", c], [p + "m_padded"]),
        helper.make_node("Sub", [p + "m_padded", p + "m"], [p + "pad_rows"]),
        helper.make_node("Concat", [zero, zero, p + "pad_rows", zero], [p + "pads"], axis=0),
        helper.make_node("Pad", [rows, p + "pads"], [p + "padded"]),
        helper.make_node("Loop", [p + "iters", ""], [p + "stacked"], body=body_graph)
        if op == "Loop"
        else helper.make_node(
            "Reshape", [p + "padded", const("chunks_shape", [-1, chunk, pixels])], [p + "chunks"]
        ),
    ]
    if op == "Scan":
        outer.append(
            helper.make_node("Scan", [p + "chunks"], [p + "stacked"], body=body_graph, num_scan_inputs=1)
        )
    if embed:
        outer += [
            helper.make_node("Shape", [bias], [p + "d"]),
            helper.make_node("Concat", [minus_one, p + "d"], [p + "shape_d"], axis=0),
            helper.make_node("Reshape", [p + "stacked", p + "shape_d"], [p + "embedded"]),
        ]
    else:
        outer += [
            helper.make_node("Shape", [p + "stacked"], [p + "f"], start=2, end=3),
            helper.make_node("Concat", [minus_one, p + "f"], [p + "shape_f"], axis=0),
            helper.make_node("Reshape", [p + "stacked", p + "shape_f"], [p + "flat"]),
        ]
        if slice_first:
            outer.append(helper.make_node("Slice", [p + "flat", zero, p + "m", axis0], [p + "rows_f"]))
        outer += [
            helper.make_node("MatMul", [p + ("rows_f" if slice_first else "flat"), weight], [p + "mm"]),
            helper.make_node("Add", [p + "mm", bias], [p + "embedded" if not slice_first else result]),
        ]
    if embed or not slice_first:
        outer.append(helper.make_node("Slice", [p + "embedded", zero, p + "m", axis0], [result]))
    for i, n in enumerate(outer):
        n.name = f"{p}node{i}"  # the region `fuse` sets aside while it fuses the transformer
    position = list(graph.node).index(node)
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend([*kept[:position], *outer, *kept[position + 1 :]])
    for i, opset in enumerate(out.opset_import):
        if opset.domain == "musiq":
            del out.opset_import[i]
            break
    return out
