"""ONNX files whose weights are external data inside the checkpoint (`export.external`): the
embedded default model's two graphs, and linking a fresh export bit for bit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.external import LINK_PROP, LinkError, link_file, linked_location, read_safetensors_index
from model.checkpoint import EMBEDDED_DEFAULT, file_sha256
from service.explain import RolloutRuntime, rollout_path
from service.runtime import ModelRuntime
from service.settings import EMBEDDED_ONNX

EMBEDDED_GRAPHS = (EMBEDDED_ONNX, rollout_path(EMBEDDED_ONNX))


def external_ranges(model: onnx.ModelProto) -> list[tuple[int, int]]:
    ranges = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            ranges.append((int(info["offset"]), int(info["length"])))
    return ranges


@pytest.mark.parametrize("path", EMBEDDED_GRAPHS, ids=lambda p: p.name)
def test_embedded_graphs_read_their_weights_from_the_checkpoint_beside_them(path: Path) -> None:
    """Each weight is stored once, in default.safetensors; the references still fit that file
    (a checkpoint rewritten without relinking would change its sha256 and its tensor ranges)."""
    model = onnx.load(str(path), load_external_data=False)
    assert path.stat().st_size < 2**20
    assert linked_location(model) == {EMBEDDED_DEFAULT.name}
    props = {p.key: p.value for p in model.metadata_props}
    sha = file_sha256(EMBEDDED_DEFAULT)
    assert json.loads(props[LINK_PROP]) == {"location": EMBEDDED_DEFAULT.name, "sha256": sha}
    assert props["musiq.source_sha256"] == sha
    index, _ = read_safetensors_index(EMBEDDED_DEFAULT)
    stored = {(t.offset, t.length) for t in index.values()}
    ranges = external_ranges(model)
    assert ranges and set(ranges) <= stored
    assert sum(length for _, length in set(ranges)) > 0.9 * EMBEDDED_DEFAULT.stat().st_size


def test_embedded_model_loads_by_relative_path_from_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime resolves the external data against the model's folder, not the working one."""
    monkeypatch.chdir(tmp_path)
    runtime = ModelRuntime(os.path.relpath(EMBEDDED_ONNX, tmp_path))
    assert np.isfinite(runtime.warm_up().score)


def test_a_graph_whose_checkpoint_changed_is_refused(tmp_path: Path) -> None:
    """Rewriting the checkpoint without relinking would mix two models: the runtime refuses."""
    shutil.copy(EMBEDDED_ONNX, tmp_path)
    changed = tmp_path / EMBEDDED_DEFAULT.name
    data = bytearray(EMBEDDED_DEFAULT.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    changed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="has changed since it was linked"):
        ModelRuntime(tmp_path / EMBEDDED_ONNX.name)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random checkpoint exported (with its rollout graph) into the checkpoint's folder."""
    pytest.importorskip("torch")
    from export.exporter import export_checkpoint
    from export.photos import distorted_photos
    from model.checkpoint import save_checkpoint
    from model.network import to_checkpoint
    from tests.test_network import TINY, randomised

    d = tmp_path_factory.mktemp("linked")
    ckpt = save_checkpoint(
        to_checkpoint(randomised(TINY, seed=5), name="t", version="1"), d / "t.safetensors"
    )
    result = export_checkpoint(
        ckpt,
        d / "t.onnx",
        rollout=True,
        photos=distorted_photos(limit=2, longer_side=160),
        shapes=((1, 1, "none"), (2, 300, "heavy")),
        log=lambda s: None,
    )
    assert result.rollout_path is not None
    inline = d / "inline"
    inline.mkdir()
    for f in (result.path, result.rollout_path):
        shutil.copy(f, inline / f.name)
    return {"checkpoint": ckpt, "score": result.path, "rollout": result.rollout_path, "inline": inline}


def test_linking_a_fresh_export_changes_no_output_bit(tiny_export: dict[str, Path]) -> None:
    from model.decode import decode_image
    from model.packing import compact, pack
    from tests.helpers import jpeg

    for kind in ("score", "rollout"):
        path = tiny_export[kind]
        before = path.stat().st_size
        stats = link_file(path, tiny_export["checkpoint"])  # also verifies bit-identity itself
        assert stats.linked >= 10 and stats.derived >= 5 and path.stat().st_size < before / 3
        assert linked_location(onnx.load(str(path), load_external_data=False)) == {"t.safetensors"}

    pixels = decode_image(jpeg(240, 320, seed=3))
    old = ModelRuntime(tiny_export["inline"] / "t.onnx")
    new = ModelRuntime(tiny_export["score"])
    packed = pack(pixels, new.packing)
    assert new.predict([compact(packed), packed]) == old.predict([compact(packed), packed])
    old_roll = RolloutRuntime(tiny_export["inline"] / "t.rollout.onnx")
    new_roll = RolloutRuntime(tiny_export["rollout"])
    np.testing.assert_array_equal(new_roll.rollout(packed), old_roll.rollout(packed))
    assert new.metadata == old.metadata  # the musiq.* metadata is kept as it was


def test_a_linked_file_read_by_onnx_is_self_contained_again(
    tiny_export: dict[str, Path], tmp_path: Path
) -> None:
    link_file(tiny_export["score"], tiny_export["checkpoint"])  # relinking a linked file is fine
    copy = tmp_path / "alone.onnx"
    onnx.save(onnx.load(str(tiny_export["score"])), copy)  # onnx.load reads the external data in
    assert linked_location(onnx.load(str(copy), load_external_data=False)) == set()
    assert ModelRuntime(copy).warm_up() == ModelRuntime(tiny_export["inline"] / "t.onnx").warm_up()


def test_a_checkpoint_outside_the_model_folder_is_refused(
    tiny_export: dict[str, Path], tmp_path: Path
) -> None:
    model = tmp_path / "sub" / "m.onnx"
    model.parent.mkdir()
    shutil.copy(tiny_export["inline"] / "t.onnx", model)
    before = model.read_bytes()
    with pytest.raises(LinkError, match="outside"):
        link_file(model, tiny_export["checkpoint"])
    assert model.read_bytes() == before
