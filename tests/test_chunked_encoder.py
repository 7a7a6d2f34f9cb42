"""The patch encoder as a Scan (or Loop) over chunks of rows (export.optimize.chunk_patch_encoder): the same
function as the whole-batch graph for every row count (below, at and across chunk boundaries,
padded batches), in fp32, fp16 and int8, and a clear error where the graph has nothing to chunk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from export.exporter import session
from export.graph import ScoringGraph, export_graph
from export.optimize import chunk_patch_encoder, fuse, to_fp16, to_int8
from export.verify import ort_outputs, random_batch, torch_outputs
from model.network import Musiq
from tests.test_network import TINY, randomised

CHUNK = 4  # small, so that a few rows already cross several chunk boundaries
SHAPES = (
    (1, 1, "none"),
    (1, CHUNK, "none"),
    (1, CHUNK + 1, "none"),
    (3, 2 * CHUNK + 1, "heavy"),
    (2, 37, "none"),
)


@pytest.fixture(scope="module")
def model() -> Musiq:
    return randomised(TINY, seed=11)


@pytest.fixture(scope="module")
def files(model: Musiq, tmp_path_factory: pytest.TempPathFactory) -> dict[str, onnx.ModelProto]:
    d = tmp_path_factory.mktemp("chunked")
    out = {}
    for name, graph in {
        "whole": ScoringGraph(model, chunk=0),
        "chunked": ScoringGraph(model, chunk=CHUNK),
        "embed_in_chunk": ScoringGraph(model, chunk=CHUNK, embed_in_chunk=True),
        "slice_first": ScoringGraph(model, chunk=CHUNK, slice_first=True),
        "loop": ScoringGraph(model, chunk=CHUNK, encoder_op="Loop"),
    }.items():
        out[name] = fuse(onnx.load(export_graph(graph, d / f"{name}.onnx")), TINY.num_heads, TINY.hidden_size)
    return out


def test_chunked_graphs_are_well_formed(files: dict[str, onnx.ModelProto]) -> None:
    for name, model in files.items():
        loops = [n.op_type for n in model.graph.node if n.op_type in ("Loop", "Scan")]
        assert loops == ([] if name == "whole" else ["Loop" if name == "loop" else "Scan"]), name
        assert not [n for n in model.graph.node if n.domain == "musiq"]  # no placeholder left
        assert all(o.domain != "musiq" for o in model.opset_import)
        onnx.checker.check_model(model)
        # the transformer's fusions are those of the whole-batch graph (fuse sets the Loop aside)
        for op in ("SkipLayerNormalization", "Attention", "FastGelu"):
            counts = [sum(n.op_type == op for n in m.graph.node) for m in (model, files["whole"])]
            assert counts[0] == counts[1] > 0, (name, op, counts)


@pytest.mark.parametrize("variant", ["chunked", "embed_in_chunk", "slice_first", "loop"])
def test_chunked_equals_whole_batch_and_pytorch(
    files: dict[str, onnx.ModelProto], model: Musiq, variant: str
) -> None:
    whole, chunked = session(files["whole"]), session(files[variant])
    for i, (b, n, pad) in enumerate(SHAPES):
        batch = random_batch(b, n, pad, 32, TINY.grid_size, TINY.num_scales, seed=i)
        want = torch_outputs(model, batch)["score"]
        got = ort_outputs(chunked, batch)["score"]
        assert got.shape == (b,)
        assert np.abs(got - ort_outputs(whole, batch)["score"]).max() < 1e-5, (b, n, pad)
        assert np.abs(got - want).max() < 1e-4, (b, n, pad)


def test_reduced_precisions_run_the_loop(files: dict[str, onnx.ModelProto], model: Musiq) -> None:
    """fp16 converts the Scan body too (its convolutions compute in float16); int8 quantises the
    embedding outside the Scan. Both stay near the fp32 scores."""
    batch = random_batch(2, 2 * CHUNK + 3, "heavy", 32, TINY.grid_size, TINY.num_scales, seed=5)
    want = torch_outputs(model, batch)["score"]
    fp16 = to_fp16(files["chunked"], ("score",))
    body = next(n for n in fp16.graph.node if n.op_type == "Scan").attribute[0].g
    conv = next(n for n in body.node if n.op_type == "Conv")
    inits = {i.name: i for i in [*body.initializer, *fp16.graph.initializer]}
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT16
    int8 = to_int8(files["chunked"])
    assert any(n.op_type == "MatMulInteger" for n in int8.graph.node)
    spread = max(float(np.abs(want).max()), 1.0)
    for reduced in (fp16, int8):
        got = ort_outputs(session(reduced), batch)["score"]
        assert np.abs(got - want).max() < 0.05 * spread


def test_a_graph_without_the_placeholder_is_refused(
    files: dict[str, onnx.ModelProto], tmp_path: Path
) -> None:
    body = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    with pytest.raises(ValueError, match="ChunkedPatchEncoder"):
        chunk_patch_encoder(files["whole"], body)
    with pytest.raises(ValueError, match="Scan or Loop"):
        chunk_patch_encoder(files["whole"], body, op="Map")
