"""The scoring graph's two CPU halves (`musiq export --split`, `service.split`, issue 19): the
features half with its GroupNorm scales folded, the head, the runtime that runs the first over
chunks of rows in parallel, and when it must refuse them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.exporter import _SplitSession, export_checkpoint
from export.graph import FeatureGraph, export_split
from export.metadata import split_paths
from export.verify import check_shapes
from model.checkpoint import save_checkpoint
from model.config import MusiqConfig
from model.decode import decode_image
from model.network import Musiq, to_checkpoint
from model.packing import compact, pack
from service.runtime import ModelRuntime, RuntimeOptions
from service.settings import EMBEDDED_ONNX
from tests.helpers import jpeg
from tests.test_network import TINY, randomised

SHAPES = ((1, 1, "none"), (3, 70, "heavy"), (2, 300, "none"))


def negative_scales(model: Musiq, names: tuple[str, ...]) -> Musiq:
    """Flips a few channels' GroupNorm scale below zero, where folding would be wrong."""
    with torch.no_grad():
        for name in names:
            norm = model.get_submodule(name)
            norm.weight[::7] *= -1
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("split")
    ckpt = save_checkpoint(
        to_checkpoint(randomised(TINY, seed=3), name="tiny", version="1"), d / "tiny.safetensors"
    )
    other = save_checkpoint(
        to_checkpoint(randomised(TINY, seed=5), name="tiny", version="2"), d / "other.safetensors"
    )
    out = d / "tiny.onnx"
    export_checkpoint(ckpt, out, split=True, photos=[], shapes=SHAPES, log=lambda s: None)
    return {"model": out, "checkpoint": ckpt, "other": other, "dir": d}


def images(n: int) -> list[np.ndarray]:
    return [decode_image(jpeg(40 + 23 * i, 60 + 31 * i, seed=i)) for i in range(n)]


def test_export_writes_both_halves_with_the_models_metadata(exported: dict[str, Path]) -> None:
    features, head = split_paths(exported["model"])
    assert features.name == "tiny.features.onnx" and head.name == "tiny.head.onnx"
    whole = ModelRuntime(exported["model"], RuntimeOptions(split_encoder=False))
    split = ModelRuntime(exported["model"])
    assert whole.split is None and split.split is not None
    assert split.split.width == 8 * 8 * 256  # the bottleneck unit's maps, (c, h, w)


@pytest.mark.parametrize(("workers", "chunk"), [(1, 32), (2, 1), (2, 7), (3, 64)])
def test_split_scores_equal_the_whole_graph(exported: dict[str, Path], workers: int, chunk: int) -> None:
    whole = ModelRuntime(exported["model"], RuntimeOptions(split_encoder=False))
    split = ModelRuntime(exported["model"], RuntimeOptions(intra_op_threads=workers, encoder_chunk=chunk))
    assert split.split is not None and split.split.workers == workers
    packed = [compact(pack(img, whole.packing)) for img in images(3)]
    for batch in ([packed[0]], packed, [pack(images(1)[0], whole.packing)]):  # padded rows: 2nd, 3rd
        want = [p.score for p in whole.predict(batch)]
        got = [p.score for p in split.predict(batch)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_concurrent_calls_share_the_workers(exported: dict[str, Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    split = ModelRuntime(exported["model"], RuntimeOptions(intra_op_threads=2, encoder_chunk=5))
    packed = [compact(pack(img, split.packing)) for img in images(4)]
    alone = [split.predict([p])[0].score for p in packed]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: split.predict([p])[0].score, packed * 3))
    np.testing.assert_array_equal(together, alone * 3)


def test_scales_fold_only_where_exact() -> None:
    positive = FeatureGraph(randomised(TINY, seed=1))
    assert positive.folded == {"root": True, "gn1": True, "gn2": True, "out": True}
    model = negative_scales(
        randomised(TINY, seed=1), ("patch_encoder.root.norm", "patch_encoder.block.gn_proj")
    )
    mixed = FeatureGraph(model)
    assert mixed.folded == {"root": False, "gn1": True, "gn2": True, "out": False}
    conv = FeatureGraph(randomised(TINY.replace(patch_encoder="conv"), seed=1))
    assert not any(conv.folded.values())  # its maps go straight to the embedding


@pytest.mark.parametrize(
    "config,flip",
    [
        (TINY, ()),
        (TINY, ("patch_encoder.root.norm", "patch_encoder.block.gn1", "patch_encoder.block.gn_proj")),
        (TINY, ("patch_encoder.block.gn3",)),
        (TINY.replace(patch_encoder="conv"), ()),
    ],
)
def test_halves_compose_to_the_network(tmp_path: Path, config: MusiqConfig, flip: tuple[str, ...]) -> None:
    model = negative_scales(randomised(config, seed=2), flip).eval()
    halves = export_split(model, tmp_path / "f.onnx", tmp_path / "h.onnx")
    import onnx

    features = onnx.load(halves[0])
    composed = _SplitSession(features, onnx.load(halves[1]))
    checks = check_shapes(composed, model, SHAPES, real=images(2))  # type: ignore[arg-type]
    assert max(c.max_abs_diff for c in checks) < 1e-4, checks
    if config.patch_encoder != "conv":  # a unit's last operator writes the rows: a Reshape would copy
        last = features.graph.node[-1]
        assert last.op_type != "Reshape" and list(last.output) == ["features"], last.op_type


def test_halves_of_another_checkpoint_are_ignored(
    exported: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "tiny.onnx"
    shutil.copy(exported["model"], model)
    export_checkpoint(
        exported["other"], tmp_path / "stale.onnx", split=True, photos=[], shapes=SHAPES, log=lambda s: None
    )
    for src, dst in zip(split_paths(tmp_path / "stale.onnx"), split_paths(model), strict=True):
        shutil.move(src, dst)
    with caplog.at_level(logging.WARNING, logger="service.runtime"):
        runtime = ModelRuntime(model)
    assert runtime.split is None
    assert "source_sha256 differs" in caplog.text


def test_halves_beside_another_precision_are_ignored(exported: dict[str, Path], tmp_path: Path) -> None:
    from export.photos import distorted_photos

    model = tmp_path / "tiny.onnx"
    few = distorted_photos(limit=4, longer_side=160)
    export_checkpoint(
        exported["checkpoint"],
        model,
        precision="int8",
        photos=few,
        shapes=SHAPES,
        min_int8_srcc=-1,
        log=lambda s: None,
    )
    for src, dst in zip(split_paths(exported["model"]), split_paths(model), strict=True):
        shutil.copy(src, dst)
    assert ModelRuntime(model).split is None


def test_int8_halves_quantise_the_head_and_score_as_the_int8_file(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    """The features half stays float32 (as the whole int8 file's convolutions), the head is
    quantised like the whole file, and each image scores as the whole int8 file does, within that
    file's own deviation from fp32 (the activations' int8 ranges follow float32 rounding)."""
    import onnx

    from export.photos import distorted_photos

    model = tmp_path / "tiny8.onnx"
    result = export_checkpoint(
        exported["checkpoint"],
        model,
        precision="int8",
        split=True,
        photos=distorted_photos(limit=8, longer_side=160),
        shapes=SHAPES,
        min_int8_srcc=0.5,
        log=lambda s: None,
    )
    features, head = ({n.op_type for n in onnx.load(p).graph.node} for p in split_paths(model))
    assert "MatMulInteger" in head and not features & {"MatMulInteger", "DynamicQuantizeLinear"}
    assert result.metadata.parity["int8_split_vs_fp32"]["images"] == 8
    whole = ModelRuntime(model, RuntimeOptions(split_encoder=False))
    split = ModelRuntime(model)
    assert split.split is not None
    bound = result.metadata.parity["int8_vs_fp32"]["max_abs_dev"]
    for p in (compact(pack(img, whole.packing)) for img in images(3)):
        np.testing.assert_allclose(split.predict([p])[0].score, whole.predict([p])[0].score, atol=bound)


def test_split_needs_fp32_or_int8(exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp32 or int8"):
        export_checkpoint(
            exported["checkpoint"], tmp_path / "x.onnx", precision="fp16", split=True, photos=[]
        )


def test_the_embedded_model_ships_its_halves_and_they_agree() -> None:
    whole = ModelRuntime(EMBEDDED_ONNX, RuntimeOptions(split_encoder=False))
    split = ModelRuntime(EMBEDDED_ONNX)
    assert split.split is not None
    packed = compact(pack(images(3)[2], whole.packing))
    assert abs(whole.predict([packed])[0].score - split.predict([packed])[0].score) < 1e-4


def test_padded_rows_never_carry_stale_values(exported: dict[str, Path]) -> None:
    """The feature array is reused between calls: padded rows must be zeroed, not left as the
    last call's (here NaN) values, which the key mask would not keep out of the softmax."""
    whole = ModelRuntime(exported["model"], RuntimeOptions(split_encoder=False))
    split = ModelRuntime(exported["model"], RuntimeOptions(intra_op_threads=2, encoder_chunk=8))
    assert split.split is not None
    packed = [compact(pack(img, whole.packing)) for img in images(3)]
    length = max(p.num_tokens for p in packed)
    split.split._buffer(len(packed) * length).fill(np.nan)
    got = [p.score for p in split.predict(packed)]
    np.testing.assert_allclose(got, [p.score for p in whole.predict(packed)], rtol=0, atol=1e-5)


def test_a_wrong_split_is_refused_and_nothing_is_written(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exporter checks the halves against PyTorch before writing any file: a features half
    whose folding forgot the convolutions (scores off by far more than the bound) is refused."""
    from export import graph
    from export.exporter import ExportRefused

    def forgetful_fold(self: FeatureGraph, name: str, norm: torch.nn.GroupNorm, after: object) -> bool:
        shift = torch.nn.Parameter((norm.bias / norm.weight)[:, None, None].clone(), requires_grad=False)
        self.register_parameter(name + "_shift", shift)  # the shift, without scaling `after`
        self.folded[name] = True
        return True

    monkeypatch.setattr(graph.FeatureGraph, "_fold", forgetful_fold)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(ExportRefused, match="split halves"):
        export_checkpoint(
            exported["checkpoint"], out, split=True, photos=[], shapes=SHAPES, log=lambda s: None
        )
    assert list(tmp_path.iterdir()) == []


def test_a_linear_encoder_has_nothing_to_split(tmp_path: Path) -> None:
    ckpt = save_checkpoint(
        to_checkpoint(randomised(TINY.replace(patch_encoder="linear"), seed=1), name="lin", version="1"),
        tmp_path / "lin.safetensors",
    )
    with pytest.raises(ValueError, match="linear patch encoder"):
        export_checkpoint(ckpt, tmp_path / "lin.onnx", split=True, photos=[], shapes=SHAPES)
    assert not (tmp_path / "lin.onnx").exists()
