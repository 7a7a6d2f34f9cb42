"""The side-by-side benchmark in one run: pyiqa, ONNX Runtime alone, the service end to end,
and the fp32 roofline, all on this machine in the same process tree (`musiq bench`).

Phases, in order (each printed as it ends):
1. sgemm GFLOP/s of this machine (the roofline's denominator);
2. the official-size model with random weights, exported fp32 and int8 (cached);
3. pyiqa's MUSIQ forward time on every image of every mix (its own virtualenv);
4. ONNX Runtime forward alone per image, batch 1 (the service's own runtime class), plus
   decode + pack per image;
5. per precision, a `musiq serve` process and per mix: concurrency 1 over REST and gRPC, then a
   REST sweep over 1..64 closed-loop clients; batch sizes, batch tokens and padding efficiency
   read from the server's /metrics before and after each sweep.
Results: `results.json` (every figure), `BENCHMARK.md` (tables and targets) and PNG plots.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from bench import load, prom
from bench.stats import Latency, sgemm_gflops, timed
from bench.workload import MIXES, BenchImage, load_mix, mix_flops, write_files
from model.config import OFFICIAL
from model.flops import forward_flops

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """How much to measure: the defaults for the report (sized for ~20 min on a quiet 2-core machine,
    an estimate: every level is bounded by `max_level_s`), `quick()` to try it out (~10 min)."""

    mixes: tuple[str, ...] = MIXES
    precisions: tuple[str, ...] = ("fp32", "int8")
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    latency_requests: int = 20  # per mix and protocol at concurrency 1
    mixed_cycles: int = 8  # "mixed" at concurrency 1: rounds through its 5 images, per protocol
    # A sweep level lasts max(level_s, 2 x clients x the c=1 mean latency), at most max_level_s: long
    # enough for every client to be answered about twice even at 64 clients.
    level_s: dict[str, float] = field(default_factory=lambda: {"512x384": 8.0, "clive": 8.0, "mixed": 20.0})
    max_level_s: float = 45.0
    forward_runs: int = 5  # ORT alone, per image
    pyiqa_runs: int = 3
    clive_images: int = 8
    pyiqa: bool = True
    server_env: dict[str, str] = field(default_factory=dict)
    quick_mode: bool = False

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            concurrencies=(1, 4, 16),
            latency_requests=4,
            mixed_cycles=1,
            level_s={"512x384": 3.0, "clive": 3.0, "mixed": 6.0},
            max_level_s=12.0,
            forward_runs=2,
            pyiqa_runs=1,
            clive_images=2,
            quick_mode=True,
        )


# Serving settings of the benchmark: the whole native resolution (pyiqa computes it too) and
# queue limits that let 64 clients wait for a 3000-token image without a 429 or a 504.
BENCH_SERVER_ENV = {
    "MUSIQ_MAX_NATIVE_TOKENS": "-1",
    "MUSIQ_REQUEST_TIMEOUT_S": "600",
    "MUSIQ_MAX_QUEUE_ITEMS": "1024",
    "MUSIQ_GRPC_ENABLED": "true",
}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ort_forward(model: Path, images: list[BenchImage], runs: int) -> dict[str, dict[str, float]]:
    """Per image, median seconds: ORT forward alone (batch 1) of the official layout and of the
    compact one the service computes (padding rows dropped), and decode + pack."""
    from model.decode import decode_image
    from model.packing import compact, pack
    from service.runtime import ModelRuntime

    runtime = ModelRuntime(model)
    packing = runtime.packing
    out = {}
    for im in images:
        decode_s = timed(lambda im=im: decode_image(im.data), runs)
        pixels = decode_image(im.data)
        pack_s = timed(lambda pixels=pixels: pack(pixels, packing), runs)
        packed = pack(pixels, packing)
        small = compact(packed)
        full_s = timed(lambda packed=packed: runtime.predict([packed]), runs)
        forward_s = timed(lambda small=small: runtime.predict([small]), runs)
        out[im.name] = {
            "tokens": packed.num_tokens,
            "valid_tokens": small.num_tokens,
            "forward_full_s": _median(full_s),
            "forward_s": _median(forward_s),
            "decode_s": _median(decode_s),
            "pack_s": _median(pack_s),
        }
    return out


def _phase_dict(phase: load.Phase) -> dict[str, Any]:
    lat = Latency.of([r.latency_s for r in phase.records])
    per_image: dict[str, list[float]] = {}
    for r in phase.records:
        per_image.setdefault(r.image, []).append(r.latency_s)

    def med(attr: str) -> float:
        return _median([getattr(r, attr) for r in phase.records])

    return {
        "concurrency": phase.concurrency,
        "completed": len(phase.records),
        "errors": phase.errors,
        "cancelled": phase.cancelled,
        "wall_s": phase.wall_s,
        "images_per_s": phase.images_per_s,
        "latency": asdict(lat),
        "per_image_p50_s": {k: _median(v) for k, v in per_image.items()},
        "answered_by_image": {k: len(v) for k, v in per_image.items()},
        "server_median_s": {a: med(a) for a in ("decode_s", "pack_s", "queue_s", "infer_s")},
        "overhead_median_s": _median([r.latency_s - r.infer_s for r in phase.records]),
    }


async def _idle(url: str, limit_s: float = 120.0) -> None:
    """Waits until the batch running when a level was cut off has finished (bounded)."""
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            if prom.busy((await client.get(f"{url}/metrics")).text) == 0:
                return
            await asyncio.sleep(0.1)


def _scrape(url: str, model: str) -> prom.Scrape:
    return prom.parse(httpx.get(f"{url}/metrics", timeout=10).text, model)


def _batching(scrape: prom.Scrape) -> dict[str, Any]:
    return {
        "padding_efficiency": scrape.padding_efficiency,
        "batches": scrape.batch_size.count,
        "mean_batch_size": scrape.batch_size.mean,
        "batch_size_distribution": scrape.batch_size.distribution(),
        "mean_batch_tokens": scrape.batch_tokens.mean,
        "batch_tokens_distribution": scrape.batch_tokens.distribution(),
    }


async def _service_mix(
    server: load.Server,
    model_name: str,
    images: list[BenchImage],
    plan: Plan,
    mix: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import grpc

    from musiq_client.gen import quality_pb2, quality_pb2_grpc

    result: dict[str, Any] = {}
    n1 = plan.mixed_cycles * len(images) if mix == "mixed" else plan.latency_requests
    cap = max(60.0, 10 * plan.level_s[mix])
    limits = httpx.Limits(
        max_connections=max(plan.concurrencies) + 4, max_keepalive_connections=max(plan.concurrencies) + 4
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        rest = load.rest_sender(client, server.url)
        await rest(images[0])  # connection set-up outside the measurement
        result["rest_c1"] = _phase_dict(await load.closed_loop(rest, images, 1, requests=n1, duration_s=cap))
        log(f"    REST c=1: p50 {result['rest_c1']['latency']['p50'] * 1e3:.1f} ms")
        async with grpc.aio.insecure_channel(
            server.grpc_target, options=[("grpc.max_send_message_length", 64 * 2**20)]
        ) as channel:
            send = load.grpc_sender(quality_pb2_grpc.QualityStub(channel), quality_pb2)
            await send(images[0])
            result["grpc_c1"] = _phase_dict(
                await load.closed_loop(send, images, 1, requests=n1, duration_s=cap)
            )
        log(f"    gRPC c=1: p50 {result['grpc_c1']['latency']['p50'] * 1e3:.1f} ms")
        sweep = []
        before = _scrape(server.url, model_name)
        t1 = result["rest_c1"]["latency"]["mean"]
        for c in plan.concurrencies:
            level_before = _scrape(server.url, model_name)
            duration = min(plan.max_level_s, max(plan.level_s[mix], 2 * c * t1))
            phase = await load.closed_loop(rest, images, c, requests=10**9, duration_s=duration)
            entry = _phase_dict(phase)
            entry["batching"] = _batching(_scrape(server.url, model_name).since(level_before))
            sweep.append(entry)
            log(
                f"    REST c={c:>2}: {entry['images_per_s']:.2f} img/s, p50 {entry['latency']['p50'] * 1e3:.0f} ms, "
                f"p99 {entry['latency']['p99'] * 1e3:.0f} ms, mean batch {entry['batching']['mean_batch_size']:.2f}"
            )
            await _idle(server.url)  # the next level starts on an empty server
        result["sweep"] = sweep
        result["sweep_batching"] = _batching(_scrape(server.url, model_name).since(before))
    return result


def run(plan: Plan, out: Path, cache: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every phase and writes results.json; returns the results."""
    from bench.models import official_models

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"plan": asdict(plan), "quick": plan.quick_mode, "machine": _machine()}
    peak, peak_by = sgemm_gflops()
    results["sgemm"] = {"gflops": peak, "engine": peak_by, "n": 2048}
    log(f"sgemm: {peak:.1f} GFLOP/s ({peak_by})")
    models = official_models(cache, log=log)
    images = {mix: load_mix(mix, OFFICIAL, plan.clive_images) for mix in plan.mixes}
    results["mixes"] = {
        mix: {
            "images": [
                {
                    "name": i.name,
                    "width": i.width,
                    "height": i.height,
                    "tokens": i.tokens,
                    "valid": i.valid_tokens,
                }
                for i in ims
            ],
            "flops_per_image": mix_flops(ims, OFFICIAL),
            "flops": {i.name: forward_flops(OFFICIAL, i.valid_tokens) for i in ims},
        }
        for mix, ims in images.items()
    }

    if plan.pyiqa:
        from bench import pyiqa_env

        paths = {mix: write_files(ims, cache / "images" / mix) for mix, ims in images.items()}
        flat = [p for ps in paths.values() for p in ps]
        raw = pyiqa_env.forward_times(flat, plan.pyiqa_runs, log=log)
        seconds = cast(dict[str, list[float]], raw.pop("seconds"))
        results["pyiqa"] = {
            **raw,
            "forward_s": {Path(p).stem: _median(v) for p, v in seconds.items()},
        }
        log(f"pyiqa: {results['pyiqa']['forward_s']}")

    from service.heap import keep_freed_memory
    from service.settings import ServiceSettings

    keep_freed_memory(ServiceSettings().heap_keep_mb)  # decode + pack timed as the service runs them
    results["ort"] = {}
    for precision in plan.precisions:
        results["ort"][precision] = {
            mix: ort_forward(models[precision], ims, plan.forward_runs) for mix, ims in images.items()
        }
        log(f"ORT {precision} forward alone: done")

    from service.runtime import ModelRuntime

    results["int8_parity"] = ModelRuntime(models["int8"]).metadata.parity.get("int8_vs_fp32", {})
    results["service"] = {}
    for precision in plan.precisions:
        model_name = ModelRuntime(models[precision]).name
        env = {**BENCH_SERVER_ENV, **plan.server_env}
        results["service"][precision] = {}
        with load.serve(models[precision], env, log=cache / f"server-{precision}.log") as server:
            for mix, ims in images.items():
                log(f"service {precision} {mix}:")
                results["service"][precision][mix] = asyncio.run(
                    _service_mix(server, model_name, ims, plan, mix, log)
                )
    # The peak is what the machine can do: on a shared machine the start and the end of a run
    # can see different loads, and the larger (the harder roofline to reach) is kept.
    end_peak, end_by = sgemm_gflops()
    results["sgemm"]["at_end"] = end_peak
    if end_peak > peak:
        results["sgemm"].update(gflops=end_peak, engine=end_by)
    log(f"sgemm at the end: {end_peak:.1f} GFLOP/s")
    results["wall_s"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _machine() -> dict[str, Any]:
    import os

    import onnxruntime

    return {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "loadavg_at_start": os.getloadavg(),
    }
