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
and the sgemm GFLOP/s of the same run (the best of numpy, torch and ONNX Runtime's MLAS), to put
the achieved FLOP rates in proportion.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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
    parser.add_argument("--only", default="1,2,3,4,5,6,7", help="comma-separated experiment numbers")
    args = parser.parse_args()
    only = {int(n) for n in args.only.split(",")}
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
