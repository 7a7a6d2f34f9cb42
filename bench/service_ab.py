"""A/B of server settings end to end: `musiq serve` processes that differ only in `MUSIQ_*`
settings, measured in alternating rounds on the same images (so a machine's drift hits both).

Usage:
    python bench/service_ab.py --precision int8 --mix 512x384 --clients 1 --seconds 15 \\
        A:MUSIQ_HEAP_KEEP_MB=0 B:MUSIQ_HEAP_KEEP_MB=256

`--model FILE.onnx` serves that file instead (e.g. model/weights/default.onnx, the embedded
model). Each round starts one server per variant in turn (the harness's model files and server settings,
`bench/run.py`), warms it for 3 s, then runs a closed loop of `--clients` REST clients for
`--seconds`. Printed per variant and round: images/s, client p50 latency, the server's own median
decode / pack / inference times, the CPU cores the server process kept busy and its peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
from pathlib import Path

import httpx

from bench import load
from bench.models import official_models
from bench.run import BENCH_SERVER_ENV
from bench.workload import MIXES, BenchImage, load_mix
from model.config import OFFICIAL


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _measure(url: str, images: list[BenchImage], clients: int, seconds: float) -> load.Phase:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        send = load.rest_sender(client, url)
        await load.closed_loop(send, images, clients, requests=10**9, duration_s=3.0)
        return await load.closed_loop(send, images, clients, requests=10**9, duration_s=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="+", metavar="NAME:MUSIQ_X=V[,MUSIQ_Y=W]")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    parser.add_argument("--mix", choices=MIXES, default="512x384")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache", default="runs/bench-cache")
    parser.add_argument(
        "--model",
        default=None,
        help="an ONNX file to serve instead of the harness's official-size one (--precision)",
    )
    args = parser.parse_args()
    variants = {}
    for spec in args.variants:
        name, _, settings = spec.partition(":")
        env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
        if not all(k.startswith("MUSIQ_") for k in env):
            raise SystemExit(f"settings must be MUSIQ_NAME=VALUE: {spec}")
        variants[name] = env
    model = Path(args.model) if args.model else official_models(Path(args.cache))[args.precision]
    images = load_mix(args.mix, OFFICIAL)  # the config only sizes token counts for the report
    for rnd in range(args.rounds):
        for name, env in variants.items():
            with load.serve(model, {**BENCH_SERVER_ENV, "MUSIQ_GRPC_ENABLED": "false", **env}) as server:
                cpu0, ru0, t0 = (
                    _cpu_seconds(server.process.pid),
                    resource.getrusage(resource.RUSAGE_SELF),
                    time.time(),
                )
                phase = asyncio.run(_measure(server.url, images, args.clients, args.seconds))
                cpu1, ru1, t1 = (
                    _cpu_seconds(server.process.pid),
                    resource.getrusage(resource.RUSAGE_SELF),
                    time.time(),
                )
                peak_mib = _peak_rss_mib(server.process.pid)
            rec = phase.records

            def med(attr: str, rec=rec) -> float:
                return statistics.median(getattr(r, attr) for r in rec) * 1e3

            client_cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
            print(
                f"round {rnd} {name:>10}: {phase.images_per_s:6.2f} img/s  p50 {med('latency_s'):6.1f} ms  "
                f"decode {med('decode_s'):5.2f}  pack {med('pack_s'):5.2f}  infer {med('infer_s'):6.1f} ms  "
                f"CPU: server {(cpu1 - cpu0) / (t1 - t0):.2f}, load generator {client_cpu / (t1 - t0):.2f} cores; "
                f"server peak RSS {peak_mib:.0f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
