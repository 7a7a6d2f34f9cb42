"""The GPU check's measurements: the real server under closed- and open-loop load, and its report.

Run by `bench/gpu_check.sh` on the lent H200 (no network, Python 3.12 with torch; onnxruntime-gpu
and the serving wheels carried by tools/gpu_carry.sh). Subcommands:
- `export`: the official-size network with seeded random weights (or `--tiny`, for the CPU dry run),
  traced, fused and (fp16) converted by the project's exporter functions, with the project's
  metadata; needs torch, so it runs under the host's own Python, apart from the carried wheels.
- `serve`: one model in the real `musiq serve` (a process of its own, `bench.load.serve`), loaded by
  closed-loop gRPC or REST clients in several client processes (one Python process cannot send
  2,000 requests/s), level after level; optionally an open-loop level at half the best rate (the
  p99 target). Per level: images/s, p50/p99, the server's own per-stage timings from the replies
  (decode, pack, queue, infer; the rest is transport and framework), its batching metrics
  (mean batch size, padding efficiency, from /metrics) and the GPU's utilisation (`nvidia-smi
  dmon` samples inside the level). Every level is appended to `gpu_results.json` and the report
  re-rendered, so a run stopped by its time limit still leaves every finished level behind.
- `report`: renders `gpu_results.md` from `gpu_results.json`, against the issue's targets.
- `pipeline`: the older in-process measurement (pack in threads -> the service's Batcher ->
  ModelRuntime, no HTTP, no decode): the engine's share without the server around it.
Images: the mixes' sizes (512x384; 481x321, 321x481, 1024x768, 2000x1500, 300x4000) cut from a
scikit-image photo and saved as JPEG q90 (../shared/data does not travel there); cost depends on
the size alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.load import Phase, Record, Send, closed_loop, completion_rate
from bench.stats import Latency
from bench.workload import MIXED_RESIZED, BenchImage
from model.config import OFFICIAL, MusiqConfig
from model.packing import PackedImage, compact, pack
from service.batcher import Batcher, BatcherConfig

if TYPE_CHECKING:  # torch is imported where used
    from model.network import Musiq

SIZES = {"512x384": [(512, 384)], "mixed": [(481, 321), (321, 481), *MIXED_RESIZED]}
# The targets (official size, fp16, gRPC, H200).
TARGET_RATE_512 = 2000.0
TARGET_P99_HALF_MS = 100.0
TARGET_C1_P50_MS = 15.0
TARGET_RATE_MIXED = 800.0
# A width-32, two-block network with a linear patch encoder and the official packing: seconds on a CPU.
TINY = MusiqConfig(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_encoder="linear")


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


def jpeg_mix(mix: str) -> list[BenchImage]:
    """The mix's sizes as JPEG q90 files, with their packed token counts (official packing)."""
    from PIL import Image

    out = []
    for w, h in SIZES[mix]:
        pixels = photo(w, h)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        packed = pack(pixels, OFFICIAL.packing())
        out.append(BenchImage(f"{w}x{h}", buf.getvalue(), w, h, packed.num_tokens, packed.num_valid))
    return out


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


# ------------------------------------------------------------------ export


def random_network(config: MusiqConfig = OFFICIAL) -> Musiq:
    """The network at this size, seeded random weights (a spread head, so scores are not all 0)."""
    import torch

    from model.network import Musiq

    torch.manual_seed(0)
    model = Musiq(config).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)
    return model


def export_onnx(
    folder: Path, precision: str, config: MusiqConfig = OFFICIAL, label: str = "official"
) -> Path:
    """The network, random weights, traced + fused (+ fp16) with the project's metadata."""
    import onnx

    from export.graph import ScoringGraph, export_graph
    from export.metadata import ModelMetadata
    from export.optimize import fuse, to_fp16

    path = folder / f"{label}.{precision}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    traced = onnx.load(export_graph(ScoringGraph(random_network(config)), folder / f"{label}.traced.onnx"))
    graph = fuse(traced, config.num_heads, config.hidden_size)
    if precision == "fp16":
        graph = to_fp16(graph, keep_float32=tuple(o.name for o in graph.graph.output))
    meta = ModelMetadata(
        name=f"musiq-{label}-random-{precision}",
        version="0",
        patch_size=config.patch_size,
        grid_size=config.grid_size,
        longer_sides=config.longer_sides,
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
    tmp = path.with_suffix(".partial")
    onnx.save(graph, tmp)
    tmp.rename(path)  # a file under this name is always complete (the export may run in the background)
    return path


# ------------------------------------------------------------------ load against the real server


def _grpc_send(target: str) -> tuple[Send, Callable[[], Any]]:
    import grpc

    from bench.load import grpc_sender
    from musiq_client.gen import quality_pb2, quality_pb2_grpc

    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 2**20)])
    return grpc_sender(quality_pb2_grpc.QualityStub(channel), quality_pb2), channel.close


def _rest_send(url: str, clients: int) -> tuple[Send, Callable[[], Any]]:
    import httpx

    from bench.load import rest_sender

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits)
    return rest_sender(client, url), client.aclose


@dataclass(frozen=True)
class Job:
    """One client process's share of a level (picklable: it crosses into a spawned process)."""

    protocol: str  # grpc | rest
    target: str  # host:port (gRPC) or http://host:port (REST)
    images: tuple[BenchImage, ...]
    clients: int  # closed loop: clients in this process; open loop: 0
    rate: float  # open loop: requests/s from this process; closed loop: 0
    duration_s: float
    offset: int  # where in the mix this process's first client starts


def client_process(job: Job) -> tuple[list[Record], int]:
    """Runs one process's clients for the level; returns its answered records and its errors."""

    async def main() -> tuple[list[Record], int]:
        if job.protocol == "grpc":
            send, close = _grpc_send(job.target)
        else:
            send, close = _rest_send(job.target, max(job.clients, 64))
        images = list(job.images[job.offset % len(job.images) :] + job.images[: job.offset % len(job.images)])
        try:
            if job.clients:
                phase = await closed_loop(
                    send, images, job.clients, requests=10**9, duration_s=job.duration_s
                )
                return list(phase.records), phase.errors
            return await open_loop(send, images, job.rate, job.duration_s)
        finally:
            await close()

    return asyncio.run(main())


async def open_loop(
    send: Send, images: list[BenchImage], rate: float, duration_s: float, max_in_flight: int = 2048
) -> tuple[list[Record], int]:
    """Requests at a fixed rate whatever the answers do; latency counts from the scheduled send, so
    a client that falls behind shows up in the latency instead of hiding (coordinated omission)."""
    records: list[Record] = []
    errors = 0
    start = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int, scheduled: float) -> None:
        nonlocal errors
        try:
            r = await send(images[k % len(images)])
            records.append(
                Record(r.image, r.done_at - scheduled, r.decode_s, r.pack_s, r.queue_s, r.infer_s, r.done_at)
            )
        except Exception:
            errors += 1

    k = 0
    while (scheduled := start + k / rate) < start + duration_s:
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        if len(tasks) >= max_in_flight:
            errors += 1  # the server fell this far behind: count it as refused, do not queue forever
        else:
            task = asyncio.create_task(one(k, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        k += 1
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    return records, errors


def dmon_sm(path: Path | None, start: float, end: float) -> float:
    """Mean SM utilisation (%) of `nvidia-smi dmon -s u -o T` samples between two time.time()s."""
    if path is None or not path.is_file():
        return math.nan
    columns: list[str] = []
    day = time.strftime("%Y-%m-%d", time.localtime(start))
    values = []
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split()
        if line.startswith("#"):
            if "sm" in fields:
                columns = ["time", *fields[1:]]  # "#Time gpu sm mem ...": the data lines' columns
            continue
        if not columns or len(fields) != len(columns):
            continue
        try:
            stamp = time.mktime(time.strptime(f"{day} {fields[0]}", "%Y-%m-%d %H:%M:%S"))
            sm = float(fields[columns.index("sm")])
        except ValueError:
            continue  # '-' when no sample
        if start <= stamp <= end:
            values.append(sm)
    return statistics.fmean(values) if values else math.nan


def summarise(records: Sequence[Record], errors: int, wall_s: float) -> dict[str, Any]:
    """Rate, latency and the server's per-stage means (ms) of one level."""
    lat = Latency.of([r.latency_s for r in records])
    stages = {
        f"{stage}_ms": statistics.fmean(getattr(r, f"{stage}_s") for r in records) * 1e3
        if records
        else math.nan
        for stage in ("decode", "pack", "queue", "infer")
    }
    rest = lat.mean * 1e3 - sum(v for v in stages.values() if not math.isnan(v))
    return {
        "images_per_s": completion_rate([r.done_at for r in records], wall_s),
        "answered": len(records),
        "errors": errors,
        "p50_ms": lat.p50 * 1e3,
        "p99_ms": lat.p99 * 1e3,
        "mean_ms": lat.mean * 1e3,
        **stages,
        "other_ms": rest,  # transport, framework, (de)serialisation, thread hand-offs
    }


class Results:
    """gpu_results.json: environment, one row per level, notes; re-rendered as markdown on every save."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / "gpu_results.json"
        self.data: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {"levels": [], "notes": []}
        )

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))
        (self.out / "gpu_results.md").write_text(markdown(self.data))


def fits(args: argparse.Namespace, t0: float, needs_s: float) -> bool:
    """Whether `needs_s` more seconds end before --deadline (epoch s) and within --budget-s of t0."""
    if args.deadline and time.time() + needs_s > args.deadline:
        return False
    return time.perf_counter() - t0 + needs_s <= args.budget_s


def serve_levels(args: argparse.Namespace) -> int:
    """One model in the real server, its levels one after another, each saved as it ends."""
    import multiprocessing

    import httpx

    from bench.load import serve
    from bench.prom import parse

    t0 = time.perf_counter()
    results = Results(Path(args.out))
    env = {
        "MUSIQ_PROVIDERS": json.dumps(args.providers),
        "MUSIQ_MAX_IN_PROGRESS": "4096",
        "MUSIQ_MAX_QUEUE_ITEMS": "4096",
        **dict(kv.split("=", 1) for kv in args.env),
    }
    mixes = {mix: tuple(jpeg_mix(mix)) for mix in args.mixes}
    dmon = Path(args.dmon) if args.dmon else None
    log = Path(args.log) if args.log else Path(args.out) / f"server-{args.label}.log"
    pool = ProcessPoolExecutor(args.client_processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        start_s = time.perf_counter()
        with serve(Path(args.model), env=env, log=log) as server:
            ready_s = time.perf_counter() - start_s
            target = {"grpc": server.grpc_target, "rest": server.url}
            results.data["notes"].append(f"{args.label}: server ready in {ready_s:.1f} s ({args.model})")
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            results.data["notes"].append(f"{args.label}: {batching(metrics, env)}")
            results.save()
            best: dict[tuple[str, str], float] = {}
            warmed: set[tuple[str, str]] = set()
            for (
                spec
            ) in args.levels:  # protocol:mix:clients, or protocol:mix:half (open loop at half the best)
                protocol, mix, clients = spec.split(":")
                needs = args.level_s + (0 if (protocol, mix) in warmed else args.warm_s) + 10
                if not fits(args, t0, needs):
                    results.data["notes"].append(
                        f"{args.label} {spec}: skipped, it would not end within the step's time"
                    )
                    continue
                images = mixes[mix]
                if (protocol, mix) not in warmed:  # first batches of each shape: plans, allocations
                    run_level(
                        pool,
                        Job(protocol, target[protocol], images, 0, 0, 0, 0),
                        min(64, args.max_clients),
                        args.warm_s,
                        args.client_processes,
                    )
                    warmed.add((protocol, mix))
                half = clients == "half"
                if half:
                    peak = best.get((protocol, mix), 0.0)
                    if peak <= 0:
                        results.data["notes"].append(f"{args.label} {spec}: skipped, no closed-loop rate yet")
                        continue
                    job = Job(protocol, target[protocol], images, 0, peak / 2, args.level_s, 0)
                    concurrency = 0
                else:
                    concurrency = int(clients)
                    job = Job(protocol, target[protocol], images, 0, 0, args.level_s, 0)
                before = parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
                wall_start = time.time()
                records, errors, wall_s = run_level(
                    pool, job, concurrency, args.level_s, args.client_processes
                )
                wall_end = time.time()
                since = parse(httpx.get(f"{server.url}/metrics", timeout=10).text).since(before)
                row = {
                    "model": args.label,
                    "protocol": protocol,
                    "mix": mix,
                    "clients": "open loop" if half else concurrency,
                    "offered_per_s": job.rate if half else None,
                    **summarise(records, errors, wall_s),
                    "batch_mean": since.batch_size.mean,
                    "padding_efficiency": since.padding_efficiency,
                    "gpu_sm_pct": dmon_sm(dmon, wall_start, wall_end),
                }
                if not half:
                    best[(protocol, mix)] = max(best.get((protocol, mix), 0.0), row["images_per_s"])
                results.data["levels"].append(row)
                results.save()
                print(json.dumps(row), flush=True)
    except Exception as exc:  # the server did not start or died: say so in the results, go on
        results.data["notes"].append(f"{args.label}: failed: {type(exc).__name__}: {exc} (log: {log.name})")
        results.save()
        print(results.data["notes"][-1], flush=True)
        return 1
    finally:
        pool.shutdown(cancel_futures=True)
    return 0


def batching(metrics: str, env: dict[str, str]) -> str:
    """The provider the server's session got (its model_info metric) and the batching it implies:
    the settings' device defaults, or what `env` (the server's MUSIQ_* overrides) sets instead."""
    import re

    from service.runtime import device_defaults
    from service.settings import ServiceSettings

    found = re.search(r'musiq_model_info\{[^}]*provider="(\w+)"', metrics)
    provider = found.group(1) if found else "unknown"
    given = {k.removeprefix("MUSIQ_").lower(): v for k, v in env.items() if k.startswith("MUSIQ_")}
    batching_fields = (
        "max_batch_size",
        "max_batch_tokens",
        "max_queue_delay_s",
        "pad_multiple",
        "io_binding",
    )
    settings = ServiceSettings.model_validate({k: v for k, v in given.items() if k in batching_fields})
    cfg = settings.batcher_config(provider)
    d = device_defaults(provider)
    pad = settings.pad_multiple or d.pad_multiple
    bind = d.io_binding if settings.io_binding is None else settings.io_binding
    return (
        f"provider {provider}: batches of <= {cfg.max_batch_size} images and {cfg.max_batch_tokens} tokens, "
        f"{cfg.max_queue_delay_s * 1e3:.0f} ms queue delay, lengths padded to x{pad}, "
        f"IO binding {'on' if bind else 'off'}"
    )


def split_jobs(job: Job, concurrency: int, processes: int, duration_s: float) -> list[Job]:
    """One level over client processes: closed loop, the clients shared out (none idle); open loop
    (concurrency 0), the rate. Each process starts its clients at another image of the mix."""
    n = max(1, min(processes, concurrency or processes))
    jobs = []
    for i in range(n):
        clients = concurrency // n + (1 if i < concurrency % n else 0) if concurrency else 0
        rate = 0.0 if concurrency else job.rate / n
        offset = i * max(1, len(job.images) // n)
        jobs.append(Job(job.protocol, job.target, job.images, clients, rate, duration_s, offset))
    return jobs


def run_level(
    pool: ProcessPoolExecutor, job: Job, concurrency: int, duration_s: float, processes: int
) -> tuple[list[Record], int, float]:
    """Runs a level in the client processes; their records and errors together, and its wall time."""
    start = time.perf_counter()
    futures = [pool.submit(client_process, j) for j in split_jobs(job, concurrency, processes, duration_s)]
    records: list[Record] = []
    errors = 0
    for f in futures:
        r, e = f.result(timeout=duration_s + 120)
        records += r
        errors += e
    return records, errors, time.perf_counter() - start


# ------------------------------------------------------------------ the report


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [
        "# GPU check (bench/gpu_check.sh)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        "Closed-loop clients (in several client processes) against the real `musiq serve`; 'open loop' rows send",
        "at a fixed rate (half the best closed-loop rate) and count latency from the scheduled send. Stage columns",
        "are the server's own timings (mean ms per image; 'other' = end to end minus them: transport, framework,",
        "hand-offs); batch = mean images per inference batch, pad = real/computed tokens (from /metrics); SM % =",
        "`nvidia-smi dmon` utilisation during the level.",
        "",
        "| model | proto | mix | clients | img/s | p50 ms | p99 ms | decode | pack | queue | infer | other | batch | pad | SM % | err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: Any, digits: int = 1) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    for r in data.get("levels", []):
        clients = r["clients"] if r["offered_per_s"] is None else f"open {r['offered_per_s']:.0f}/s"
        lines.append(
            f"| {r['model']} | {r['protocol']} | {r['mix']} | {clients} | {f(r['images_per_s'])} | {f(r['p50_ms'])} | "
            f"{f(r['p99_ms'])} | {f(r['decode_ms'])} | {f(r['pack_ms'])} | {f(r['queue_ms'])} | {f(r['infer_ms'])} | "
            f"{f(r['other_ms'])} | {f(r['batch_mean'])} | {f(r['padding_efficiency'], 2)} | {f(r['gpu_sm_pct'], 0)} | "
            f"{r['errors']} |"
        )
    lines += ["", "## Targets (official size, fp16, gRPC)", "", *targets(data.get("levels", [])), ""]
    lines += ["## Notes", "", *(f"- {n}" for n in data.get("notes", []))]
    return "\n".join(lines) + "\n"


def targets(levels: list[dict[str, Any]]) -> list[str]:
    """Each target, met or not, from the rows of the official fp16 model over gRPC."""
    rows = [
        r for r in levels if r["model"] == "official-fp16" and r["protocol"] == "grpc" and not r["errors"]
    ]
    closed = [r for r in rows if r["offered_per_s"] is None]

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "MISSED")

    best = {mix: max((r["images_per_s"] for r in closed if r["mix"] == mix), default=None) for mix in SIZES}
    c1 = next((r for r in closed if r["mix"] == "512x384" and r["clients"] == 1), None)
    half = next((r for r in rows if r["offered_per_s"] is not None and r["mix"] == "512x384"), None)
    out = []
    b = best["512x384"]
    out.append(
        f"- >= {TARGET_RATE_512:.0f} images/s at 512x384: {f'{b:.0f}' if b else '-'} -> {verdict(None if b is None else b >= TARGET_RATE_512)}"
    )
    if half:
        out.append(
            f"- p99 <= {TARGET_P99_HALF_MS:.0f} ms at half that load ({half['offered_per_s']:.0f}/s offered, "
            f"{half['images_per_s']:.0f}/s answered): {half['p99_ms']:.1f} ms -> {verdict(half['p99_ms'] <= TARGET_P99_HALF_MS)}"
            + (
                ""
                if (b or 0) >= TARGET_RATE_512
                else f" (half of the best measured, not of {TARGET_RATE_512:.0f})"
            )
        )
    else:
        out.append(f"- p99 <= {TARGET_P99_HALF_MS:.0f} ms at half load: not measured")
    out.append(
        f"- concurrency-1 p50 <= {TARGET_C1_P50_MS:.0f} ms: "
        + (f"{c1['p50_ms']:.1f} ms -> {verdict(c1['p50_ms'] <= TARGET_C1_P50_MS)}" if c1 else "not measured")
    )
    m = best["mixed"]
    out.append(
        f"- mixed >= {TARGET_RATE_MIXED:.0f} images/s: {f'{m:.0f}' if m else '-'} -> {verdict(None if m is None else m >= TARGET_RATE_MIXED)}"
    )
    return out


def report(args: argparse.Namespace) -> int:
    results = Results(Path(args.out))
    if args.env_file:
        for line in Path(args.env_file).read_text(errors="replace").splitlines():
            if ": " in line:
                key, value = line.split(": ", 1)
                results.data.setdefault("environment", {})[key.strip()] = value.strip()
    for note in args.note:
        results.data["notes"].append(note)
    results.save()
    print((Path(args.out) / "gpu_results.md").read_text())
    return 0


# ------------------------------------------------------------------ the in-process pipeline (no server)


def ort_engine(
    path: Path, providers: tuple[str, ...]
) -> tuple[Callable[[Sequence[PackedImage]], list[float]], str]:
    from service.runtime import ModelRuntime, RuntimeOptions

    runtime = ModelRuntime(path, RuntimeOptions(providers=providers))
    return (lambda items: [p.score for p in runtime.predict(items)]), f"onnxruntime {runtime.providers[0]}"


async def measure(
    run_batch: Callable[[Sequence[PackedImage]], list[float]],
    pixels: dict[str, np.ndarray],
    concurrency: int,
    duration_s: float,
    pool: ThreadPoolExecutor,
    config: BatcherConfig,
) -> Phase:
    """Closed-loop clients: pack in the pool (as the service does), then the service's batcher."""
    packing = OFFICIAL.packing()
    batcher: Batcher[PackedImage, float] = Batcher(run_batch, config)
    await batcher.start()
    loop = asyncio.get_running_loop()

    def packed(name: str) -> tuple[PackedImage, float]:
        start = time.perf_counter()
        return compact(pack(pixels[name], packing)), time.perf_counter() - start

    async def send(image: BenchImage) -> Record:
        start = time.perf_counter()
        item, pack_s = await loop.run_in_executor(pool, packed, image.name)
        timings: dict[str, float] = {}
        await batcher.submit(item, item.num_tokens, timings=timings)
        done = time.perf_counter()
        return Record(image.name, done - start, 0.0, pack_s, timings["queue_s"], timings["infer_s"], done)

    images = [BenchImage(name, b"", int(arr.shape[1]), int(arr.shape[0]), 0) for name, arr in pixels.items()]
    phase = await closed_loop(send, images, concurrency, requests=10**9, duration_s=duration_s)
    await batcher.stop()
    return phase


def pipeline(args: argparse.Namespace) -> int:
    """The engine behind the service's batcher, in process: what the server adds is the difference."""
    from service.settings import ServiceSettings

    t0 = time.perf_counter()
    results = Results(Path(args.out))
    pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 2), thread_name_prefix="pack")
    engine, label = ort_engine(Path(args.model), tuple(args.providers))
    config = ServiceSettings().batcher_config(label.split()[-1])
    for mix in args.mixes:
        pixels = {f"{w}x{h}": photo(w, h) for w, h in SIZES[mix]}
        for arr in pixels.values():  # first run per shape: kernel selection, allocations
            engine([compact(pack(arr, OFFICIAL.packing()))])
        for c in args.concurrency:
            if not fits(args, t0, args.level_s + 5):
                results.data["notes"].append(f"pipeline {args.label} {mix} c={c}: skipped, time budget spent")
                continue
            phase = asyncio.run(measure(engine, pixels, c, args.level_s, pool, config))
            row = {
                "model": f"{args.label} (in-process, {label})",
                "protocol": "none",
                "mix": mix,
                "clients": c,
                "offered_per_s": None,
                **summarise(phase.records, phase.errors, phase.wall_s),
                "batch_mean": math.nan,
                "padding_efficiency": math.nan,
                "gpu_sm_pct": math.nan,
            }
            results.data["levels"].append(row)
            results.save()
            print(json.dumps(row), flush=True)
    pool.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="random-weight models (needs torch)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--precision", nargs="+", default=["fp16", "fp32"], choices=["fp32", "fp16"])
    ex.add_argument(
        "--tiny", action="store_true", help="a tiny network (CPU dry run) instead of the official size"
    )
    for name in ("serve", "pipeline"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--model", required=True)
        p.add_argument("--label", required=True)
        p.add_argument("--providers", nargs="+", default=["CUDAExecutionProvider", "CPUExecutionProvider"])
        p.add_argument("--level-s", type=float, default=5.0)
        p.add_argument(
            "--budget-s", type=float, default=600.0, help="start no level that would end after this"
        )
        p.add_argument(
            "--deadline", type=float, default=0.0, help="epoch seconds: start no level that would end later"
        )
    serve_p = sub.choices["serve"]
    serve_p.add_argument(
        "--levels", nargs="+", required=True, help="protocol:mix:clients or protocol:mix:half"
    )
    serve_p.add_argument("--mixes", nargs="+", default=list(SIZES))
    serve_p.add_argument(
        "--warm-s", type=float, default=2.0, help="unmeasured load before a mix's first level"
    )
    serve_p.add_argument("--client-processes", type=int, default=4)
    serve_p.add_argument("--max-clients", type=int, default=256)
    serve_p.add_argument(
        "--dmon", default="", help="nvidia-smi dmon -s u -o T output to read utilisation from"
    )
    serve_p.add_argument("--env", nargs="*", default=[], help="extra MUSIQ_*=value for the server")
    serve_p.add_argument("--log", default="", help="the server's log file (default: under --out)")
    pipe_p = sub.choices["pipeline"]
    pipe_p.add_argument("--mixes", nargs="+", default=list(SIZES))
    pipe_p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    rep = sub.add_parser("report")
    rep.add_argument("--out", required=True)
    rep.add_argument("--env-file", default="")
    rep.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "export":
        out = Path(args.out)
        for precision in args.precision:
            start = time.perf_counter()
            path = export_onnx(
                out, precision, TINY if args.tiny else OFFICIAL, "tiny" if args.tiny else "official"
            )
            print(f"exported {path} in {time.perf_counter() - start:.1f} s", flush=True)
        return 0
    if args.command == "serve":
        return serve_levels(args)
    if args.command == "pipeline":
        return pipeline(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
