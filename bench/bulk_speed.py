"""`musiq bulk` (Ray Data + ONNX Runtime) against `musiq score` (PyTorch, one image at a time) on
the same folder of mixed photos, in one run: throughput ratio and score agreement.

Usage: python bench/bulk_speed.py [--count 1000] [--repeat 1] [--data ../shared/data]

The folder holds `count` photos, alternately from CLIVE (500x500 phone photos) and BSDS500
(481x321 / 321x481), linked into a temporary folder. Each command runs end to end as a user runs
it, in its own process (interpreter start, model load, Ray's start included), A then B, with
`--repeat` pairs alternating the order (ABBA...) so a machine that gets busier over time does
not favour either. Prints each run's wall time and images/s, the ratio bulk / score (the issue's
target: >= 0.9), and the largest |score difference| between the two over every image (PyTorch
vs ONNX Runtime: the embedded model's card measures up to 1.7e-5 between them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def mixed_photos(data: Path, count: int) -> list[Path]:
    clive = sorted((data / "clive" / "images").glob("*"))
    bsds = sorted((data / "bsds500" / "images").glob("*/*.jpg"))
    mixed = [p for pair in zip(clive, bsds, strict=False) for p in pair]
    mixed += clive[len(bsds) :] + bsds[len(clive) :]
    if len(mixed) < count:
        raise SystemExit(f"only {len(mixed)} photos under {data}; asked for {count}")
    return mixed[:count]


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (ABBA order)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--max-native-tokens", type=int, default=512, help="both commands (the server's cap)")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    photos = mixed_photos(args.data, args.count)
    musiq = [sys.executable, "-m", "cli"]
    cap = ["--max-native-tokens", str(args.max_native_tokens)]
    walls: dict[str, list[float]] = {"score": [], "bulk": []}
    with tempfile.TemporaryDirectory(prefix="bulk-speed-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, photo in enumerate(photos):
            (folder / f"{i:05d}-{photo.parent.name}-{photo.name}").symlink_to(photo)
        scores = Path(tmp) / "score.jsonl"
        for r in range(args.repeat):
            order = ("score", "bulk") if r % 2 == 0 else ("bulk", "score")
            for which in order:
                if which == "score":
                    cmd = [*musiq, "score", str(folder), "--format", "jsonl", "-o", str(scores), *cap]
                else:
                    out = Path(tmp) / f"bulk-{r}"
                    cmd = [*musiq, "bulk", str(folder), "--output", str(out), "--no-progress", *cap]
                walls[which].append(timed(cmd))
                print(f"{which:5s} run {r + 1}: {walls[which][-1]:7.1f} s", file=sys.stderr, flush=True)
        reference = {
            json.loads(line)["image"]: json.loads(line)["score"] for line in scores.read_text().splitlines()
        }
        table = pq.read_table(Path(tmp) / "bulk-0")
        bulk = dict(zip(table.column("image").to_pylist(), table.column("score").to_pylist(), strict=True))
    diffs = [abs(bulk[k] - v) for k, v in reference.items()]
    score_wall, bulk_wall = statistics.median(walls["score"]), statistics.median(walls["bulk"])
    report = {
        "images": args.count,
        "cpus": os.cpu_count(),
        "score_wall_s": round(score_wall, 2),
        "bulk_wall_s": round(bulk_wall, 2),
        "score_images_per_s": round(args.count / score_wall, 2),
        "bulk_images_per_s": round(args.count / bulk_wall, 2),
        "ratio_bulk_over_score": round(score_wall / bulk_wall, 3),
        "compared": len(diffs),
        "max_abs_score_diff": max(diffs),
        "errors_in_bulk": sum(1 for v in bulk.values() if v is None),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
