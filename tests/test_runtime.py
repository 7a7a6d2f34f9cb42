"""The ONNX Runtime side of the service: self-configuration, batching parity, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.graph import ScoringGraph, export_graph
from export.metadata import MetadataError
from model.checkpoint import load_checkpoint
from model.network import build_model
from model.packing import collate, pack
from service.runtime import ModelRuntime, RuntimeOptions, choose_providers

WEIGHTS = Path(__file__).resolve().parents[1] / "model" / "weights"


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(120, 90), (300, 500), (64, 64), (40, 700)]
    ]


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return ModelRuntime(WEIGHTS / "default.onnx", RuntimeOptions(intra_op_threads=2))


def test_configures_itself_from_the_file(runtime: ModelRuntime) -> None:
    meta = runtime.metadata
    assert meta.name == "musiq-clive-small" and meta.precision == "fp32" and meta.head == "score"
    assert runtime.packing.longer_sides == (224, 384) and runtime.packing.max_native_tokens == 512
    assert runtime.providers == ["CPUExecutionProvider"]
    assert np.isfinite(runtime.warm_up().score)


def test_scores_equal_pytorch_on_the_source_checkpoint(runtime: ModelRuntime) -> None:
    model = build_model(load_checkpoint(WEIGHTS / "default.safetensors"))
    packed = [pack(img, runtime.packing) for img in images()]
    got = [p.score for p in runtime.predict(packed)]
    batch = collate(packed)
    with torch.inference_mode():
        out = model(*[torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)])
    np.testing.assert_allclose(got, model.score(out).numpy(), atol=1e-4)


def test_batched_equals_single_and_padding_multiple_is_harmless(runtime: ModelRuntime) -> None:
    packed = [pack(img, runtime.packing) for img in images()]
    single = [runtime.predict([p])[0].score for p in packed]
    padded = ModelRuntime(WEIGHTS / "default.onnx", RuntimeOptions(pad_multiple=64))
    np.testing.assert_allclose([p.score for p in runtime.predict(packed)], single, atol=1e-4)
    np.testing.assert_allclose([p.score for p in padded.predict(packed)], single, atol=1e-4)
    assert padded.padded_length(385) == 448


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load model"):
        ModelRuntime(tmp_path / "missing.onnx")
    bare = export_graph(
        ScoringGraph(build_model(load_checkpoint(WEIGHTS / "default.safetensors"))), tmp_path / "bare.onnx"
    )
    with pytest.raises(MetadataError, match="musiq export"):
        ModelRuntime(bare)


def test_provider_choice() -> None:
    assert (
        choose_providers(()) in (["CPUExecutionProvider"], [pytest.approx(None)])
        or choose_providers(())[-1] == "CPUExecutionProvider"
    )
    with pytest.raises(ValueError, match="not available"):
        choose_providers(("NoSuchExecutionProvider",))


def test_the_service_never_imports_torch() -> None:
    code = "import sys, service.batcher, service.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dropping_padding_rows_keeps_the_score(runtime: ModelRuntime) -> None:
    """The server computes `compact` images: fewer rows, the same scores as the official layout."""
    from model.packing import compact

    packed = [pack(img, runtime.packing) for img in images()]
    small = [compact(p) for p in packed]
    assert [s.num_tokens for s in small] == [p.num_valid for p in packed]
    assert sum(s.num_tokens for s in small) < sum(p.num_tokens for p in packed)
    full = [p.score for p in runtime.predict(packed)]
    dropped = [p.score for p in runtime.predict(small)]
    alone = [runtime.predict([s])[0].score for s in small]
    np.testing.assert_allclose(dropped, full, atol=1e-4)
    np.testing.assert_allclose(alone, full, atol=1e-4)


def test_cuda_provider_loads_nvidia_wheel_libraries_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path's logic, on a CPU: asking for CUDA preloads the libraries of NVIDIA's PyPI
    wheels (a plain venv has no other way to find them) before the provider is used."""
    from service import runtime

    calls: list[str] = []
    monkeypatch.setattr(
        runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(
        runtime.ort, "preload_dlls", lambda directory=None: calls.append(directory), raising=False
    )
    chosen = runtime.choose_providers()
    assert calls == [""]
    assert chosen[0][0] == "CUDAExecutionProvider" and chosen[-1] == "CPUExecutionProvider"
    calls.clear()
    assert runtime.choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"] and calls == []
