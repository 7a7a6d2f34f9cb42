"""Decode + multi-scale packing speed on one core (issue target: <= 30 ms for a 1024x768 JPEG).

Usage: python bench/pack_speed.py [--runs 50] [--image PATH]

Pins itself to one CPU core, builds a 1024x768 JPEG (quality 90) from a real photo when one is
available (../shared/data/bsds500, upscaled), else from a smooth synthetic scene, and prints the
median and p90 of decode, pack and decode+pack over repeated runs, plus the first (cold-cache)
pack, which also computes the resize weights for a new size.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from model.config import PackingConfig
from model.decode import decode_image
from model.packing import pack
from model.resize import gaussian_spans, pixel_spans
from service.heap import keep_freed_memory
from service.settings import ServiceSettings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "images"


def test_jpeg(path: str | None) -> tuple[bytes, str]:
    if path:
        return Path(path).read_bytes(), path
    photos = sorted(DATA.glob("*/*.jpg")) if DATA.is_dir() else []
    landscape = [p for p in photos if Image.open(p).size == (481, 321)]
    if landscape:
        img, origin = (
            Image.open(landscape[0]).convert("RGB").resize((1024, 768), Image.BICUBIC),
            str(landscape[0]),
        )
    else:
        y, x = np.mgrid[0:768, 0:1024].astype(np.float32)
        rgb = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), (x + y) / 7 % 256], axis=-1)
        img, origin = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), "synthetic scene"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), f"{origin} -> 1024x768 JPEG q90"


def ms(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=10)
    return f"median {statistics.median(samples) * 1e3:6.2f} ms   p90 {q[-1] * 1e3:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--image", help="an image file to use instead of the built-in 1024x768 JPEG")
    parser.add_argument(
        "--heap-keep-mb",
        type=int,
        default=ServiceSettings().heap_keep_mb,
        help="as MUSIQ_HEAP_KEEP_MB (0: glibc's defaults, every request's arrays page-fault anew)",
    )
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    data, origin = test_jpeg(args.image)
    config = PackingConfig()
    keep_freed_memory(args.heap_keep_mb)  # as `musiq serve` runs it

    gaussian_spans.cache_clear()
    pixel_spans.cache_clear()
    t0 = time.perf_counter()
    pixels = decode_image(data)
    t1 = time.perf_counter()
    packed = pack(pixels, config)
    cold = time.perf_counter() - t1

    decode_s, pack_s, total_s = [], [], []
    for _ in range(args.runs):
        a = time.perf_counter()
        pixels = decode_image(data)
        b = time.perf_counter()
        packed = pack(pixels, config)
        c = time.perf_counter()
        decode_s.append(b - a)
        pack_s.append(c - b)
        total_s.append(c - a)

    print(f"image: {origin} ({len(data) / 1024:.0f} KiB), {pixels.shape[1]}x{pixels.shape[0]}")
    print(
        f"tokens: {packed.num_tokens} ({' + '.join(str(s.length) for s in packed.layout)}), one core, {args.runs} runs"
    )
    print(f"decode        {ms(decode_s)}")
    print(
        f"pack          {ms(pack_s)}   (first call, cold weight cache: {cold * 1e3:.2f} ms; first decode {(t1 - t0) * 1e3:.2f} ms)"
    )
    print(f"decode+pack   {ms(total_s)}   target <= 30 ms")


if __name__ == "__main__":
    main()
