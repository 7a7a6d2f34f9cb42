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
    optimizer = BertOnnxModel(_copy(model), num_heads=num_heads, hidden_size=hidden_size)
    optimizer.optimize(FusionOptions("bert"), add_dynamic_axes=False)
    optimizer.topological_sort()
    return optimizer.model


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
    float32)."""
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
            per_channel=False,
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
