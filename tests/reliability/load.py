"""Bounded load on 127.0.0.1: measure capacity (closed loop), then drive a multiple of it (open loop).

Open loop means requests leave on a fixed schedule whatever the server does, as real clients do;
the only client-side bound is `max_outstanding` (a safety cap, counted if ever hit). Every answer
is recorded: status, latency, Retry-After, and any transport error (a reset, a refused or timed
out connection). While it runs, the server's queue depth (from /metrics) and RSS are sampled.

The long run documented in tests/reliability/README.md:

    python -m tests.reliability.load --seconds 300 --factor 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tests.helpers import jpeg
from tests.reliability.serve import rss_bytes, serve_process

# The server under load: a small queue and admission bound, so overload is shed at once (429)
# instead of growing a backlog; accepted work then finishes well inside the 5 s deadline.
SERVER_ENV = {
    "MUSIQ_MAX_QUEUE_ITEMS": "32",
    "MUSIQ_MAX_IN_PROGRESS": "48",
    "MUSIQ_REQUEST_TIMEOUT_S": "5",
    "MUSIQ_MAX_QUEUE_DELAY_S": "0.005",
    "MUSIQ_DECODE_THREADS": "2",
    # The patch stem's activations cost ~0.25 MB per token on CPU: the token budget bounds memory.
    "MUSIQ_MAX_BATCH_TOKENS": "1024",
    "MUSIQ_MAX_BATCH_SIZE": "4",
}
DEADLINE_S = 5.0


def tiny_model(folder: Path) -> Path:
    """A tiny random MUSIQ (2 layers, width 64) exported to ONNX, as the service tests use: the
    load then measures the serving machinery (HTTP, admission, decode, packing, batching) rather
    than the transformer, and CI can reach twice its capacity on two shared cores."""
    from export.exporter import export_checkpoint
    from export.photos import distorted_photos
    from model.checkpoint import save_checkpoint
    from model.network import to_checkpoint
    from tests.test_network import TINY, randomised

    ckpt = save_checkpoint(
        to_checkpoint(randomised(TINY), name="tiny-load", version="1"), folder / "t.safetensors"
    )
    shapes = ((1, 5, "none"),)
    photos = distorted_photos(limit=2, longer_side=96)
    return export_checkpoint(
        ckpt, folder / "tiny.onnx", photos=photos, shapes=shapes, log=lambda s: None
    ).path


def images(count: int = 16) -> list[bytes]:
    """Photos of a few sizes (263 to 353 tokens)."""
    return [jpeg(180 + 12 * (i % 4), 240 + 16 * (i % 4), seed=i) for i in range(count)]


@dataclass
class LoadReport:
    target_rate: float = 0.0
    seconds: float = 0.0
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)
    refused_without_retry_after: int = 0
    client_cap_hits: int = 0
    accepted_p50_s: float = 0.0
    accepted_p99_s: float = 0.0
    accepted_max_s: float = 0.0
    goodput_per_s: float = 0.0
    max_queue_depth: float = 0.0
    max_rss_mib: float = 0.0

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def capacity(url: str, bodies: list[bytes], seconds: float = 5.0, concurrency: int = 6) -> float:
    """Scores per second with `concurrency` clients that each send the next image on an answer
    (waiting out Retry-After when refused, as a good client does); the first second is warm-up."""
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop:
                r = await client.post("/v1/score", content=bodies[i % len(bodies)], headers=_HEADERS)
                if r.status_code != 200:
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                elif time.monotonic() > start + 1.0:
                    done += 1
                i += concurrency

        start = time.monotonic()
        stop = start + 1.0 + seconds
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.monotonic() - start - 1.0)


_HEADERS = {"Content-Type": "image/jpeg"}


async def open_loop(
    url: str, bodies: list[bytes], rate: float, seconds: float, pid: int, max_outstanding: int = 256
) -> LoadReport:
    report = LoadReport(target_rate=rate)
    latencies: list[float] = []
    outstanding = 0
    limits = httpx.Limits(max_connections=max_outstanding, max_keepalive_connections=max_outstanding)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(body: bytes) -> None:
            nonlocal outstanding
            start = time.monotonic()
            try:
                r = await client.post("/v1/score", content=body, headers=_HEADERS)
            except httpx.TransportError as exc:
                name = type(exc).__name__
                report.transport_errors[name] = report.transport_errors.get(name, 0) + 1
                return
            finally:
                outstanding -= 1
            key = str(r.status_code)
            report.statuses[key] = report.statuses.get(key, 0) + 1
            if r.status_code == 200:
                latencies.append(time.monotonic() - start)
            elif r.status_code in (429, 503) and not r.headers.get("Retry-After"):
                report.refused_without_retry_after += 1

        async def watch() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=5) as probe:
                while True:
                    text = (await probe.get("/metrics")).text
                    depth = sum(
                        float(ln.split()[-1])
                        for ln in text.splitlines()
                        if ln.startswith("musiq_queue_depth{")
                    )
                    report.max_queue_depth = max(report.max_queue_depth, depth)
                    report.max_rss_mib = max(report.max_rss_mib, rss_bytes(pid) / 2**20)
                    await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            due = start + report.sent / rate
            if now < due:
                await asyncio.sleep(due - now)
                continue
            if outstanding >= max_outstanding:
                report.client_cap_hits += 1
                await asyncio.sleep(0.001)
                continue
            outstanding += 1
            task = asyncio.create_task(one(bodies[report.sent % len(bodies)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            report.sent += 1
        report.seconds = time.monotonic() - start
        await asyncio.gather(*tasks)
        watcher.cancel()
    if latencies:
        report.accepted_p50_s = float(np.percentile(latencies, 50))
        report.accepted_p99_s = float(np.percentile(latencies, 99))
        report.accepted_max_s = max(latencies)
    report.goodput_per_s = len(latencies) / report.seconds
    return report


def run(seconds: float, factor: float = 2.0, capacity_s: float = 5.0) -> tuple[float, LoadReport]:
    bodies = images()
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(Path(folder))
        return _run(model, bodies, seconds, factor, capacity_s)


def _run(
    model: Path, bodies: list[bytes], seconds: float, factor: float, capacity_s: float
) -> tuple[float, LoadReport]:
    with serve_process({**SERVER_ENV, "MUSIQ_MODELS": json.dumps([str(model)])}) as srv:
        measured = asyncio.run(capacity(srv.url, bodies, capacity_s))
        report = asyncio.run(open_loop(srv.url, bodies, factor * measured, seconds, srv.pid))
        assert srv.alive()
    return measured, report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--factor", type=float, default=2.0)
    args = parser.parse_args()
    measured, report = run(args.seconds, args.factor)
    print(
        json.dumps(
            {"capacity_per_s": measured, "achieved_rate": report.achieved_rate, **asdict(report)}, indent=1
        )
    )
