"""`musiq bench`: the side-by-side benchmark (bench/run.py) and its report (bench/report.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmark the service against pyiqa and this machine's fp32 roofline",
        description="pyiqa, ONNX Runtime alone and the service end to end (REST, gRPC, 1..64 clients), "
        "fp32 and int8, three image mixes, in one run; writes BENCHMARK.md, results.json and PNG plots.",
    )
    b.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    b.add_argument("--cache", default="runs/bench-cache", help="where the exported models are kept")
    b.add_argument("--quick", action="store_true", help="small counts and short levels (a few minutes)")
    b.add_argument("--mix", action="append", choices=["512x384", "mixed", "clive"], help="only these mixes")
    b.add_argument("--precision", action="append", choices=["fp32", "int8"], help="only these precisions")
    b.add_argument("--no-pyiqa", action="store_true", help="skip the pyiqa side")
    b.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="MUSIQ_X=V",
        help="extra server setting for the run (repeatable), e.g. MUSIQ_MAX_QUEUE_DELAY_S=0.002",
    )
    b.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json")
    b.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import signal
    import sys

    # A terminated run still stops the server process it started (the context managers' finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from bench.report import write
    from bench.run import Plan, run

    out = Path(args.out)
    if args.report_only:
        print(write(json.loads((out / "results.json").read_text()), out))
        return 0
    plan = Plan.quick() if args.quick else Plan()
    env = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("MUSIQ_"):
            raise ValueError(f"--server-env takes MUSIQ_NAME=VALUE, got {item!r}")
        env[key] = value
    plan = dataclasses.replace(
        plan,
        mixes=tuple(args.mix or plan.mixes),
        precisions=tuple(args.precision or plan.precisions),
        pyiqa=not args.no_pyiqa,
        server_env=env,
    )
    results = run(plan, out, Path(args.cache), log=lambda s: print(s, flush=True))
    print(write(results, out))
    return 0
