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


# ------------------------------------------------------------------ the CUDA path's logic, on CPU


def test_device_defaults_follow_the_provider_and_settings_override_them() -> None:
    """CPU keeps its measured batching; a CUDA session gets the GPU values; a value given wins."""
    from service.runtime import CPU_DEFAULTS, GPU_DEFAULTS
    from service.settings import ServiceSettings

    cpu = ServiceSettings().batcher_config("CPUExecutionProvider")
    gpu = ServiceSettings().batcher_config("CUDAExecutionProvider")
    assert (cpu.max_batch_size, cpu.max_batch_tokens, cpu.max_queue_delay_s) == (4, 16384, 0.004)
    assert (gpu.max_batch_size, gpu.max_batch_tokens) == (
        GPU_DEFAULTS.max_batch_size,
        GPU_DEFAULTS.max_batch_tokens,
    )
    assert gpu.max_queue_delay_s == GPU_DEFAULTS.max_queue_delay_s
    assert ServiceSettings().batcher_config() == cpu
    given = ServiceSettings(max_batch_size=8, max_queue_delay_s=0.0).batcher_config("CUDAExecutionProvider")
    assert (given.max_batch_size, given.max_queue_delay_s, given.max_batch_tokens) == (8, 0.0, 65536)
    assert CPU_DEFAULTS.pad_multiple == 1 and not CPU_DEFAULTS.io_binding
    assert GPU_DEFAULTS.pad_multiple == 64 and GPU_DEFAULTS.io_binding


def test_cpu_runtime_keeps_session_run_unless_binding_is_asked_for(runtime: ModelRuntime) -> None:
    # The embedded model has its split halves (tests/test_split.py): the CPU default runs them.
    assert runtime.pad_multiple == 1 and runtime.pool is None
    assert runtime.host_memory == "split halves (features: 2 single-threaded sessions, 32 rows a call)"
    whole = ModelRuntime(WEIGHTS / "default.onnx", RuntimeOptions(intra_op_threads=2, split_encoder=False))
    assert whole.pool is None and whole.host_memory == "session.run"
    bound = ModelRuntime(WEIGHTS / "default.onnx", RuntimeOptions(intra_op_threads=2, io_binding=True))
    assert bound.host_memory == "io_binding (pageable)" and bound.split is None


@pytest.fixture(scope="module")
def bound() -> ModelRuntime:
    """The IO-binding path on CPU: the code CUDA runs, minus the page-locking."""
    return ModelRuntime(
        WEIGHTS / "default.onnx", RuntimeOptions(intra_op_threads=2, io_binding=True, pad_multiple=64)
    )


def test_bound_scores_equal_session_run(runtime: ModelRuntime, bound: ModelRuntime) -> None:
    from model.packing import compact

    packed = [compact(pack(img, runtime.packing)) for img in images()]
    plain = ModelRuntime(WEIGHTS / "default.onnx", RuntimeOptions(intra_op_threads=2, pad_multiple=64))
    want = [p.score for p in plain.predict(packed)]
    # different lengths and batch sizes in turn, through the same reused buffers
    for batch in (packed, packed[:1], packed[2:], packed[::-1], packed):
        got = [p.score for p in bound.predict(batch)]
        expect = [p.score for p in plain.predict(batch)]
        np.testing.assert_allclose(got, expect, rtol=0, atol=1e-5)
    np.testing.assert_allclose([p.score for p in bound.predict(packed)], want, atol=1e-5)
    assert bound.pool is not None and bound.pool.made == 1  # one buffer set served every call


class RecordingPinner:
    """A stand-in for `CudaHostPinner` that records which buffers it locked and unlocked."""

    pinned = True

    def __init__(self) -> None:
        self.locked: dict[int, int] = {}  # address -> bytes
        self.events: list[str] = []

    def register(self, buffer: np.ndarray) -> None:
        self.locked[buffer.ctypes.data] = buffer.nbytes
        self.events.append("register")

    def unregister(self, buffer: np.ndarray) -> None:
        assert self.locked.pop(buffer.ctypes.data) == buffer.nbytes  # only what was locked, whole
        self.events.append("unregister")


def test_bound_inputs_fill_like_collate_and_grow_by_bucket_only(runtime: ModelRuntime) -> None:
    """Buffers are written exactly as `collate` pads (stale rows of a longer earlier batch are
    zeroed), patches cast to the model's float16 in the same pass, and memory is locked only when a
    buffer grows: a smaller batch reuses the same, still-locked memory."""
    from service.runtime import BoundInputs, InputSpec, capacity_for

    specs = [
        InputSpec("patches", np.dtype(np.float16), 3072),
        InputSpec("spatial", np.dtype(np.int32), None),
        InputSpec("scale", np.dtype(np.int32), None),
        InputSpec("mask", np.dtype(np.bool_), None),
    ]
    pinner = RecordingPinner()
    inputs = BoundInputs(specs, pinner, granule_tokens=1024)
    packed = [pack(img, runtime.packing) for img in images()]
    big = inputs.fill(packed, 512)
    first = {name: a.ctypes.data for name, a in big.items()}
    assert inputs.capacity == capacity_for(4 * 512, 1024) == 2048 and inputs.grown == 1
    assert pinner.events == ["register"] * 4 and len(pinner.locked) == 4
    assert max(p.num_tokens for p in packed) <= 512
    for batch in (packed[2:3], packed[:2], packed[1:], packed[::-1]):
        length = -(-max(p.num_tokens for p in batch) // 64) * 64
        arrays = inputs.fill(batch, length)
        want = collate(batch, pad_to=length)
        assert arrays["patches"].dtype == np.float16 and arrays["patches"].shape == (len(batch), length, 3072)
        np.testing.assert_array_equal(arrays["patches"], want.patches.astype(np.float16))
        for name in ("spatial", "scale", "mask"):
            np.testing.assert_array_equal(arrays[name], getattr(want, name))
        assert {name: a.ctypes.data for name, a in arrays.items()} == first  # the same memory
    assert inputs.grown == 1 and pinner.events == ["register"] * 4
    with pytest.raises(ValueError, match="shorter than"):
        inputs.fill(packed, 64)
    inputs.fill(packed + packed, 512)  # 4096 tokens: the next power of two of granules
    assert inputs.capacity == 4096 and inputs.grown == 2
    assert pinner.events == ["register"] * 4 + ["unregister"] * 4 + ["register"] * 4
    inputs.release()
    assert pinner.locked == {}


def test_pool_gives_concurrent_calls_their_own_buffers() -> None:
    from service.runtime import BufferPool, InputSpec, NoPinning

    pool = BufferPool([InputSpec("mask", np.dtype(np.bool_), None)], NoPinning())
    with pool.acquire() as a, pool.acquire() as b:
        assert a is not b
    with pool.acquire() as c:
        assert c in (a, b)
    assert pool.made == 2


def test_cuda_pinner_locks_through_the_cuda_runtime_or_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudaHostRegister/Unregister get the buffer's address and size (portable flag); no CUDA
    runtime, or a refusal, leaves buffers pageable instead of failing the model."""
    import ctypes

    from service import runtime as rt

    calls: list[tuple[str, int, int]] = []

    class FakeFunction:
        def __init__(self, name: str, status: int) -> None:
            self.name, self.status, self.argtypes = name, status, None

        def __call__(self, *args: int) -> int:
            calls.append((self.name, *args))  # type: ignore[arg-type]
            return self.status

    class FakeCudart:
        def __init__(self, status: int) -> None:
            self.cudaHostRegister = FakeFunction("register", status)
            self.cudaHostUnregister = FakeFunction("unregister", 0)

    buffer = np.zeros(1000, np.float16)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeCudart(0))
    pinner = rt.CudaHostPinner()
    pinner.register(buffer)
    pinner.unregister(buffer)
    assert pinner.pinned
    assert calls == [("register", buffer.ctypes.data, 2000, 1), ("unregister", buffer.ctypes.data)]

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeCudart(2))  # cudaErrorMemoryAllocation
    refused = rt.CudaHostPinner()
    refused.register(buffer)
    assert not refused.pinned

    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert not rt.CudaHostPinner().pinned


def test_cuda_libraries_found_beside_a_target_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnxruntime-gpu installed with `pip --target` apart from PyTorch's NVIDIA wheels (the GPU
    test host): each wheel's lib folder is handed to preload_dlls; installed together: the default."""
    from service import runtime as rt

    (tmp_path / "site" / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (tmp_path / "site" / "nvidia" / "cudnn" / "lib").mkdir(parents=True)
    found = rt.nvidia_library_dirs([str(tmp_path / "site" / "nvidia")])
    assert found == {
        "cuda": tmp_path / "site" / "nvidia" / "cu13" / "lib",
        "cudnn": tmp_path / "site" / "nvidia" / "cudnn" / "lib",
    }
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(rt.ort, "preload_dlls", lambda **kw: calls.append(kw), raising=False)
    monkeypatch.setattr(rt, "nvidia_library_dirs", lambda: found)
    monkeypatch.setattr(rt.ort, "__file__", str(tmp_path / "target" / "onnxruntime" / "__init__.py"))
    rt.load_cuda_libraries()
    assert calls == [
        {"cuda": True, "cudnn": False, "directory": str(found["cuda"])},
        {"cuda": False, "cudnn": True, "directory": str(found["cudnn"])},
    ]
    calls.clear()
    monkeypatch.setattr(rt.ort, "__file__", str(tmp_path / "site" / "onnxruntime" / "__init__.py"))
    rt.load_cuda_libraries()
    assert calls == [{"directory": ""}]


def test_fp16_model_bound_equals_session_run(tmp_path: Path) -> None:
    """The fp16 export (what the GPU serves) through IO binding: float16 patch buffers, the same
    scores as `session.run` on the same file, and close to the fp32 model."""
    import onnx

    from export.optimize import to_fp16

    fp32 = onnx.load(WEIGHTS / "default.onnx")
    half = to_fp16(fp32, keep_float32=tuple(o.name for o in fp32.graph.output))
    onnx.save(half, tmp_path / "half.onnx")
    plain = ModelRuntime(tmp_path / "half.onnx", RuntimeOptions(intra_op_threads=2))
    bound = ModelRuntime(tmp_path / "half.onnx", RuntimeOptions(intra_op_threads=2, io_binding=True))
    assert plain.float16 and bound.pool is not None
    assert {s.name: s.dtype for s in bound.pool.specs}["patches"] == np.float16
    packed = [pack(img, plain.packing) for img in images()]
    got = [p.score for p in bound.predict(packed)]
    np.testing.assert_allclose(got, [p.score for p in plain.predict(packed)], atol=1e-6)
    full = ModelRuntime(WEIGHTS / "default.onnx", RuntimeOptions(intra_op_threads=2))
    np.testing.assert_allclose(got, [p.score for p in full.predict(packed)], atol=0.05)


def test_big_batches_fill_in_parallel_and_equal_collate(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threaded fill (every FILL_THREADS-th image per thread) writes what `collate` would."""
    from service import runtime as rt

    monkeypatch.setattr(rt, "FILL_ITEMS_PER_THREAD", 1)
    used: list[str] = []
    real_pool = rt._fill_pool

    class Spy:
        def map(self, fn, parts):  # type: ignore[no-untyped-def]
            used.extend(str(p) for p in parts)
            return real_pool().map(fn, parts)

    monkeypatch.setattr(rt, "_fill_pool", Spy)
    specs = [
        rt.InputSpec(n, np.dtype(t), w)
        for n, t, w in [("patches", np.float32, 3072), ("mask", np.bool_, None)]
    ]
    packed = [pack(img, runtime.packing) for img in images()] * 2
    arrays = rt.BoundInputs(specs, rt.NoPinning()).fill(packed, 512)
    assert len(used) == 4  # four threads' shares
    want = collate(packed, pad_to=512)
    np.testing.assert_array_equal(arrays["patches"], want.patches)
    np.testing.assert_array_equal(arrays["mask"], want.mask)
