"""PyTorch eager vs ONNX Runtime fp32 / fp16 / int8 on this CPU, official-size model.

Usage: python bench/export_speed.py [--runs 7] [--out bench/results/export_speed.md]

For a 512x384 and a 1024x768 photo (packed: 385 and 961 tokens) prints milliseconds per image
(median of repeated runs, batch 1) and the achieved GFLOP/s (FLOPs counted from the config and the
token count, `model.flops`) against this machine's sgemm peak, measured in the same run with a
2048^3 float32 matrix product in numpy, torch and ONNX Runtime (the largest counts). Weights are random: speed
does not depend on them. All engines use every core the process may use.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from bench.stats import sgemm_gflops, timed
from export.graph import ENCODER_CHUNK, ScoringGraph, export_graph
from export.optimize import fuse, to_fp16, to_int8
from model.config import OFFICIAL
from model.flops import forward_flops
from model.network import Musiq
from model.packing import collate, pack

PHOTO = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "bsds500"
    / "images"
    / "test"
    / "100007.jpg"
)


def photo(width: int, height: int) -> np.ndarray:
    if PHOTO.is_file():
        img = Image.open(PHOTO).convert("RGB")
    else:
        from export.photos import distorted_photos

        img = Image.fromarray(distorted_photos(limit=1, longer_side=2000)[0][1])
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default="bench/results/export_speed.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Musiq(OFFICIAL).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, chunked = (
            fuse(
                onnx.load(export_graph(ScoringGraph(model, chunk=chunk), Path(tmp) / f"m{chunk}.onnx")),
                OFFICIAL.num_heads,
                OFFICIAL.hidden_size,
            )
            for chunk in (ENCODER_CHUNK, 16)
        )
    variants = {
        "ORT fp32": fp32,
        "ORT fp32, encoder in a Scan of 16 rows (issue 19, not the default)": chunked,
        "ORT fp16": to_fp16(fp32, ("score",)),
        "ORT int8": to_int8(fp32),
    }
    sessions = {}
    for name, m in variants.items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(
            m.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    peak, peak_by = sgemm_gflops()
    rows = []
    for w, h in ((512, 384), (1024, 768)):
        batch = collate([pack(photo(w, h))])
        tokens = batch.mask.shape[1]
        flops = forward_flops(OFFICIAL, tokens)
        inputs = [torch.from_numpy(a) for a in (batch.patches, batch.spatial, batch.scale, batch.mask)]
        feeds = {"patches": batch.patches, "spatial": batch.spatial, "scale": batch.scale, "mask": batch.mask}
        with torch.inference_mode():
            results = {
                "PyTorch eager fp32": statistics.median(
                    timed(lambda inputs=inputs: model(*inputs), args.runs)
                )
            }
        for name, s in sessions.items():
            f = dict(feeds, patches=batch.patches.astype(np.float16)) if "fp16" in name else feeds
            results[name] = statistics.median(timed(lambda s=s, f=f: s.run(None, f), args.runs))
        base = results["PyTorch eager fp32"]
        for name, sec in results.items():
            rows.append(
                (f"{w}x{h}", tokens, name, sec * 1e3, flops / sec / 1e9, flops / sec / 1e9 / peak, base / sec)
            )
        print(f"{w}x{h} done", flush=True)

    lines = [
        f"Official-size MUSIQ ({OFFICIAL.num_layers} layers, D={OFFICIAL.hidden_size}), batch 1, median of {args.runs} runs, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, onnxruntime {ort.__version__}.",
        f"sgemm peak measured in this run: {peak:.1f} GFLOP/s ({peak_by}, 2048^3 float32).",
        "",
        "| image | tokens | engine | ms / image | GFLOP/s | of sgemm peak | speed-up vs eager |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} | {d:.1f} | {e:.1f} | {f:.0%} | {g:.2f}x |" for a, b, c, d, e, f, g in rows]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
