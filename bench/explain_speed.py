"""What an explanation costs next to a score, on the embedded default model (CPU).

Usage: python bench/explain_speed.py [--runs 7] [--threads 2]

For a 512x384 and a 1024x768 JPEG of a real photo (scikit-image's astronaut, resized), times
side by side in one run: the scoring graph (default.onnx), the explanation graph
(default.rollout.onnx, fp32; until 2d43095 its weights were stored in fp16) and drawing the heatmaps;
prints medians. Decode and packing are the same for both and are left out (`make bench`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from PIL import Image

from model.decode import decode_image
from model.packing import pack
from service.explain import RolloutRuntime, explain_scales, rollout_path
from service.runtime import ModelRuntime, RuntimeOptions
from service.settings import EMBEDDED_ONNX


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up (first-run allocations, resize weights)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from skimage import data

    options = RuntimeOptions(intra_op_threads=args.threads)
    scorer = ModelRuntime(EMBEDDED_ONNX, options)
    explainer = RolloutRuntime(rollout_path(EMBEDDED_ONNX), options)
    packing = dataclasses.replace(scorer.packing, max_native_tokens=512, pad_native=False)
    print(f"default model, {args.threads} threads, median of {args.runs} runs (native tokens capped at 512)")
    print(
        "| image | tokens | score (default.onnx) | rollout (default.rollout.onnx) | heatmaps | explain / score |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for w, h in ((512, 384), (1024, 768)):
        buf = io.BytesIO()
        Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC).save(
            buf, "JPEG", quality=90
        )
        pixels = decode_image(buf.getvalue())
        packed = pack(pixels, packing)
        score_ms = median_ms(partial(scorer.predict, [packed]), args.runs)
        rollout_ms = median_ms(partial(explainer.rollout, packed), args.runs)
        weights = explainer.rollout(packed)
        render_ms = median_ms(partial(explain_scales, pixels, packed, weights), args.runs)
        ratio = (score_ms + rollout_ms + render_ms) / score_ms
        print(
            f"| {w}x{h} | {packed.num_tokens} | {score_ms:.1f} ms | {rollout_ms:.1f} ms | {render_ms:.1f} ms "
            f"| {ratio:.2f}x |"
        )
    assert np.isfinite(weights).all()


if __name__ == "__main__":
    main()
