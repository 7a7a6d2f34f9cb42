"""The arithmetic of the benchmark: percentiles, timing loops, the sgemm peak and the roofline.

Kept free of I/O so that the numbers the report quotes are computed by code the tests check.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used
    import onnxruntime as ort
    from onnx import ValueInfoProto


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default), so p50 of an even count is the mean of the two middle values."""
    if not samples:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Latency:
    """Latencies in seconds of one measured phase."""

    n: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Latency:
        return cls(
            len(samples),
            percentile(samples, 50),
            percentile(samples, 99),
            statistics.fmean(samples) if samples else math.nan,
        )


def timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `runs` calls after `warmup` untimed ones (allocations, ORT shape planning)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        s = time.perf_counter()
        fn()
        out.append(time.perf_counter() - s)
    return out


def sgemm_gflops(n: int = 2048, runs: int = 7) -> tuple[float, str]:
    """This machine's float32 matrix-multiply rate (GFLOP/s, 2 n^3 per product): the best of
    numpy's BLAS, torch (when importable) and ONNX Runtime's own MatMul kernel (MLAS), median of
    `runs` products of n x n matrices.

    The best engine sets the roofline, so a library that is slow on this CPU cannot make the
    model's fraction of it look high: on AMD EPYC with AVX-512, MLAS reaches ~1.7x numpy's
    OpenBLAS rate and ~2x torch's.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    engines: dict[str, Callable[[], object]] = {"numpy": lambda: a @ b}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        engines["torch"] = lambda: torch.mm(ta, tb)
    except ImportError:
        pass
    try:
        session = _ort_matmul(n)
        engines["onnxruntime"] = lambda: session.run(None, {"a": a, "b": b})
    except ImportError:
        pass
    best = (0.0, "")
    for name, fn in engines.items():
        gflops = 2 * n**3 / statistics.median(timed(fn, runs)) / 1e9
        best = max(best, (gflops, name))
    return best


def _ort_matmul(n: int) -> ort.InferenceSession:
    """A one-node ONNX Runtime session computing a @ b for float32 n x n inputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def value(name: str) -> ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n])

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm", [value("a"), value("b")], [value("c")]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def roofline_images_per_s(flops_per_image: float, peak_gflops: float) -> float:
    """Images per second if every FLOP ran at the sgemm peak: the fp32 limit of this machine."""
    return peak_gflops * 1e9 / flops_per_image


def roofline_fraction(flops_per_image: float, images_per_s: float, peak_gflops: float) -> float:
    """Achieved FLOP rate (FLOPs per image x images/s) over the sgemm peak."""
    return flops_per_image * images_per_s / (peak_gflops * 1e9)


def mean_flops(flops: Sequence[float]) -> float:
    """FLOPs per image of a mix served round-robin (each image equally often)."""
    return statistics.fmean(flops)
