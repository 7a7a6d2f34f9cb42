"""Side-by-side ONNX Runtime experiments behind bench/results/PERFORMANCE.md.

Usage: python bench/ort_experiments.py [--runs 5] [--cache runs/bench-cache]

Every comparison is interleaved (A, B, A, B, ...) in one process, so that the load of a shared
machine hits both sides alike; medians and their ratio are printed. Experiments, official-size
fp32 model (the harness's cached export):
1. padding rows: the official layout vs `model.packing.compact` (what the service computes);
2. batching: 4 images in one batch vs 4 batches of one (images/s);
3. intra-op threads: 1 vs 2 per session;
4. thread spinning on vs off while another thread packs images, as the service's decode pool does;
5. the exported patch encoder: the network's own (Pad nodes, InstanceNormalization, a transpose
   before the embedding) vs `export.graph.ExportPatchEncoder`, fp32 and int8;
6. two concurrent runs of one session vs one run at a time (images/s);
7. ONNX Runtime's operator profile of the served fp32 and int8 graphs (shares of kernel time);
8. the patch encoder as a Scan over chunks of rows (issue 19, `export.optimize.chunk_patch_encoder`):
   every variant tried, interleaved with 2048^3 sgemm products (MLAS and torch) in the same loop,
   on the official-size model (fp32 and int8, 512x384) and the embedded default model (1024x768);
9. the graph split in two for CPUs (issue 19, `musiq export --split`, `service.split`): the
   features half over chunks of rows on one single-threaded session per thread, then the head,
   against the whole graph at 2 threads, through `ModelRuntime.predict` as the server calls it;
   chunk sizes, the GroupNorm scales folded or not, the output flattened last (before) or its
   ReLU writing the rows, and the variants not kept: the embedding inside the workers per 64-row
   block, the GroupNorm affines inside the LayerNorms, the 1x1 convolutions as MatMuls; the same
   sgemm products in the loop (`--chunks`: the whole graph and those chunk sizes only);
10. probes of the embedded default model's features half alone (one single-threaded session, 32
   rows of real photos, as one feature worker runs it): as exported, against its last multiply
   removed (what folding the shared GroupNorm scale into the head's embedding would save at
   most), and against static int8 convolutions (QDQ or QLinearConv, 7-bit weights per channel,
   calibrated on the photos' rows), with their error; none kept (PERFORMANCE.md, sixth round);
and the sgemm GFLOP/s of the same run (the best of numpy, torch and ONNX Runtime's MLAS), to put
the achieved FLOP rates in proportion.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.models import official_models
from bench.stats import roofline_fraction, sgemm_gflops
from bench.workload import load_mix
from model.config import OFFICIAL
from model.decode import decode_image
from model.flops import forward_flops
from model.packing import PackedImage, compact, pack
from service.runtime import ModelRuntime, RuntimeOptions


def interleaved(a: Callable[[], object], b: Callable[[], object], runs: int) -> tuple[float, float]:
    a()
    b()
    ta, tb = [], []
    for _ in range(runs):
        for fn, out in ((a, ta), (b, tb)):
            s = time.perf_counter()
            fn()
            out.append(time.perf_counter() - s)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", default="runs/bench-cache")
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10", help="comma-separated experiment numbers")
    parser.add_argument(
        "--chunks",
        default="",
        help="experiments 8 and 9: only these chunk sizes, comma-separated (8: 0 is before; 9: the "
        "whole graph and these chunks only)",
    )
    args = parser.parse_args()
    only = {int(n) for n in args.only.split(",")}
    chunks = {int(c) for c in args.chunks.split(",") if c}
    if only <= {8, 9, 10}:  # need neither the harness's exports nor its images
        if 8 in only:
            chunked_encoder(Path(args.cache), args.runs, chunks)
        if 9 in only:
            split_halves(Path(args.cache), args.runs, chunks)
        if 10 in only:
            feature_probes(Path(args.cache), args.runs)
        return
    path = official_models(Path(args.cache))["fp32"]
    peak, engine = sgemm_gflops()
    print(f"sgemm {peak:.1f} GFLOP/s ({engine})")
    rt = ModelRuntime(path)
    images = {im.name: im for im in load_mix("512x384", OFFICIAL) + load_mix("mixed", OFFICIAL)}

    one = compact(pack(decode_image(images["512x384"].data), rt.packing))
    if 1 in only:
        print("\n1. padding rows (batch 1): official layout vs compact")
        for name in ("512x384", "1024x768", "300x4000"):
            full = pack(decode_image(images[name].data), rt.packing)
            small = compact(full)
            a, b = interleaved(
                lambda full=full: rt.predict([full]), lambda small=small: rt.predict([small]), args.runs
            )
            flops = forward_flops(OFFICIAL, small.num_tokens)
            print(
                f"  {name}: {full.num_tokens} -> {small.num_tokens} tokens: {a * 1e3:.1f} -> {b * 1e3:.1f} ms "
                f"(x{a / b:.2f}); compact at {roofline_fraction(flops, 1 / b, peak):.0%} of sgemm"
            )

    if 2 in only:
        print("\n2. batching, 512x384 (compact): 4 batches of 1 vs 1 batch of 4")
        a, b = interleaved(
            lambda: [rt.predict([one]) for _ in range(4)], lambda: rt.predict([one] * 4), args.runs
        )
        flops = forward_flops(OFFICIAL, one.num_tokens)
        print(
            f"  {4 / a:.2f} vs {4 / b:.2f} images/s (x{a / b:.2f}); "
            f"{roofline_fraction(flops, 4 / a, peak):.0%} vs {roofline_fraction(flops, 4 / b, peak):.0%} of sgemm"
        )

    if 3 in only:
        print("\n3. intra-op threads, 512x384 (compact), batch 1: 1 vs 2")
        rt1 = ModelRuntime(path, RuntimeOptions(intra_op_threads=1))
        rt2 = ModelRuntime(path, RuntimeOptions(intra_op_threads=2))
        a, b = interleaved(lambda: rt1.predict([one]), lambda: rt2.predict([one]), args.runs)
        print(f"  {a * 1e3:.1f} vs {b * 1e3:.1f} ms (x{a / b:.2f} from the second thread)")

    if 4 in only:
        print("\n4. 512x384 (compact) batch 1 while a thread packs 512x384 images: spinning on vs off")
        import threading

        spin = ModelRuntime(path, RuntimeOptions(spin_threads=True))
        calm = ModelRuntime(path, RuntimeOptions(spin_threads=False))
        pixels = decode_image(images["512x384"].data)
        stop = threading.Event()
        packed = [0]

        def packer() -> None:
            while not stop.is_set():
                pack(pixels, rt.packing)
                packed[0] += 1
                time.sleep(0.02)  # ~ a 512x384 request every 30 ms: a busy server's decode pool

        thread = threading.Thread(target=packer, daemon=True)
        thread.start()
        try:
            a, b = interleaved(lambda: spin.predict([one]), lambda: calm.predict([one]), args.runs)
        finally:
            stop.set()
            thread.join()
        print(
            f"  {a * 1e3:.1f} vs {b * 1e3:.1f} ms (x{a / b:.2f} without spinning); {packed[0]} images packed beside"
        )

    if 5 in only:
        print("\n5. exported patch encoder, 512x384 (compact) batch 1: network's own vs rewritten")
        for precision, (plain, rewritten) in _encoder_variants(Path(args.cache)).items():
            a_rt, b_rt = ModelRuntime(plain), ModelRuntime(rewritten)
            a, b = interleaved(
                lambda a_rt=a_rt: a_rt.predict([one]), lambda b_rt=b_rt: b_rt.predict([one]), args.runs
            )
            print(f"  {precision}: {a * 1e3:.1f} -> {b * 1e3:.1f} ms (x{a / b:.2f})")

    if 6 in only:
        print("\n6. 512x384 (compact) batch 1, 8 images: one run at a time vs two concurrent runs")
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            a, b = interleaved(
                lambda: [rt.predict([one]) for _ in range(8)],
                lambda: list(pool.map(lambda _: rt.predict([one]), range(8))),
                args.runs,
            )
        print(f"  {8 / a:.2f} vs {8 / b:.2f} images/s (x{a / b:.2f} from concurrency)")

    if 7 in only:
        print("\n7. where ORT's time goes: operator shares, 512x384 (compact) batch 1, served graphs")
        for precision, model_path in official_models(Path(args.cache)).items():
            shares, ms = operator_profile(model_path, one, args.runs)
            top = ", ".join(f"{op} {share:.0%}" for op, share in shares[:12])
            print(f"  {precision} ({ms:.1f} ms per run, profiled): {top}")

    if 8 in only:
        chunked_encoder(Path(args.cache), args.runs, chunks)
    if 9 in only:
        split_halves(Path(args.cache), args.runs, chunks)
    if 10 in only:
        feature_probes(Path(args.cache), args.runs)


def interleaved_all(fns: dict[str, Callable[[], object]], runs: int, settle: float = 0.2) -> dict[str, float]:
    """Median seconds of each function, run in turn after one warm-up each.

    The order rotates by one every round (A B C, B C A, C A B, ...), so that no function always
    follows the same neighbour: torch's OpenMP threads keep spinning for a while after a product
    and would slow down whichever function came next. `settle` seconds of sleep (untimed) after
    every call let such threads go idle."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            s = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - s)
            time.sleep(settle)
    return {name: statistics.median(t) for name, t in times.items()}


# Experiment 8's variants: (chunk rows, embedding inside the body, padding rows sliced before the
# embedding, the ONNX op). Chunk 0 is the graph before issue 19 (the whole batch through each
# operator).
CHUNK_VARIANTS = {
    "whole batch (before)": (0, False, False, "Scan"),
    "chunk 8": (8, False, False, "Scan"),
    "chunk 16": (16, False, False, "Scan"),
    "chunk 32": (32, False, False, "Scan"),
    "chunk 64": (64, False, False, "Scan"),
    "chunk 16, Loop instead of Scan": (16, False, False, "Loop"),
    "chunk 16, embedding in the body": (16, True, False, "Scan"),
    "chunk 16, padding sliced before the embedding": (16, False, True, "Scan"),
}


def _sgemm_products(n: int = 2048) -> tuple[int, dict[str, Callable[[], object]]]:
    """Two n^3 float32 products (ONNX Runtime's MLAS and torch, 2 threads each) to time inside an
    interleaved loop: the roofline's denominator under the same load as the model."""
    import numpy as np
    import torch

    from bench.stats import _ort_matmul

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    mlas = _ort_matmul(n)
    return n, {
        f"sgemm MLAS {n}^3": lambda: mlas.run(None, {"a": a, "b": b}),
        f"sgemm torch {n}^3": lambda: torch.mm(ta, tb),
    }


def _print_header(
    title: str, tokens: int, runs: int, med: dict[str, float], sgemm: dict[str, object], n: int
) -> float:
    """Prints a case's first line with the sgemm rates of the same loop; returns the fastest
    (GFLOP/s), the roofline's denominator."""
    rates = {k: 2 * n**3 / med[k] / 1e9 for k in sgemm}
    fastest = max(rates, key=lambda k: rates[k])
    print(
        f"\n{title} ({tokens} tokens, batch 1, 2 threads), median of {runs} interleaved rounds; sgemm "
        + ", ".join(f"{k.split()[1]} {v:.0f}" for k, v in rates.items())
        + f" GFLOP/s (roofline: {fastest.split()[1]})"
    )
    return rates[fastest]


def _default_and_images() -> tuple[Path, object, dict[str, object]]:
    """The embedded model's checkpoint and config, and the benchmark images by name."""
    from model.checkpoint import load_checkpoint

    default_ckpt = Path(__file__).resolve().parents[1] / "model" / "weights" / "default.safetensors"
    images = {im.name: im for im in load_mix("512x384", OFFICIAL) + load_mix("mixed", OFFICIAL)}
    return default_ckpt, load_checkpoint(default_ckpt).config, images


def chunked_encoder(cache: Path, runs: int, chunks: set[int] | None = None) -> None:
    """Experiment 8: each chunking variant against the whole-batch graph and the sgemm, interleaved.

    Sessions use 2 intra-op threads without spinning (as the service runs); pin the process to
    two cores (`taskset -c 0,1`) on a larger machine. The sgemm products run inside the same
    interleaved loop, so the roofline's denominator sees the same load as the model."""

    from model.packing import collate

    n, sgemm = _sgemm_products()
    default_ckpt, default_cfg, images = _default_and_images()
    cases = [
        ("official-size", "512x384", OFFICIAL, None, ("fp32", "int8")),
        ("default (embedded)", "1024x768", default_cfg, default_ckpt, ("fp32",)),
    ]
    for label, image, cfg, ckpt, precisions in cases:
        packed = compact(pack(decode_image(images[image].data), cfg.packing()))
        batch = collate([packed])
        feeds = {"patches": batch.patches, "spatial": batch.spatial, "scale": batch.scale, "mask": batch.mask}
        flops = forward_flops(cfg, packed.num_tokens)
        for precision in precisions:
            files = _chunk_variant_files(cache, label, cfg, ckpt, precision)
            if chunks:  # the before graph, and the plain variants of the chunk sizes asked for
                files = {k: f for k, f in files.items() if CHUNK_VARIANTS[k][0] in chunks and "," not in k}
            if ckpt is not None and precision == "fp32":
                files["model/weights/default.onnx (shipped)"] = ckpt.with_suffix(".onnx")
            sessions = {name: _session(path, 2) for name, path in files.items()}
            scores = {name: float(s.run(None, feeds)[0][0]) for name, s in sessions.items()}
            fns: dict[str, Callable[[], object]] = {
                name: (lambda s=s, f=feeds: s.run(None, f)) for name, s in sessions.items()
            }
            med = interleaved_all({**fns, **sgemm}, runs)
            peak = _print_header(f"8. {label} {precision}, {image}", packed.num_tokens, runs, med, sgemm, n)
            before = med["whole batch (before)"]
            for name in files:
                print(
                    f"  {name:48s} {med[name] * 1e3:7.1f} ms  x{before / med[name]:.2f}  "
                    f"{roofline_fraction(flops, 1 / med[name], peak):4.0%} of sgemm  score {scores[name]:.5f}"
                )


def split_halves(cache: Path, runs: int, chunks: set[int] | None = None) -> None:
    """Experiment 9: `ModelRuntime.predict` on the whole graph against the split halves, one image
    at a time, 2 threads (2 feature workers for the split), interleaved with the sgemm products.
    `chunks`: the whole graph and the split at these chunk sizes only.

    Pin the process to two cores (`taskset -c 0,1`) on a larger machine."""

    from export.metadata import split_paths

    n, sgemm = _sgemm_products()
    default_ckpt, default_cfg, images = _default_and_images()
    cases = [
        ("default (embedded)", ("1024x768", "300x4000"), default_cfg, default_ckpt),
        ("official-size", ("512x384",), OFFICIAL, None),
    ]
    for label, names, cfg, ckpt in cases:
        files = _split_files(cache, ckpt)
        variants: dict[str, ModelRuntime] = {
            "whole graph (before)": ModelRuntime(
                files["whole"], RuntimeOptions(intra_op_threads=2, split_encoder=False)
            )
        }
        for chunk in sorted(chunks or (8, 16, 32, 64)):
            variants[f"split, chunk {chunk}"] = ModelRuntime(
                files["whole"], RuntimeOptions(intra_op_threads=2, encoder_chunk=chunk)
            )
        if not chunks:
            for variant, what in (
                ("unfolded", "scales not folded"),
                ("reshape-last", "output reshaped last (before)"),
                ("affine-in-norm", "affine inside the LayerNorms (not kept)"),
                ("matmul-1x1", "1x1 convolutions as MatMuls (not kept)"),
            ):
                variants[f"split, chunk 32, {what}"] = ModelRuntime(
                    files[variant], RuntimeOptions(intra_op_threads=2, encoder_chunk=32)
                )
            blocked = _EmbedInWorkers(
                split_paths(files["whole"])[0], files["embed"], files["transformer"], 64
            )
            variants["split, embedding per 64-row block in the workers"] = blocked  # type: ignore[assignment]
            variants["split, chunk 32, even chunks per worker (not kept)"] = _even_chunks(files["whole"])
            variants["split, chunk 32, head threads spinning (not kept)"] = _spinning_head(files["whole"])
        splits = [rt for name, rt in variants.items() if name.startswith("split, chunk")]
        assert all(isinstance(rt, ModelRuntime) and rt.split is not None for rt in splits)
        for name in names:
            packed = compact(pack(decode_image(images[name].data), cfg.packing()))
            scores = {k: rt.predict([packed])[0].score for k, rt in variants.items()}
            fns: dict[str, Callable[[], object]] = {
                k: (lambda rt=rt, p=packed: rt.predict([p])) for k, rt in variants.items()
            }
            med = interleaved_all({**fns, **sgemm}, runs)
            peak = _print_header(f"9. {label} fp32, {name}", packed.num_tokens, runs, med, sgemm, n)
            flops = forward_flops(cfg, packed.num_tokens)
            before = med["whole graph (before)"]
            for k in variants:
                print(
                    f"  {k:58s} {med[k] * 1e3:7.1f} ms  x{before / med[k]:.2f}  "
                    f"{roofline_fraction(flops, 1 / med[k], peak):4.0%} of sgemm  "
                    f"|score - before| {abs(scores[k] - scores['whole graph (before)']):.1e}"
                )


def feature_probes(cache: Path, runs: int) -> None:
    """Experiment 10: the default model's features half on one thread, 32 rows of a 1024x768
    photo, as exported against each probe, interleaved; per-token times and the probes' error."""
    import numpy as np

    files = _feature_probe_files(cache)
    sessions = {name: _session(path, 1) for name, path in files.items()}
    _, cfg, images = _default_and_images()
    packed: PackedImage = compact(pack(decode_image(images["1024x768"].data), cfg.packing()))  # type: ignore[attr-defined]
    rows = np.ascontiguousarray(packed.patches[packed.mask][:32])
    outputs = {name: s.run(None, {"rows": rows})[0] for name, s in sessions.items()}
    fns: dict[str, Callable[[], object]] = {
        name: (lambda s=s: s.run(None, {"rows": rows})) for name, s in sessions.items()
    }
    med = interleaved_all(fns, runs, settle=0.0)
    base, ref = med["as exported"], outputs["as exported"]
    print(
        f"\n10. default model's features half, 32 rows of a 1024x768 photo, 1 thread, median of {runs} rounds"
    )
    for name in files:
        # the unscaled rows differ by the scale the head would absorb: no error to show
        err = np.abs(outputs[name] - ref).max() / np.abs(ref).max()
        shown = "-" if "multiply" in name else f"{err:.1e} of the range"
        print(
            f"  {name:46s} {med[name] / 32 * 1e6:6.1f} us a row  x{base / med[name]:.3f}  max error {shown}"
        )


def _feature_probe_files(cache: Path) -> dict[str, Path]:
    """Experiment 10's files, cached: the shipped features half, a copy without its last multiply
    (traced with the shared scale left out: its output differs by that scale, which the head's
    embedding weights would absorb), and static int8 quantisations of the shipped file."""
    import numpy as np
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from export.graph import FeatureGraph, export_rows_graph
    from model.checkpoint import load_checkpoint
    from model.network import build_model

    default_ckpt, cfg, images = _default_and_images()
    shipped = default_ckpt.with_name("default.features.onnx")
    files = {
        "as exported": shipped,
        "traced here (the next line's baseline)": cache / "probe-features-traced.onnx",
        "last multiply removed (upper bound of a fold)": cache / "probe-features-unscaled.onnx",
        "int8 convolutions, QDQ": cache / "probe-features-int8-qdq.onnx",
        "int8 convolutions, QLinearConv": cache / "probe-features-int8-qop.onnx",
    }
    if all(p.is_file() for p in files.values()):
        return files
    cache.mkdir(parents=True, exist_ok=True)
    rows = torch.rand(4, cfg.patch_size**2 * 3) * 2 - 1  # type: ignore[attr-defined]
    traced = FeatureGraph(build_model(load_checkpoint(default_ckpt))).eval()
    export_rows_graph(traced, rows, files["traced here (the next line's baseline)"], ("rows", "features"))
    # a model of its own: FeatureGraph folds the GroupNorm scales into its model's kernels in place
    unscaled = FeatureGraph(build_model(load_checkpoint(default_ckpt))).eval()
    unscaled.out_scale = None  # type: ignore[assignment]  # forward: relu(the unit's sum), no multiply
    export_rows_graph(
        unscaled, rows, files["last multiply removed (upper bound of a fold)"], ("rows", "features")
    )
    real = np.concatenate(
        [compact(pack(decode_image(images[n].data), cfg.packing())).patches for n in ("512x384", "300x4000")]  # type: ignore[attr-defined]
    )
    calib = real[np.random.default_rng(0).choice(len(real), 256, replace=False)].astype(np.float32)

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.chunks = iter([{"rows": calib[i : i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.chunks, None)

    for name, fmt in (
        ("int8 convolutions, QDQ", QuantFormat.QDQ),
        ("int8 convolutions, QLinearConv", QuantFormat.QOperator),
    ):
        quantize_static(
            str(shipped),
            str(files[name]),
            Rows(),
            quant_format=fmt,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return files


def _even_chunks(model: Path) -> ModelRuntime:
    """Experiment 9's variant (not kept): each image's rows cut into a multiple of the worker count
    of equal chunks (662 rows: 22 of 30-31, not 20 of 32 and one of 22), so that no worker is
    left with the last chunk while the other waits. Three interleaved runs: no gain beyond noise."""
    import itertools
    import math
    import types

    import numpy as np

    runtime = ModelRuntime(model, RuntimeOptions(intra_op_threads=2, encoder_chunk=32))
    split = runtime.split
    assert split is not None

    def fill(self: Any, rows: np.ndarray, real: np.ndarray, out: np.ndarray) -> None:
        edges = np.flatnonzero(np.diff(np.concatenate(([False], real, [False])).astype(np.int8)))
        jobs, last = [], 0
        for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            out[last:start] = 0
            last = stop
            count = math.ceil(math.ceil((stop - start) / self.chunk) / self.workers) * self.workers
            bounds = np.linspace(start, stop, count + 1).round().astype(int).tolist()
            for a, b in itertools.pairwise(bounds):
                jobs.append(self._pool.submit(self._encode, rows[a:b], out[a:b]))
        out[last:] = 0
        for job in jobs:
            job.result()

    split._fill = types.MethodType(fill, split)  # type: ignore[method-assign]
    return runtime


def _spinning_head(model: Path) -> ModelRuntime:
    """Experiment 9's variant (not kept): the head's two intra-op threads spin between operators
    (the service turns spinning off so that they leave the cores to decoding under load); at batch 1
    on a quiet machine the head's ~60 small operators might gain. Measured: no gain beyond noise."""
    import onnxruntime as ort

    from export.metadata import split_paths

    runtime = ModelRuntime(model, RuntimeOptions(intra_op_threads=2, encoder_chunk=32))
    assert runtime.split is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 2, 1, 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    head = split_paths(model)[1]
    runtime.split.head = ort.InferenceSession(str(head), options, providers=["CPUExecutionProvider"])
    return runtime


class _EmbedInWorkers:
    """Experiment 9's variant that was not kept: each worker encodes a block of rows 32 at a time
    into its own buffer, then multiplies the block by the embedding itself (one single-threaded
    session), so the head reads [tokens, D] instead of the [tokens, 16,384] feature maps; the
    head (`embed` and `transformer` files) is the rest of the graph. `predict` as ModelRuntime's."""

    def __init__(self, features: Path, embed: Path, transformer: Path, block: int) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import onnxruntime as ort

        from service.split import _session

        self.block, self._session = block, _session
        self.paths = features, embed
        self.head = _session(transformer, 2)
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(2)
        self.width = int(ort.InferenceSession(str(features)).get_outputs()[0].shape[-1])
        self.dim = int(self.head.get_inputs()[0].shape[-1])

    def _block(self, rows: object, start: int, stop: int, out: object) -> None:
        import numpy as np

        loc = self.local
        if not hasattr(loc, "features"):
            loc.features, loc.embed = (self._session(p, 1) for p in self.paths)
            loc.buffer = np.empty((self.block, self.width), np.float32)
        for a in range(start, stop, 32):
            b = min(a + 32, stop)
            binding = loc.features.io_binding()
            binding.bind_input("rows", "cpu", 0, np.float32, [b - a, rows.shape[1]], rows[a:b].ctypes.data)  # type: ignore[attr-defined,index]
            binding.bind_output(
                "features",
                "cpu",
                0,
                np.float32,
                [b - a, self.width],
                loc.buffer[a - start : b - start].ctypes.data,
            )
            loc.features.run_with_iobinding(binding)
        out[start:stop] = loc.embed.run(None, {"x": loc.buffer[: stop - start]})[0]  # type: ignore[index]

    def predict(self, items: list[PackedImage]) -> list[object]:
        import types

        import numpy as np

        from model.packing import collate

        batch = collate(items)
        rows = batch.patches.reshape(-1, batch.patches.shape[-1])
        tokens = np.empty((len(rows), self.dim), np.float32)
        jobs = [
            self.pool.submit(self._block, rows, i, min(i + self.block, len(rows)), tokens)
            for i in range(0, len(rows), self.block)
        ]
        for job in jobs:
            job.result()
        feeds = {
            "patches": tokens.reshape(*batch.mask.shape, -1),
            "spatial": batch.spatial,
            "scale": batch.scale,
            "mask": batch.mask,
        }
        score = self.head.run(None, feeds)[0]
        return [
            types.SimpleNamespace(score=float(v)) for v in np.asarray(score).reshape(len(items), -1)[:, 0]
        ]


def _split_files(cache: Path, ckpt: Path | None) -> dict[str, Path]:
    """Experiment 9's files, cached: `musiq export --split` of the model (the whole graph, its
    halves beside it), and a copy per `_FEATURE_VARIANTS` entry with that features half beside the
    same head. The official-size model has random weights (seed 0, as experiment 8)."""
    import shutil
    import tempfile

    import onnx
    import torch

    from export.exporter import export_checkpoint
    from export.graph import export_rows_graph
    from export.metadata import split_paths
    from export.photos import distorted_photos
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.network import Musiq, build_model, to_checkpoint

    slug = "official" if ckpt is None else "default"
    files = {"whole": cache / f"split-{slug}.onnx"}
    files.update({name: cache / f"split-{slug}-{name}.onnx" for name in _FEATURE_VARIANTS})
    extra = {
        "embed": cache / f"split-{slug}-embed.onnx",
        "transformer": cache / f"split-{slug}-transformer.onnx",
    }
    if all(p.is_file() for path in files.values() for p in (path, *split_paths(path))) and all(
        p.is_file() for p in extra.values()
    ):
        return {**files, **extra}
    cache.mkdir(parents=True, exist_ok=True)
    if ckpt is None and (cache / "split-official.safetensors").is_file():
        ckpt = cache / "split-official.safetensors"
    if ckpt is None:
        torch.manual_seed(0)
        model = Musiq(OFFICIAL).eval()
        with torch.no_grad():
            model.head.weight.normal_(0, 0.05)
        ckpt = save_checkpoint(
            to_checkpoint(model, name="official-random", version="0"), cache / "split-official.safetensors"
        )
    model = build_model(load_checkpoint(ckpt))
    shapes = ((1, 1, "none"), (2, 300, "heavy"))
    if not files["whole"].is_file():
        export_checkpoint(ckpt, files["whole"], split=True, shapes=shapes, photos=distorted_photos(limit=4))
    _export_embed_and_transformer(model, extra["embed"], extra["transformer"])
    props = onnx.load(str(files["whole"])).metadata_props
    for name, factory in _FEATURE_VARIANTS.items():
        shutil.copy(files["whole"], files[name])
        shutil.copy(split_paths(files["whole"])[1], split_paths(files[name])[1])  # the same head
        with tempfile.TemporaryDirectory() as tmp:
            rows = torch.rand(4, OFFICIAL.patch_size**2 * 3) * 2 - 1
            src = export_rows_graph(factory(model), rows, Path(tmp) / "f.onnx", ("rows", "features"))
            graph = onnx.load(str(src))
            graph.metadata_props.extend(props)
            onnx.save(graph, split_paths(files[name])[0])
    return {**files, **extra}


def _feature_graph(**options: bool) -> Callable[[object], Any]:
    def make(model: object) -> Any:
        from export.graph import FeatureGraph

        return FeatureGraph(model, **options).eval()  # type: ignore[arg-type]

    return make


def _matmul_1x1(model: object) -> Any:
    """The kept features half with each 1x1 convolution as a MatMul over NCHW maps
    ([Cout, Cin] x [n, Cin, h*w]), whose output needs no NCHWc reorder before its GroupNorm."""
    import torch

    import export.graph as graph

    plain_conv = graph._same_conv

    def conv(c: Any, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
        w = c.standardized_weight()
        if w.shape[-1] != 1 or c.stride[0] != 1:
            return plain_conv(c, x, plain)
        cin, h, width = x.shape[1:]
        out = torch.matmul(w.reshape(w.shape[0], cin), x.reshape(-1, cin, h * width))
        return out.reshape(-1, w.shape[0], h, width)

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph.FeatureGraph(model)  # type: ignore[arg-type]

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            graph._same_conv = conv  # type: ignore[assignment]
            try:
                return self.graph(rows)  # type: ignore[no-any-return]
            finally:
                graph._same_conv = plain_conv

    return Module().eval()


def _affine_in_norm(model: object) -> Any:
    """Experiment 9's not-kept features half: no Mul / Add pass for any GroupNorm affine, each
    riding in its LayerNormalization as a [G, K] scale and bias over rows [n, G, K] (ONNX Runtime
    broadcasts them); the last unit's bias is carried by one of its two norms."""
    import torch
    import torch.nn.functional as F

    from export.graph import FeatureGraph, _same_conv, _same_max_pool

    class AffineLayerNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float):  # type: ignore[override]
            return F.layer_norm(x, (x.shape[-1],), eps=eps) * scale + bias

        @staticmethod
        def symbolic(g: Any, x: object, scale: object, bias: object, eps: float) -> object:
            return g.op("LayerNormalization", x, scale, bias, axis_i=-1, epsilon_f=eps)

    def group_norm(norm: Any, x: torch.Tensor, size: int, shift: Any = None) -> torch.Tensor:
        c, groups = norm.num_channels, norm.num_groups
        k = c // groups * size * size
        scale = norm.weight[:, None].expand(c, size * size).reshape(groups, k)
        bias = (norm.bias if shift is None else norm.bias + shift)[:, None]
        bias = bias.expand(c, size * size).reshape(groups, k)
        return AffineLayerNorm.apply(x.reshape(-1, groups, k), scale, bias, float(norm.eps))

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = FeatureGraph(model, fold=False)  # type: ignore[arg-type]

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            e = self.graph.encoder
            p, root, block = e.patch_size, e.root, e.block
            h, q = p // 2, p // 4
            x = rows.float().reshape(-1, p, p, 3).permute(0, 3, 1, 2)
            x = F.relu(group_norm(root.norm, _same_conv(root.conv, x), h))
            x = _same_max_pool(x.reshape(-1, root.norm.num_channels, h, h), root.pool_pads)
            mid = (-1, block.gn1.num_channels, q, q)
            y = F.relu(group_norm(block.gn1, _same_conv(block.conv1, x), q)).reshape(mid)
            y = F.relu(group_norm(block.gn2, _same_conv(block.conv2, y), q)).reshape(mid)
            a = group_norm(block.gn_proj, _same_conv(block.conv_proj, x), q, block.gn3.bias)
            b = group_norm(block.gn3, _same_conv(block.conv3, y), q, -block.gn3.bias)
            return F.relu((a + b).reshape(-1, block.gn3.num_channels * q * q))

    return Module().eval()


# Experiment 9's features-half variants beside the kept one (`FeatureGraph()`), by file name.
_FEATURE_VARIANTS: dict[str, Callable[[object], Any]] = {
    "unfolded": _feature_graph(fold=False),
    "reshape-last": _feature_graph(reshape_last=True),
    "affine-in-norm": _affine_in_norm,
    "matmul-1x1": _matmul_1x1,
}


def _export_embed_and_transformer(model: object, embed: Path, transformer: Path) -> None:
    """The not-kept variant's graphs: the embedding alone ([n, F] -> [n, D]) and the scoring graph
    whose `patches` are embedded tokens (its patch encoder an identity), fused."""
    import tempfile

    import onnx
    import torch

    from export.graph import ScoringGraph, example_inputs, export_graph, export_rows_graph
    from export.optimize import fuse

    graph = ScoringGraph(model)  # type: ignore[arg-type]
    cfg = graph.model.config
    linear = graph.model.patch_encoder.embedding  # type: ignore[union-attr]
    graph.model.patch_encoder = torch.nn.Identity()  # type: ignore[assignment]
    inputs = list(example_inputs(cfg.patch_size))
    inputs[0] = torch.rand(*inputs[0].shape[:2], cfg.hidden_size)
    export_rows_graph(linear, torch.rand(4, linear.in_features), embed, ("x", "y"))
    with tempfile.TemporaryDirectory() as tmp:
        traced = export_graph(graph, Path(tmp) / "t.onnx", inputs=tuple(inputs))
        onnx.save(fuse(onnx.load(traced), cfg.num_heads, cfg.hidden_size), transformer)


def _session(path: Path, threads: int) -> Any:
    """A CPU session as the service makes them (no thread spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _chunk_variant_files(
    cache: Path, label: str, cfg: object, ckpt: Path | None, precision: str
) -> dict[str, Path]:
    """Experiment 8's ONNX files (traced, fused, int8-quantised where asked), cached by name. The
    official-size model has random weights (seed 0, as bench/export_speed.py): speed does not
    depend on them."""
    import tempfile

    import onnx
    import torch

    from export.graph import ScoringGraph, export_graph
    from export.optimize import fuse, to_int8
    from model.checkpoint import load_checkpoint
    from model.network import Musiq, build_model

    slug = "official" if ckpt is None else "default"
    plain = {k: v for k, v in CHUNK_VARIANTS.items() if "," not in k}  # int8: chunk sizes only
    variants = CHUNK_VARIANTS if precision == "fp32" else plain
    files = {
        name: cache / f"chunk-{slug}-{c}-{int(e)}{int(s)}-{op}.{precision}.onnx"
        for name, (c, e, s, op) in variants.items()
    }
    missing = [name for name, f in files.items() if not f.is_file()]
    if missing:
        if ckpt is None:
            torch.manual_seed(0)
            model = Musiq(OFFICIAL).eval()
            with torch.no_grad():
                model.head.weight.normal_(0, 0.05)
        else:
            model = build_model(load_checkpoint(ckpt))
        cache.mkdir(parents=True, exist_ok=True)
        for name in missing:
            chunk, embed, slice_first, op = variants[name]
            graph = ScoringGraph(
                model, chunk=chunk, embed_in_chunk=embed, slice_first=slice_first, encoder_op=op
            )
            with tempfile.TemporaryDirectory() as tmp:
                traced = onnx.load(export_graph(graph, Path(tmp) / "traced.onnx"))
            fused = fuse(traced, model.config.num_heads, model.config.hidden_size)
            onnx.save(to_int8(fused) if precision == "int8" else fused, files[name])
    return files


def operator_profile(path: Path, packed: PackedImage, runs: int) -> tuple[list[tuple[str, float]], float]:
    """ONNX Runtime's own per-operator profile: (operator type, share of kernel time), largest
    first, and the mean profiled run in ms (profiling adds a little to every operator)."""
    import json
    import os
    import tempfile
    from collections import Counter

    import onnxruntime as ort

    from model.packing import collate

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service runs
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        batch = collate([packed])
        feeds = {"patches": batch.patches, "spatial": batch.spatial, "scale": batch.scale, "mask": batch.mask}
        session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernel: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            kernel[e["args"]["op_name"]] += e["dur"]
    total = sum(kernel.values())
    return [(op, t / total) for op, t in kernel.most_common()], total / (runs + 1) / 1000


def _encoder_variants(cache: Path) -> dict[str, tuple[Path, Path]]:
    """fp32 and int8 files of the official-size model with and without the export patch encoder
    (the same random weights as the harness's models; cached beside them)."""
    import tempfile

    import onnx
    import torch

    from export.graph import ScoringGraph, export_graph
    from export.optimize import fuse, to_int8
    from model.checkpoint import load_checkpoint
    from model.network import build_model

    harness = official_models(cache)  # the checkpoint the harness exported from
    files = {
        (name, p): cache / f"encoder-{name}.{p}.onnx" for name in ("plain", "rewritten") for p in harness
    }
    for name, rewrite in (("plain", False), ("rewritten", True)):
        if all(files[name, p].is_file() for p in harness):
            continue
        model = build_model(load_checkpoint(cache / "musiq-official-seed0.safetensors"))
        props = {p: onnx.load(path).metadata_props for p, path in harness.items()}
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            traced = onnx.load(
                export_graph(ScoringGraph(model, export_encoder=rewrite), Path(tmp) / "traced.onnx")
            )
        fused = fuse(traced, OFFICIAL.num_heads, OFFICIAL.hidden_size)
        for precision, graph in (("fp32", fused), ("int8", to_int8(fused))):
            graph.metadata_props.extend(props[precision])  # what ModelRuntime reads
            onnx.save(graph, files[name, precision])
    return {p: (files["plain", p], files["rewritten", p]) for p in harness}


if __name__ == "__main__":
    main()
