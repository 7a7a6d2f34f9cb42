"""One exported model in ONNX Runtime: configured from the file alone, warmed up, batched.

The file's `musiq.*` metadata (written by `musiq export`) gives the packing, the head, the score
range, names and precision, so loading needs nothing but the path. Execution provider: CUDA when
ONNX Runtime has it (heuristic cuDNN algorithm search and a same-as-requested arena, which suit
inputs whose token count changes every batch), else CPU with explicit thread counts.

On CUDA a batch goes through IO binding (`BoundInputs`): the batch is written straight into
reusable host buffers, page-locked once per buffer (`CudaHostPinner`), which ONNX Runtime then
copies to the GPU by DMA; `session.run` would allocate, fill and copy fresh pageable arrays for
every batch. The binding code is the same on CPU (tests/test_runtime.py runs it there); only the
pinning is CUDA's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from export.metadata import LINKED_CHECKPOINT, ModelMetadata, split_paths
from model.packing import PackedImage, collate, write_rows
from service.split import DEFAULT_CHUNK, SplitModel, split_problem

logger = logging.getLogger(__name__)

GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


@dataclass(frozen=True)
class DeviceDefaults:
    """Batching defaults for the kind of device a model runs on; a setting given overrides each.

    CPU: a batch costs about the sum of its images (bench/results/PERFORMANCE.md), so batches stay
    small (4) and exact-length (no padding multiple): batching only adds memory and waiting.
    GPU: one launch of 64 images costs little more than one of 8, so batching is the lever:
    up to 64 images and 64 Ki tokens a batch (64 images of 1,024 tokens, the most a mixed-size
    image gets under the server's native-token cap of 512), a 5 ms wait to fill one, and lengths
    rounded up to 64 tokens so cuDNN/cuBLAS plan once per 64-token shape instead of once per length.
    IO binding pays where a copy to the device follows (GPU), not on CPU, where `session.run`
    reads the arrays in place.
    """

    max_batch_size: int
    max_batch_tokens: int
    max_queue_delay_s: float
    pad_multiple: int
    io_binding: bool


CPU_DEFAULTS = DeviceDefaults(
    max_batch_size=4, max_batch_tokens=16384, max_queue_delay_s=0.004, pad_multiple=1, io_binding=False
)
GPU_DEFAULTS = DeviceDefaults(
    max_batch_size=64, max_batch_tokens=65536, max_queue_delay_s=0.005, pad_multiple=64, io_binding=True
)


def device_defaults(provider: str) -> DeviceDefaults:
    """The defaults for a model whose first (main) execution provider is `provider`."""
    return GPU_DEFAULTS if provider in GPU_PROVIDERS else CPU_DEFAULTS


@dataclass(frozen=True)
class RuntimeOptions:
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 1
    # ORT's worker threads busy-wait for work between operators unless told not to: fastest on an
    # idle machine, but in a server the spinning steals the cores that decode and pack the next
    # requests (see bench/results/PERFORMANCE.md), so it is off by default.
    spin_threads: bool = False
    providers: tuple[str, ...] = ()  # empty: CUDA if available, else CPU
    # Round the padded token count up to a multiple of this (GPU: fewer distinct shapes to tune).
    # None: the device's default (`device_defaults`), known once the session has its provider.
    pad_multiple: int | None = None
    # Feed batches through IO binding into reused (on CUDA: page-locked) buffers. None: the device's default.
    io_binding: bool | None = None
    # On a CPU, run NAME.features.onnx / NAME.head.onnx (when exported beside the model) instead
    # of the whole graph: the patch encoder in cache-sized chunks of rows (`service.split`).
    split_encoder: bool = True
    encoder_chunk: int = DEFAULT_CHUNK


@dataclass(frozen=True)
class Prediction:
    score: float
    distribution: tuple[float, ...] | None = None


def nvidia_library_dirs(search_path: Sequence[str] | None = None) -> dict[str, Path]:
    """The `lib` folders of NVIDIA's CUDA wheels on the Python path: {"cuda": .., "cudnn": ..}.

    CUDA 13's wheels keep the toolkit's libraries in `nvidia/cu13/lib` (CUDA 12's: one package
    each, `nvidia/cublas/lib`, ...) and cuDNN in `nvidia/cudnn/lib`. Found through the `nvidia`
    namespace package, so they may live in another site-packages than onnxruntime (a `pip install
    --target` next to a PyTorch venv, as on the GPU test host).
    """
    if search_path is None:
        spec = importlib.util.find_spec("nvidia")
        search_path = list(spec.submodule_search_locations or []) if spec is not None else []
    found: dict[str, Path] = {}
    for root in map(Path, search_path):
        for kind, names in (("cuda", ("cu13", "cu12", "cuda_runtime")), ("cudnn", ("cudnn",))):
            for name in names:
                lib = root / name / "lib"
                if kind not in found and lib.is_dir():
                    found[kind] = lib
    return found


def load_cuda_libraries() -> None:
    """Loads CUDA and cuDNN from NVIDIA's PyPI wheels (`onnxruntime-gpu[cuda,cudnn]`) if present.

    In a plain venv nothing else tells the dynamic linker where those wheels keep their libraries,
    and the CUDA provider would then fail to load. The container image also registers them with
    ldconfig; loading libraries that are already found is harmless. When onnxruntime is installed
    apart from the wheels (`pip install --target`, so `preload_dlls` would look beside itself and
    miss them), each wheel's folder is given to `preload_dlls` explicitly.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    beside = Path(ort.__file__).resolve().parent.parent / "nvidia"
    dirs = nvidia_library_dirs()
    if beside.is_dir() or not dirs:
        preload(directory="")  # "": NVIDIA's site-packages folders first, then the default paths
        return
    if "cuda" in dirs:
        preload(cuda=True, cudnn=False, directory=str(dirs["cuda"]))
    if "cudnn" in dirs:
        preload(cuda=False, cudnn=True, directory=str(dirs["cudnn"]))


def choose_providers(requested: Sequence[str] = ()) -> list[str | tuple[str, dict[str, str]]]:
    available = ort.get_available_providers()
    wanted = list(requested) or (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else [])
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ValueError(
            f"execution providers not available in this onnxruntime: {missing} (have {available})"
        )
    chosen: list[str | tuple[str, dict[str, str]]] = []
    for name in wanted:
        if name == "CUDAExecutionProvider":
            load_cuda_libraries()
            chosen.append(
                (name, {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"})
            )
        elif name != "CPUExecutionProvider":
            chosen.append(name)
    chosen.append("CPUExecutionProvider")
    return chosen


# ------------------------------------------------------------------ IO binding


class Pinner(Protocol):
    """Page-locks host memory for DMA (CUDA) or does nothing (CPU); `pinned` says which."""

    pinned: bool

    def register(self, buffer: np.ndarray) -> None: ...

    def unregister(self, buffer: np.ndarray) -> None: ...


class NoPinning:
    """CPU: host buffers are the session's own memory; nothing to lock."""

    pinned = False

    def register(self, buffer: np.ndarray) -> None:
        pass

    def unregister(self, buffer: np.ndarray) -> None:
        pass


class CudaHostPinner:
    """Page-locks numpy buffers with `cudaHostRegister`, so copies to the GPU run as DMA.

    ONNX Runtime's Python API offers no pinned allocation for its built-in CUDA provider (its
    device names are cpu/cuda/...; no 'cuda_pinned' in 1.31), so the buffers are ordinary numpy
    arrays, bound as CPU memory, and registered with the CUDA runtime the provider itself loaded
    (`libcudart.so.13`, or .12). Registering costs milliseconds per 100 MB, hence only when a
    buffer grows. If the runtime cannot be found or refuses, the buffers stay pageable (correct,
    only slower) and `pinned` is False, which the server logs at start.
    """

    PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context, not only the current one

    def __init__(self) -> None:
        self.pinned = False
        self._cudart: ctypes.CDLL | None = None
        for name in ("libcudart.so.13", "libcudart.so.12"):
            try:
                self._cudart = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self._cudart is None:
            logger.warning("no CUDA runtime library found: IO-bound buffers stay pageable")
            return
        self._cudart.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._cudart.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        self.pinned = True

    def register(self, buffer: np.ndarray) -> None:
        if not self.pinned or self._cudart is None:
            return
        status = self._cudart.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, self.PORTABLE)
        if status != 0:
            logger.warning("cudaHostRegister failed (error %d): IO-bound buffers stay pageable", status)
            self.pinned = False

    def unregister(self, buffer: np.ndarray) -> None:
        if self.pinned and self._cudart is not None:
            self._cudart.cudaHostUnregister(buffer.ctypes.data)


ORT_TO_NUMPY: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


# The model inputs, named as the `PackedImage` arrays that fill them.
PACKED_ARRAYS = ("patches", "spatial", "scale", "mask")


@dataclass(frozen=True)
class InputSpec:
    """One model input as packed images carry it: [batch, tokens] or [batch, tokens, width]."""

    name: str
    dtype: np.dtype[np.generic]
    width: int | None  # the last dimension, or None for [batch, tokens]

    def elements(self, tokens: int) -> int:
        return tokens * (self.width or 1)


def capacity_for(tokens: int, granule: int) -> int:
    """The buffer size (in tokens) to grow to: the next power of two of granules.

    Doubling bounds the regrowths (and re-pinnings) to a handful over a server's life, and the
    waste to half the buffer; the granule (one bucket's worth) keeps small batches from growing
    the buffer many times in its first seconds.
    """
    units = max(1, -(-tokens // granule))
    return granule * (1 << (units - 1).bit_length())


FILL_THREADS = 4  # threads writing one big batch into its buffers
FILL_ITEMS_PER_THREAD = 8  # fewer images a thread: one thread fills them (a hand-off costs more)
_FILL_POOL: ThreadPoolExecutor | None = None
_FILL_POOL_LOCK = threading.Lock()


def _fill_pool() -> ThreadPoolExecutor:
    global _FILL_POOL
    with _FILL_POOL_LOCK:
        if _FILL_POOL is None:
            _FILL_POOL = ThreadPoolExecutor(FILL_THREADS, thread_name_prefix="musiq-fill")
        return _FILL_POOL


class BoundInputs:
    """One set of host buffers, one per model input, reused batch after batch; grows, never shrinks.

    `views(batch, length)` gives arrays shaped for that batch, laid over the start of each buffer;
    `fill` writes packed images into them with `model.packing.write_rows`, as `collate` does (padding rows zero,
    mask False) and casts the patches to the model's precision on the way, in one pass.
    """

    def __init__(self, specs: Sequence[InputSpec], pinner: Pinner, granule_tokens: int = 4096) -> None:
        self.specs = tuple(specs)
        self.pinner = pinner
        self.granule = granule_tokens
        self.capacity = 0  # tokens (batch x length) every buffer holds
        self.buffers: dict[str, np.ndarray] = {}
        self.grown = 0  # how many times the buffers were (re)allocated

    def _ensure(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        capacity = capacity_for(tokens, self.granule)
        for buffer in self.buffers.values():
            self.pinner.unregister(buffer)
        self.buffers = {}
        for spec in self.specs:
            buffer = np.empty(spec.elements(capacity), spec.dtype)
            self.pinner.register(buffer)
            self.buffers[spec.name] = buffer
        self.capacity = capacity
        self.grown += 1

    def views(self, batch: int, length: int) -> dict[str, np.ndarray]:
        self._ensure(batch * length)
        out = {}
        for spec in self.specs:
            shape = (batch, length) if spec.width is None else (batch, length, spec.width)
            out[spec.name] = self.buffers[spec.name][: spec.elements(batch * length)].reshape(shape)
        return out

    def fill(self, items: Sequence[PackedImage], length: int) -> dict[str, np.ndarray]:
        longest = max(item.num_tokens for item in items)
        if length < longest:
            raise ValueError(f"length {length} is shorter than the longest item ({longest} tokens)")
        arrays = self.views(len(items), length)

        def rows(part: range) -> None:
            write_rows(arrays, items, part)

        # numpy's copy-and-cast loops release the GIL: a big batch (64 images at 512x384 are
        # ~130 MB of fp16 patches) fills in parallel, instead of one core setting the GPU's pace.
        parts = min(FILL_THREADS, len(items) // FILL_ITEMS_PER_THREAD)
        if parts > 1:
            list(_fill_pool().map(rows, [range(k, len(items), parts) for k in range(parts)]))
        else:
            rows(range(len(items)))
        return arrays

    def release(self) -> None:
        for buffer in self.buffers.values():
            self.pinner.unregister(buffer)
        self.buffers = {}
        self.capacity = 0


class BufferPool:
    """Buffer sets for concurrent inferences: a call takes a free set (or makes one) and returns it.

    The batcher runs one batch at a time, so one set serves it; a health probe's or a stuck
    batch's inference running beside it gets a second, never a half-written first.
    """

    def __init__(self, specs: Sequence[InputSpec], pinner: Pinner) -> None:
        self.specs = tuple(specs)
        self.pinner = pinner
        self.free: list[BoundInputs] = []
        self.made = 0
        self._lock = threading.Lock()

    @contextmanager
    def acquire(self) -> Iterator[BoundInputs]:
        with self._lock:
            if self.free:
                inputs = self.free.pop()
            else:
                inputs = BoundInputs(self.specs, self.pinner)
                self.made += 1
        try:
            yield inputs
        finally:
            with self._lock:
                self.free.append(inputs)


# ------------------------------------------------------------------ the runtime


class ModelRuntime:
    """An ONNX Runtime session plus what its metadata says; `predict` scores packed images."""

    def __init__(self, path: str | Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        self.path = Path(path)
        self.options = options
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        if not options.spin_threads:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.path), so, providers=choose_providers(options.providers)
            )
        except Exception as exc:  # ORT raises its own types for missing / malformed files
            raise ValueError(f"cannot load model {self.path}: {exc}") from exc
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)
        if LINKED_CHECKPOINT in props:
            self._check_linked_checkpoint(json.loads(props[LINKED_CHECKPOINT]))
        self.packing = self.metadata.packing
        self.float16 = self.session.get_inputs()[0].type == "tensor(float16)"
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "score" not in self.outputs:
            raise ValueError(f"{self.path}: a scoring model needs a 'score' output, has {self.outputs}")
        # What the session really got (ORT falls back to CPU when CUDA fails to start) decides
        # the device defaults, not what was asked for.
        self.defaults = device_defaults(self.providers[0])
        self.pad_multiple = options.pad_multiple or self.defaults.pad_multiple
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        bind = self.defaults.io_binding if options.io_binding is None else options.io_binding
        self.split: SplitModel | None = None  # IO binding feeds the whole graph: one or the other
        if (
            options.split_encoder
            and not bind
            and self.providers[0] == "CPUExecutionProvider"
            and not self.float16
        ):
            self.split = self._load_split(props)
        self.pool: BufferPool | None = None
        if bind:
            pinner: Pinner = CudaHostPinner() if self.providers[0] == "CUDAExecutionProvider" else NoPinning()
            self.pool = BufferPool(self._input_specs(), pinner)

    def _input_specs(self) -> list[InputSpec]:
        specs = []
        for node in self.session.get_inputs():
            if node.name not in PACKED_ARRAYS:
                raise ValueError(
                    f"{self.path}: input {node.name} is none of the packed arrays {PACKED_ARRAYS}"
                )
            if node.type not in ORT_TO_NUMPY:
                raise ValueError(f"{self.path}: input {node.name} has unsupported type {node.type}")
            last = node.shape[-1] if len(node.shape) == 3 else None
            if last is not None and not isinstance(last, int):
                raise ValueError(
                    f"{self.path}: input {node.name} needs a fixed last dimension, has {node.shape}"
                )
            specs.append(InputSpec(node.name, np.dtype(ORT_TO_NUMPY[node.type]), last))
        return specs

    def _load_split(self, props: dict[str, str]) -> SplitModel | None:
        """The model's two halves, if both lie beside it and come from the same export."""
        features, head = split_paths(self.path)
        if not (features.is_file() and head.is_file()):
            return None
        threads = self.options.intra_op_threads or len(os.sched_getaffinity(0))
        try:
            split = SplitModel(features, head, threads, threads, self.options.encoder_chunk)
        except Exception as exc:  # ORT's own types for malformed files
            raise ValueError(f"cannot load {features} / {head}: {exc}") from exc
        problem = split_problem(props, split.props)
        if problem is not None:
            split.close()
            logger.warning("%s: not using its split halves (%s); re-export it", self.path, problem)
            return None
        return split

    def _check_linked_checkpoint(self, link: dict[str, str]) -> None:
        """A file whose weights are external data in a checkpoint (`export.external`) runs only
        with that very checkpoint: one rewritten since would silently mix two models. (No file
        there: the session loaded without it, so this is a self-contained copy, e.g. `onnx.load`
        then `onnx.save`, which keeps the note.)"""
        from model.checkpoint import file_sha256

        checkpoint = self.path.parent / link["location"]
        if checkpoint.is_file() and file_sha256(checkpoint) != link["sha256"]:
            raise ValueError(
                f"{self.path} reads its weights from {checkpoint}, which has changed since it was linked: "
                "re-export and relink it (tools/install_default.sh; python -m export.external)"
            )

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def providers(self) -> list[str]:
        providers: list[str] = self.session.get_providers()
        return providers

    @property
    def host_memory(self) -> str:
        """How batches reach the model: 'session.run', the split halves, or IO binding from
        pinned/pageable buffers."""
        if self.split is not None:
            return f"split halves (features: {self.split.workers} single-threaded sessions, {self.split.chunk} rows a call)"
        if self.pool is None:
            return "session.run"
        return "io_binding (pinned)" if self.pool.pinner.pinned else "io_binding (pageable)"

    def padded_length(self, tokens: int) -> int:
        m = self.pad_multiple
        return -(-tokens // m) * m

    def predict(self, items: Sequence[PackedImage]) -> list[Prediction]:
        """Scores a batch (padded together); thread-safe, as ONNX Runtime sessions are."""
        length = self.padded_length(max(it.num_tokens for it in items))
        values = self._run_bound(items, length) if self.pool is not None else self._run(items, length)
        scores = np.asarray(values["score"], np.float64).reshape(len(items), -1)[:, 0]
        dist = values.get("distribution")
        return [
            Prediction(float(scores[i]), tuple(float(v) for v in dist[i]) if dist is not None else None)
            for i in range(len(items))
        ]

    def _run(self, items: Sequence[PackedImage], length: int) -> dict[str, np.ndarray]:
        batch = collate(list(items), pad_to=length)
        feeds = {
            "patches": batch.patches.astype(np.float16) if self.float16 else batch.patches,
            "spatial": batch.spatial,
            "scale": batch.scale,
            "mask": batch.mask,
        }
        if self.split is not None:
            return dict(zip(self.split.outputs, self.split.run(**feeds), strict=True))
        return dict(zip(self.outputs, self.session.run(None, feeds), strict=True))

    def _run_bound(self, items: Sequence[PackedImage], length: int) -> dict[str, np.ndarray]:
        """IO binding: inputs written into this call's reused host buffers and bound in place as
        CPU memory (ORT copies them to the GPU itself, by DMA when pinned); outputs bound to the
        host, where ORT allocates them (a few floats per image: nothing to gain from pinning)."""
        assert self.pool is not None
        with self.pool.acquire() as inputs:
            arrays = inputs.fill(items, length)
            binding = self.session.io_binding()
            for name, array in arrays.items():
                binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            for name in self.outputs:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            # Copies out before the buffers go back to the pool: nothing bound outlives the call.
            outputs = binding.copy_outputs_to_cpu()
        return dict(zip(self.outputs, outputs, strict=True))

    def warm_up(self) -> Prediction:
        """One inference on a mid-grey image: proves the file runs before the server says ready."""
        from model.packing import pack

        grey = np.full((64, 64, 3), 128, np.uint8)
        prediction = self.predict([pack(grey, self.packing)])[0]
        if not np.isfinite(prediction.score):
            raise ValueError(f"{self.path}: warm-up inference gave a non-finite score")
        return prediction
