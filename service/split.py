"""The scoring graph in two halves on a CPU: the patch encoder's convolutions over small chunks of
rows on single-threaded sessions in parallel, then the embedding and transformer on one session.

Why (issue 19, bench/results/PERFORMANCE.md): the ResNet patch encoder writes 64 KiB per token per
feature map. Over a whole 1024x768 image (662 tokens) each map is ~42 MB, so its GroupNorms, ReLUs,
adds and layout reorders stream from memory, and every operator splits tiny work over two threads.
A chunk of 32 rows keeps its maps in a core's L2, and one session per core runs whole chunks
without waiting on the other core. An ONNX Scan over chunks inside the graph was tried first and
lost on a quiet machine: it runs the chunks one after the other, each operator still split.

The halves are files the exporter writes beside the model (`musiq export --split`):
`NAME.features.onnx` (rows [n, P*P*3] -> feature maps [n, F]) and `NAME.head.onnx` (the
scoring graph whose `patches` are those feature maps). Same arithmetic as the whole graph: the
exporter checks the composition against it before writing them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

DEFAULT_CHUNK = 32  # rows a feature-session call: 32 x 64 KiB maps fit a 2 MiB L2 (16 and 64 measured)
KEEP_BYTES = 128 * 2**20  # feature arrays up to this size (~2,000 rows) are kept for the next call


def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class SplitModel:
    """Runs `features` over chunks of the real rows on `workers` single-threaded sessions (one
    per worker thread), writing straight into one feature array (IO binding), then `head` on it.

    Thread-safe: concurrent calls share the workers, whose queue interleaves their chunks."""

    def __init__(
        self, features: Path, head: Path, workers: int, head_threads: int, chunk: int = DEFAULT_CHUNK
    ) -> None:
        if workers < 1 or chunk < 1:
            raise ValueError(f"workers and chunk must be >= 1, got {workers} and {chunk}")
        self.chunk = chunk
        self.workers = workers
        self.head = _session(head, head_threads)
        self._features_path = features
        self._local = threading.local()
        probe = _session(features, 1)
        (rows,) = probe.get_inputs()
        (out,) = probe.get_outputs()
        self.row_width, self.width = int(rows.shape[-1]), int(out.shape[-1])
        self.outputs = [o.name for o in self.head.get_outputs()]
        self.props = [sess.get_modelmeta().custom_metadata_map for sess in (probe, self.head)]
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="musiq-features")

    def _features_session(self) -> ort.InferenceSession:
        session: ort.InferenceSession | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = _session(self._features_path, 1)
        return session

    def _encode(self, rows: np.ndarray, out: np.ndarray) -> None:
        """One chunk, in a worker thread: `rows` and `out` are contiguous row ranges."""
        session = self._features_session()
        binding = session.io_binding()
        binding.bind_input("rows", "cpu", 0, np.float32, list(rows.shape), rows.ctypes.data)
        binding.bind_output("features", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        session.run_with_iobinding(binding)

    def _buffer(self, rows: int) -> np.ndarray:
        """This calling thread's feature array, kept between calls up to KEEP_BYTES: a fresh
        42 MB array a 1024x768 image costs ~4 ms of page faults (ORT's own arena keeps its
        memory the same way)."""
        kept: np.ndarray | None = getattr(self._local, "buffer", None)
        if kept is not None and len(kept) >= rows:
            return kept[:rows]
        buffer = np.empty((rows, self.width), np.float32)
        if buffer.nbytes <= KEEP_BYTES:
            self._local.buffer = buffer
        return buffer

    def _fill(self, rows: np.ndarray, real: np.ndarray, out: np.ndarray) -> None:
        """Feature maps of the `real` rows into the same rows of `out`, zeros elsewhere: each
        run of consecutive real rows (an image's, in a collated batch) is cut into chunks that
        the workers encode in place."""
        edges = np.flatnonzero(np.diff(np.concatenate(([False], real, [False])).astype(np.int8)))
        jobs = []
        last = 0
        for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            out[last:start] = 0
            last = stop
            for i in range(start, stop, self.chunk):
                end = min(i + self.chunk, stop)
                jobs.append(self._pool.submit(self._encode, rows[i:end], out[i:end]))
        out[last:] = 0
        for job in jobs:
            job.result()

    def run(
        self, patches: np.ndarray, spatial: np.ndarray, scale: np.ndarray, mask: np.ndarray
    ) -> list[np.ndarray]:
        """The whole graph's outputs for one collated batch. Only real rows are encoded: padded
        rows get zero feature maps, which the head's key mask ignores as the whole graph does."""
        b, length = mask.shape
        rows = np.ascontiguousarray(patches, np.float32).reshape(b * length, self.row_width)
        feats = self._buffer(b * length)
        self._fill(rows, mask.reshape(-1), feats)
        feeds = {
            "patches": feats.reshape(b, length, self.width),
            "spatial": spatial,
            "scale": scale,
            "mask": mask,
        }
        return list(self.head.run(None, feeds))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def split_problem(model_props: dict[str, str], halves: Sequence[dict[str, str]]) -> str | None:
    """Why the halves must not stand in for the model (None: they may): both must come from the
    checkpoint the model was exported from, at its precision."""
    for props in halves:
        for key in ("musiq.source_sha256", "musiq.precision"):
            if props.get(key) != model_props.get(key):
                return f"{key} differs: {props.get(key)!r} against the model's {model_props.get(key)!r}"
    return None
