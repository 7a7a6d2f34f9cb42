"""One exported model in ONNX Runtime: configured from the file alone, warmed up, batched.

The file's `musiq.*` metadata (written by `musiq export`) gives the packing, the head, the score
range, names and precision, so loading needs nothing but the path. Execution provider: CUDA when
ONNX Runtime has it (heuristic cuDNN algorithm search and a same-as-requested arena, which suit
inputs whose token count changes every batch), else CPU with explicit thread counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.metadata import LINKED_CHECKPOINT, ModelMetadata
from model.packing import PackedImage, collate

logger = logging.getLogger(__name__)


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
    pad_multiple: int = 1


@dataclass(frozen=True)
class Prediction:
    score: float
    distribution: tuple[float, ...] | None = None


def load_cuda_libraries() -> None:
    """Loads CUDA and cuDNN from NVIDIA's PyPI wheels (`onnxruntime-gpu[cuda,cudnn]`) if present.

    In a plain venv nothing else tells the dynamic linker where those wheels keep their libraries,
    and the CUDA provider would then fail to load. The container image also registers them with
    ldconfig; loading libraries that are already found is harmless.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload(directory="")  # "": NVIDIA's site-packages folders first, then the default paths


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

    def padded_length(self, tokens: int) -> int:
        m = self.options.pad_multiple
        return -(-tokens // m) * m

    def predict(self, items: Sequence[PackedImage]) -> list[Prediction]:
        """Scores a batch (padded together); thread-safe, as ONNX Runtime sessions are."""
        longest = max(it.num_tokens for it in items)
        batch = collate(list(items), pad_to=self.padded_length(longest))
        feeds = {
            "patches": batch.patches.astype(np.float16) if self.float16 else batch.patches,
            "spatial": batch.spatial,
            "scale": batch.scale,
            "mask": batch.mask,
        }
        values = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
        scores = np.asarray(values["score"], np.float64)
        dist = values.get("distribution")
        return [
            Prediction(float(scores[i]), tuple(float(v) for v in dist[i]) if dist is not None else None)
            for i in range(len(items))
        ]

    def warm_up(self) -> Prediction:
        """One inference on a mid-grey image: proves the file runs before the server says ready."""
        from model.packing import pack

        grey = np.full((64, 64, 3), 128, np.uint8)
        prediction = self.predict([pack(grey, self.packing)])[0]
        if not np.isfinite(prediction.score):
            raise ValueError(f"{self.path}: warm-up inference gave a non-finite score")
        return prediction
