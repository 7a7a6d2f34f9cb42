"""Load generation against a real server process on 127.0.0.1: REST (httpx) and gRPC (grpc.aio).

The server runs as its own process (`python -m cli serve`), as in production, so the load
generator's Python does not share its GIL; on 2 cores the two still share the CPUs, which the
report states. Clients are closed-loop: each sends its next image when the previous answer came
(round-robin over the mix, each client starting at a different image). A phase is bounded both by
a request count and by a duration; at the end, requests still in flight are cancelled (the server
drops them before inference) and only requests answered inside the phase count.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from bench.workload import BenchImage

if TYPE_CHECKING:  # httpx is imported where used: the GPU script runs where it may be missing
    import httpx

    from musiq_client.gen.quality_pb2_grpc import QualityStub

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Record:
    """One answered request: which image, client-side latency and the server's own timings."""

    image: str
    latency_s: float
    decode_s: float
    pack_s: float
    queue_s: float
    infer_s: float
    done_at: float = 0.0  # perf_counter() when the answer arrived


@dataclass(frozen=True)
class Phase:
    concurrency: int
    wall_s: float
    records: tuple[Record, ...]
    errors: int
    cancelled: int

    @property
    def images_per_s(self) -> float:
        return completion_rate([r.done_at for r in self.records], self.wall_s)


def completion_rate(done_at: list[float], wall_s: float, together_s: float = 0.05) -> float:
    """Answers per second between the first and the last answer.

    Counting from the phase start would charge the pipeline's fill time (the first batch at 64
    clients takes seconds) to the rate; counting between answers measures the steady state.
    Answers within `together_s` of the first one (its batch) open the interval and are not
    counted. When the answers span less than a quarter of the wall time (one or two batches),
    there is no steady state to see: answers over the wall time instead.
    """
    if not done_at:
        return 0.0
    first, last = min(done_at), max(done_at)
    if last - first < max(together_s, 0.25 * wall_s):
        return len(done_at) / wall_s if wall_s > 0 else 0.0
    after_first = sum(1 for t in done_at if t > first + together_s)
    return after_first / (last - first)


Send = Callable[[BenchImage], Awaitable[Record]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    grpc_target: str
    process: subprocess.Popen[bytes]


@contextmanager
def serve(model: Path, env: dict[str, str] | None = None, log: Path | None = None) -> Iterator[Server]:
    """`musiq serve` of one ONNX file on free 127.0.0.1 ports, ready (warm-up done) when yielded."""
    import httpx

    http_port, grpc_port = _free_port(), _free_port()
    environment = {
        **os.environ,
        "MUSIQ_HOST": "127.0.0.1",
        "MUSIQ_HTTP_PORT": str(http_port),
        "MUSIQ_GRPC_PORT": str(grpc_port),
        "MUSIQ_MODELS": f'["{model}"]',
        **(env or {}),
    }
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve"], cwd=REPO, env=environment, stdout=out, stderr=out
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} (log: {log})")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 180 s")
            time.sleep(0.2)
        yield Server(url, f"127.0.0.1:{grpc_port}", process)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not isinstance(out, int):  # a log file, not subprocess.DEVNULL
            out.close()


def rest_sender(client: httpx.AsyncClient, url: str) -> Send:
    async def send(image: BenchImage) -> Record:
        start = time.perf_counter()
        response = await client.post(
            f"{url}/v1/score", content=image.data, headers={"Content-Type": "image/jpeg"}
        )
        done = time.perf_counter()
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        t = response.json()["timings"]
        return Record(image.name, done - start, t["decode_s"], t["pack_s"], t["queue_s"], t["infer_s"], done)

    return send


def grpc_sender(stub: QualityStub, pb: ModuleType) -> Send:
    async def send(image: BenchImage) -> Record:
        start = time.perf_counter()
        reply = await stub.Score(pb.ScoreRequest(image=image.data))
        done = time.perf_counter()
        t = reply.timings
        return Record(image.name, done - start, t.decode_s, t.pack_s, t.queue_s, t.infer_s, done)

    return send


async def closed_loop(
    send: Send, images: list[BenchImage], concurrency: int, *, requests: int, duration_s: float
) -> Phase:
    """`concurrency` clients share `requests` sends; the phase also ends after `duration_s`."""
    records: list[Record] = []
    errors = 0
    issued = 0
    start = time.perf_counter()
    end = start + duration_s

    async def client(k: int) -> None:
        nonlocal issued, errors
        i = k
        while issued < requests and time.perf_counter() < end:
            issued += 1
            try:
                records.append(await send(images[i % len(images)]))
            except Exception:
                errors += 1
            i += 1

    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.perf_counter()))
    stop = time.perf_counter()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    # Either the duration ran out (stop ~ end) or every client finished: the last answer ends it.
    return Phase(concurrency, stop - start, tuple(records), errors, len(pending))
