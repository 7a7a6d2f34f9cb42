"""`musiq export`: checkpoint -> verified, self-describing ONNX file(s).

Steps, each printed: trace (batch and token axes symbolic), ONNX checker, ORT transformer
fusions, fp32 parity against PyTorch over shapes from 1 to 4096 tokens (refused above a bound
that grows with the scores, `fp32_bound`, or the caller's `tolerance`), then for fp16 / int8 the
reduced file and its deviation and rank agreement with fp32 on real photos (int8 refused below the
SRCC floor). The metadata records all of it, and the file
is written only after every check passed (atomically: temp file, then rename).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.graph import RolloutGraph, ScoringGraph, export_graph, export_split
from export.metadata import ModelMetadata, split_paths
from export.optimize import fuse, fused_op_counts, to_fp16, to_fp16_weights, to_int8
from export.verify import SHAPES, ShapeCheck, check_shapes, compare_precision, photo_scores
from model.checkpoint import file_sha256, load_checkpoint
from model.config import PackingConfig
from model.network import Musiq, build_model

# fp32 ONNX against PyTorch: the two round differently (fused kernels, other summation orders) and
# the difference grows with the size of the outputs, so the bound does too:
#     bound = max(FP32_ABS_FLOOR, FP32_RELATIVE * largest |PyTorch output| over every check shape).
# Measured (CPU, ORT fusions): the tiny test network scoring a few units differs by ~2e-6; the same
# network with its head scaled to scores of 15..300 by ~3e-4 (1e-6 relative); an official-size
# checkpoint (14 blocks, random weights) scoring 74..180 by 6.9e-4 (3.8e-6 relative), which the old
# absolute 1e-4 refused. 2e-5 relative (about 170 float32 ulps at the largest output) is 5x the worst
# of these; it allows 2e-3 at a score of 100 and 6e-3 at 300, while a file with wrong weights moves
# scores by a good part of their spread (1e-2 and far more: tests/test_export.py). Not a fraction of
# the declared score_range: a random or badly calibrated checkpoint scores outside it (74..180
# against the default 0..100), and rounding follows the values computed, not the values promised.
FP32_ABS_FLOOR = 1e-4  # on outputs of a few units and below (probabilities, small scores)
FP32_RELATIVE = 2e-5
MIN_INT8_SRCC = 0.995
MIN_ROLLOUT_PEARSON = 0.999  # fp16-weight rollouts against fp32, per photo
PRECISIONS = ("fp32", "fp16", "int8")


class ExportRefused(RuntimeError):
    """A check failed; nothing was written."""


@dataclass
class ExportResult:
    path: Path
    metadata: ModelMetadata
    fused: dict[str, int]
    shape_checks: list[ShapeCheck]
    rollout_path: Path | None = None
    split_paths: tuple[Path, Path] | None = None


def fp32_bound(checks: Sequence[ShapeCheck], tolerance: float | None = None) -> tuple[float, str]:
    """The largest fp32 ONNX-vs-PyTorch difference accepted over `checks`, and how it was set.

    `tolerance` (`musiq export --tolerance`), when given, is used as it is.
    """
    if tolerance is not None:
        return tolerance, "--tolerance"
    largest = max(c.max_abs_value for c in checks)
    relative = FP32_RELATIVE * largest
    if relative > FP32_ABS_FLOOR:
        return float(f"{relative:.3e}"), f"relative: {FP32_RELATIVE:g} x max |output| {largest:.4g}"
    return FP32_ABS_FLOOR, f"floor: {FP32_ABS_FLOOR:g} (max |output| {largest:.4g})"


def fp32_verdict(
    what: str, checks: Sequence[ShapeCheck], tolerance: float | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """The worst fp32 difference against its bound, logged; past the bound nothing is written.
    Returns the parity figures the file's metadata records."""
    worst = max(c.max_abs_diff for c in checks)
    bound, rule = fp32_bound(checks, tolerance)
    log(f"  fp32 bound {bound:.3g} ({rule}); worst {worst:.3e}")
    if worst > bound:
        raise ExportRefused(
            f"{what} differs from PyTorch by {worst:.3e} > {bound:.3g} ({rule}); nothing written"
        )
    return {
        "fp32_vs_torch_max_abs": float(f"{worst:.3e}"),
        "fp32_tolerance": bound,
        "fp32_tolerance_rule": rule,
    }


def check_tolerance(tolerance: float | None) -> None:
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"the fp32 tolerance must be a positive number, not {tolerance!r}")


def session(model: onnx.ModelProto | str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _write(model: onnx.ModelProto, path: Path, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key, value in sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a model file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_checkpoint(
    checkpoint_path: str | Path,
    output: str | Path,
    *,
    precision: str = "fp32",
    opset: int = 17,
    rollout: bool = False,
    rollout_weights: str = "fp32",
    split: bool = False,
    min_int8_srcc: float = MIN_INT8_SRCC,
    photos: Sequence[tuple[str, np.ndarray]] | None = None,
    shapes: Sequence[tuple[int, int, str]] = SHAPES,
    tolerance: float | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> ExportResult:
    """`tolerance`: the largest fp32 ONNX-vs-PyTorch difference accepted (absolute); by default
    `fp32_bound` sets it from the scores. It also bounds the rollout graph's and the halves' checks.
    `split`: also the graph's two halves for CPU serving (`_split_halves`; fp32, or int8 with
    an int8 head after the float32 convolutions)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
    if split and precision == "fp16":
        raise ValueError("the split halves are for CPUs: export them with --precision fp32 or int8")
    check_tolerance(tolerance)
    output = Path(output)
    checkpoint = load_checkpoint(checkpoint_path)
    cfg = checkpoint.config
    model = build_model(checkpoint)
    if split and model.patch_encoder.root is None:
        raise ValueError("a linear patch encoder has nothing to split: export without --split")
    if photos is None:
        from export.photos import distorted_photos

        photos = distorted_photos()
    images = [img for _, img in photos]

    with tempfile.TemporaryDirectory() as tmp:
        graph = ScoringGraph(model)
        traced = onnx.load(export_graph(graph, Path(tmp) / "traced.onnx", opset=opset))
    onnx.checker.check_model(traced)
    fp32 = fuse(traced, cfg.num_heads, cfg.hidden_size)
    fused = fused_op_counts(fp32)
    log(f"traced opset {opset}, ONNX checker passed; fused operators: {fused}")

    fp32_session = session(fp32)
    checks = check_shapes(fp32_session, model, shapes, real=images[:4])
    for c in checks:
        log(
            f"  fp32 vs PyTorch  batch {c.batch:>2} tokens {c.tokens:>5} {c.padding:<6} max |diff| {c.max_abs_diff:.2e}"
            f"  (max |output| {c.max_abs_value:.4g})"
        )
    parity = fp32_verdict("fp32 ONNX", checks, tolerance, log)
    parity["shapes"] = [[c.batch, c.tokens, c.padding] for c in checks]

    final = fp32
    ref: np.ndarray | None = None
    if precision != "fp32":
        outputs = tuple(o.name for o in fp32.graph.output)
        final = to_fp16(fp32, keep_float32=outputs) if precision == "fp16" else to_int8(fp32)
        reduced = session(final)
        variant = check_shapes(reduced, model, shapes[:3], real=images[:4])
        ref = photo_scores(fp32_session, images, cfg.packing())
        got = photo_scores(reduced, images, cfg.packing())
        report = compare_precision(ref, got)
        log(
            f"  {precision} vs fp32 on {report.images} photos: max |dev| {report.max_abs_dev:.4f}, "
            f"mean {report.mean_abs_dev:.4f} (fp32 score std {report.fp32_score_spread:.4f}), SRCC {report.srcc:.5f}"
        )
        parity[f"{precision}_vs_fp32"] = report.as_dict()
        parity[f"{precision}_vs_torch_max_abs"] = float(f"{max(c.max_abs_diff for c in variant):.3e}")
        if precision == "int8":
            _refuse_below_floor("int8", report.srcc, min_int8_srcc)

    # The halves are checked before anything is written: a refused split leaves no file behind.
    halves = _split_halves(model, opset, shapes, images[:4], tolerance, log) if split else None
    if halves is not None and precision == "int8":
        assert ref is not None
        halves[1] = to_int8(halves[1])
        got = photo_scores(_SplitSession(*halves), images, cfg.packing())  # type: ignore[arg-type]
        report = compare_precision(ref, got)
        log(f"  int8 split halves vs fp32 on {report.images} photos: SRCC {report.srcc:.5f}")
        parity["int8_split_vs_fp32"] = report.as_dict()
        _refuse_below_floor("the int8 halves'", report.srcc, min_int8_srcc)

    metadata = ModelMetadata(
        name=checkpoint.name,
        version=checkpoint.version,
        patch_size=cfg.patch_size,
        grid_size=cfg.grid_size,
        longer_sides=cfg.longer_sides,
        max_native_tokens=cfg.max_native_tokens,
        head=cfg.head,
        num_outputs=cfg.num_outputs,
        score_range=checkpoint.score_range,
        precision=precision,
        source_sha256=file_sha256(checkpoint_path),
        outputs=tuple(o.name for o in final.graph.output),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        mlp_dim=cfg.mlp_dim,
        patch_encoder=cfg.patch_encoder,
        parity=parity,
        exporter={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": str(opset),
        },
    )
    _write(final, output, metadata.to_props())
    result = ExportResult(output, metadata, fused, checks)
    if rollout:
        result.rollout_path = _export_rollout(
            model, output, metadata, opset, shapes, log, rollout_weights, images[:8], tolerance
        )
    if halves is not None:
        paths = split_paths(output)
        for half, path in zip(halves, paths, strict=True):
            _write(half, path, metadata.to_props())
            log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        result.split_paths = paths
    log(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {precision})")
    return result


def _refuse_below_floor(what: str, srcc: float, floor: float) -> None:
    """`ExportRefused` when an int8 graph ranks the check photos below the floor (or NaN)."""
    if not srcc >= floor:
        raise ExportRefused(f"{what} rank agreement with fp32 is {srcc:.4f} < {floor}; nothing written")


class _SplitSession:
    """The two halves composed, with the surface `check_shapes` reads (`run`, `get_inputs`,
    `get_outputs`): every row, padding included, goes through the features half at once."""

    def __init__(self, features: onnx.ModelProto, head: onnx.ModelProto) -> None:
        self.features, self.head = session(features), session(head)

    def get_inputs(self) -> list[Any]:
        return list(self.features.get_inputs())

    def get_outputs(self) -> list[Any]:
        return list(self.head.get_outputs())

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        patches = feeds["patches"]
        rows = patches.reshape(-1, patches.shape[-1])
        maps = self.features.run(None, {"rows": rows})[0].reshape(*patches.shape[:2], -1)
        return list(self.head.run(names, {**feeds, "patches": maps}))


def _split_halves(
    model: Musiq,
    opset: int,
    shapes: Sequence[tuple[int, int, str]],
    images: Sequence[np.ndarray],
    tolerance: float | None,
    log: Callable[[str], None],
) -> list[onnx.ModelProto]:
    """The graphs of NAME.features.onnx and NAME.head.onnx (`export.graph.export_split`), which a
    CPU runtime runs instead of the whole graph (`service.split`), once their composition passed
    the same parity check against PyTorch as the whole graph (`ExportRefused` otherwise)."""
    with tempfile.TemporaryDirectory() as tmp:
        traced = export_split(model, Path(tmp) / "features.onnx", Path(tmp) / "head.onnx", opset)
        halves = [onnx.load(p) for p in traced]
    for half in halves:
        onnx.checker.check_model(half)
    checks = check_shapes(_SplitSession(*halves), model, shapes, real=images)  # type: ignore[arg-type]
    log(f"  split halves (features -> head) vs PyTorch over {len(checks)} shapes")
    fp32_verdict("split halves", checks, tolerance, log)
    return halves


def _export_rollout(
    model: Musiq,
    output: Path,
    metadata: ModelMetadata,
    opset: int,
    shapes: Sequence[tuple[int, int, str]],
    log: Callable[[str], None],
    weights: str,
    images: Sequence[np.ndarray],
    tolerance: float | None = None,
) -> Path:
    """The explanation graph: fp32 compute, unfused attention (it must expose the probabilities).

    `weights="fp16"` stores the weights in float16 (half the file) and is refused unless its
    rollouts on real photos match the fp32 graph's (`rollout_agreement`).
    """
    if weights not in ("fp32", "fp16"):
        raise ValueError("rollout weights must be fp32 or fp16")
    path = output.with_name(output.name.removesuffix(".onnx") + ".rollout.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        traced = onnx.load(export_graph(RolloutGraph(model), Path(tmp) / "rollout.onnx", opset=opset))
    onnx.checker.check_model(traced)
    small = [s for s in shapes if s[1] <= 1500]  # rollout keeps one N x N matrix per layer
    fp32_session = session(traced)
    checks = check_shapes(fp32_session, model, small)
    log(f"  rollout graph vs PyTorch over {len(checks)} shapes")
    parity = fp32_verdict("rollout graph", checks, tolerance, log)
    final = traced
    if weights == "fp16":
        final = to_fp16_weights(traced)
        onnx.checker.check_model(final)
        agreement = rollout_agreement(fp32_session, session(final), images, model.config.packing())
        log(
            f"  rollout fp16 weights vs fp32 on {agreement['images']} photos: min correlation "
            f"{agreement['min_pearson']:.6f}, max |diff| / max weight {agreement['max_rel_diff']:.2e}, "
            f"max |score diff| {agreement['max_score_diff']:.2e}"
        )
        if not agreement["min_pearson"] >= MIN_ROLLOUT_PEARSON:
            raise ExportRefused(
                f"fp16-weight rollouts correlate {agreement['min_pearson']:.5f} < {MIN_ROLLOUT_PEARSON} "
                "with fp32; nothing written"
            )
        parity["fp16_weights_vs_fp32"] = agreement
    meta = ModelMetadata(
        **{
            **metadata.__dict__,
            "precision": "fp32" if weights == "fp32" else "fp16-weights",
            "rollout": True,
            "outputs": tuple(o.name for o in traced.graph.output),
            "parity": parity,
        }
    )
    _write(final, path, meta.to_props())
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {weights} weights)")
    return path


def rollout_agreement(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    images: Sequence[np.ndarray],
    packing: PackingConfig,
) -> dict[str, float]:
    """How closely two rollout graphs agree on real photos: per-image Pearson correlation of the
    token weights (the heatmap's pattern), the largest difference relative to the image's largest
    weight (its colour scale), and the largest score difference."""
    from export.verify import ort_outputs
    from model.packing import collate, pack

    pearsons, rel, scores = [], [], []
    for img in images:
        batch = collate([pack(img, packing)])
        a, b = ort_outputs(reference, batch), ort_outputs(candidate, batch)
        ra, rb = a["rollout"][0].astype(np.float64), b["rollout"][0].astype(np.float64)
        pearsons.append(float(np.corrcoef(ra, rb)[0, 1]))
        rel.append(float(np.abs(ra - rb).max() / ra.max()))
        key = "score" if "score" in a else "logits"
        scores.append(float(np.abs(a[key] - b[key]).max()))
    return {
        "images": len(pearsons),
        "min_pearson": round(min(pearsons), 7),
        "max_rel_diff": float(f"{max(rel):.3e}"),
        "max_score_diff": float(f"{max(scores):.3e}"),
    }
