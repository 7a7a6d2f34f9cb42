"""The benchmark on a GPU machine: images/s and latency (p50, p99) for the 512x384 and mixed loads.

Run by `bench/gpu_run.sh` on a lent machine (no network, a copy of the repository, Python 3.12
with torch and onnxruntime but none of the serving stack). What runs:
- the official-size model with random weights, traced and fused by the project's exporter
  functions (`export.graph`, `export.optimize`), fp32 and fp16, with the project's metadata,
  served by the service's own `ModelRuntime` (CUDA provider; TensorRT first when ONNX Runtime has
  it) behind the service's own `Batcher`; each request packs its image in a thread pool (as the
  service does) and is submitted to the batcher: the service pipeline without HTTP and decoding;
- when ONNX Runtime has no GPU provider (the plain `onnxruntime` wheel; `onnxruntime-gpu` is a
  256 MB wheel, over what a call can carry), the same pipeline with the project's PyTorch network
  on CUDA (fp32, and fp16 weights) instead, labelled as such in the results;
- images are packed and their padding rows dropped (`model.packing.compact`), as the service does;
- closed-loop clients at several concurrencies; every level bounded in time, the whole run
  bounded by --budget-s (levels are skipped, and said so, once it is spent).
Images: the mixes' sizes (512x384; 481x321, 321x481, 1024x768, 2000x1500, 300x4000) cut from a
scikit-image photo (../shared/data does not travel there); token counts, hence cost, depend only on
the size. Writes gpu_results.json and gpu_results.md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.load import Record, closed_loop
from bench.stats import Latency
from bench.workload import MIXED_RESIZED, BenchImage
from model.config import OFFICIAL
from model.packing import PackedImage, collate, compact, pack
from service.batcher import Batcher, BatcherConfig

if TYPE_CHECKING:  # torch is imported where used
    from model.network import Musiq

SIZES = {"512x384": [(512, 384)], "mixed": [(481, 321), (321, 481), *MIXED_RESIZED]}


def photo(width: int, height: int) -> np.ndarray:
    """A real photo at this size (scikit-image's astronaut, else a smooth synthetic scene)."""
    from PIL import Image

    try:
        from skimage import data

        img = Image.fromarray(data.astronaut())
    except Exception:
        y, x = np.mgrid[0:512, 0:512].astype(np.float32)
        rgb = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), (x + y) / 7 % 256], axis=-1)
        img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.BICUBIC))


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "no GPU found"


def random_official() -> Musiq:
    """The official-size network, seeded random weights (a spread head, so scores are not all 0)."""
    import torch

    from model.network import Musiq

    torch.manual_seed(0)
    model = Musiq(OFFICIAL).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)
    return model


def export_onnx(folder: Path, precision: str) -> Path:
    """The official-size model, random weights, traced + fused (+ fp16) with the project's metadata."""
    import onnx

    from export.graph import ScoringGraph, export_graph
    from export.metadata import ModelMetadata
    from export.optimize import fuse, to_fp16

    path = folder / f"official.{precision}.onnx"
    if path.is_file():
        return path
    model = random_official()
    traced = onnx.load(export_graph(ScoringGraph(model), folder / "traced.onnx"))
    graph = fuse(traced, OFFICIAL.num_heads, OFFICIAL.hidden_size)
    if precision == "fp16":
        graph = to_fp16(graph, keep_float32=tuple(o.name for o in graph.graph.output))
    meta = ModelMetadata(
        name=f"musiq-official-random-{precision}",
        version="0",
        patch_size=OFFICIAL.patch_size,
        grid_size=OFFICIAL.grid_size,
        longer_sides=OFFICIAL.longer_sides,
        max_native_tokens=-1,
        head="score",
        num_outputs=1,
        score_range=(0.0, 100.0),
        precision=precision,
        source_sha256="random-weights",
        outputs=tuple(o.name for o in graph.graph.output),
    )
    for key, value in meta.to_props().items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, path)
    return path


def ort_engine(
    path: Path, providers: tuple[str, ...]
) -> tuple[Callable[[Sequence[PackedImage]], list[float]], str]:
    from service.runtime import ModelRuntime, RuntimeOptions

    runtime = ModelRuntime(path, RuntimeOptions(providers=providers))
    return (lambda items: [p.score for p in runtime.predict(items)]), f"onnxruntime {runtime.providers[0]}"


def torch_engine(precision: str, device: str) -> tuple[Callable[[Sequence[PackedImage]], list[float]], str]:
    import torch

    model = random_official().fold_weight_standardization().to(device)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = model.to(dtype)

    def run(items: Sequence[PackedImage]) -> list[float]:
        b = collate(list(items))
        with torch.inference_mode():
            score = model(
                torch.from_numpy(b.patches).to(device, dtype),
                torch.from_numpy(b.spatial).to(device),
                torch.from_numpy(b.scale).to(device),
                torch.from_numpy(b.mask).to(device),
            )
        return score.float().cpu().numpy().reshape(len(items), -1)[:, 0].tolist()

    return run, f"PyTorch {torch.__version__} eager on {device} ({precision} weights)"


async def measure(
    run_batch: Callable[[Sequence[PackedImage]], list[float]],
    pixels: dict[str, np.ndarray],
    concurrency: int,
    duration_s: float,
    pool: ThreadPoolExecutor,
) -> dict[str, Any]:
    """Closed-loop clients: pack in the pool (as the service does), then the service's batcher."""
    packing = OFFICIAL.packing()
    batcher: Batcher[PackedImage, float] = Batcher(run_batch, BatcherConfig())
    await batcher.start()
    loop = asyncio.get_running_loop()

    async def send(image: BenchImage) -> Record:
        start = time.perf_counter()
        packed = await loop.run_in_executor(pool, lambda: compact(pack(pixels[image.name], packing)))
        timings: dict[str, float] = {}
        await batcher.submit(packed, packed.num_tokens, timings=timings)
        done = time.perf_counter()
        return Record(image.name, done - start, 0.0, 0.0, timings["queue_s"], timings["infer_s"], done)

    images = [BenchImage(name, b"", *arr.shape[1::-1], 0) for name, arr in pixels.items()]
    phase = await closed_loop(send, images, concurrency, requests=10**9, duration_s=duration_s)
    await batcher.stop()
    lat = Latency.of([r.latency_s for r in phase.records])
    return {
        "concurrency": concurrency,
        "images_per_s": phase.images_per_s,
        "answered": len(phase.records),
        "errors": phase.errors,
        "p50_ms": lat.p50 * 1e3,
        "p99_ms": lat.p99 * 1e3,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--level-s", type=float, default=6.0, help="seconds per concurrency level")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting levels after this")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    parser.add_argument(
        "--cpu", action="store_true", help="CPU providers only (to try the script without a GPU)"
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu_providers = tuple(p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available)
    cuda = False
    if not args.cpu:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            pass
    results: dict[str, Any] = {
        "gpu": gpu_name() if not args.cpu else "none (--cpu)",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "ort_providers": available,
        "cpus": os.cpu_count(),
        "runs": [],
        "skipped": [],
    }
    print(json.dumps({k: results[k] for k in ("gpu", "onnxruntime", "ort_providers", "cpus")}), flush=True)
    pixels = {mix: {f"{w}x{h}": photo(w, h) for w, h in sizes} for mix, sizes in SIZES.items()}
    results["tokens"] = {
        mix: {name: pack(p, OFFICIAL.packing()).num_tokens for name, p in imgs.items()}
        for mix, imgs in pixels.items()
    }
    pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 2), thread_name_prefix="pack")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            try:
                if args.cpu:
                    engine, label = ort_engine(export_onnx(Path(tmp), precision), ("CPUExecutionProvider",))
                elif gpu_providers:
                    engine, label = ort_engine(export_onnx(Path(tmp), precision), gpu_providers)
                elif cuda:
                    engine, label = torch_engine(precision, "cuda")
                else:
                    results["skipped"].append(
                        f"{precision}: no GPU provider in onnxruntime and no CUDA in torch"
                    )
                    continue
            except Exception as exc:  # record why and go on with the next precision
                results["skipped"].append(f"{precision}: engine failed: {type(exc).__name__}: {exc}")
                print(results["skipped"][-1], flush=True)
                continue
            for mix, imgs in pixels.items():
                warm = time.perf_counter()
                for arr in imgs.values():  # first run per shape: kernel selection, allocations
                    engine([compact(pack(arr, OFFICIAL.packing()))])
                warm_s = time.perf_counter() - warm
                for c in args.concurrency:
                    if time.perf_counter() - t0 > args.budget_s:
                        results["skipped"].append(f"{precision} {mix} c={c}: time budget spent")
                        continue
                    level = asyncio.run(measure(engine, imgs, c, args.level_s, pool))
                    level.update(precision=precision, mix=mix, engine=label, warmup_s=warm_s)
                    results["runs"].append(level)
                    print(json.dumps(level), flush=True)
    pool.shutdown()
    results["wall_s"] = time.perf_counter() - t0
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"GPU: {results['gpu']}; {results['cpus']} CPUs; Python {results['python']}; onnxruntime "
        f"{results['onnxruntime']} ({', '.join(results['ort_providers'])}); {results.get('wall_s', 0):.0f} s.",
        "Pipeline: pack in a thread pool -> the service's Batcher -> engine (no HTTP, no decode); "
        "closed-loop clients; official-size model, random weights, full native resolution.",
        "",
        "| engine | precision | mix | clients | img/s | p50 ms | p99 ms | answered |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['engine']} | {r['precision']} | {r['mix']} | {r['concurrency']} | {r['images_per_s']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['answered']} |"
        )
    lines += [f"- skipped: {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
