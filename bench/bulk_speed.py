"""`musiq bulk` (Ray Data, batched actors) against `musiq score` (one process, one image at a time)
on the same folder of mixed photos, in one run: throughput ratio and score agreement.

Usage: python bench/bulk_speed.py [--count 1000] [--repeat 1] [--decode auto [tasks ...]]
                                  [--data ../shared/data]

The folder holds `count` photos, alternately from CLIVE (500x500 phone photos) and BSDS500
(481x321 / 321x481), linked into a temporary folder. Each command runs end to end as a user runs
it, in its own process (interpreter start, model load, Ray's start included), in one order and
then the reverse (ABBA...) over `--repeat` rounds, so a machine that gets busier over time favours
none. `--decode` names one `musiq bulk` run per value of its `--decode` (where decoding runs), all
against the same `musiq score` runs. Prints each run's wall time, and per bulk variant its median
images/s, its ratio to score (the issue's target: >= 0.9), and the |score difference| to score on
every image: its largest (the issue's target: <= 1e-5), the image it falls on, its p99 and how
many exceed 1e-5. Both commands
run the same ONNX file in ONNX Runtime on the server's rows (`service.offline`), so what remains is
the float summation order of bulk's padded batches, plus `musiq score`'s 6-decimal output (<= 5e-7).
Images that one command scored and the other did not are counted, never silently dropped.
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
    parser.add_argument(
        "--decode", nargs="+", default=["auto"], choices=("auto", "tasks", "actors"), help="bulk variants"
    )
    args = parser.parse_args()

    import pyarrow.parquet as pq

    photos = mixed_photos(args.data, args.count)
    musiq = [sys.executable, "-m", "cli"]
    cap = ["--max-native-tokens", str(args.max_native_tokens)]
    names = ["score", *(f"bulk-{d}" for d in args.decode)]
    walls: dict[str, list[float]] = {name: [] for name in names}
    bulk_scores: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="bulk-speed-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, photo in enumerate(photos):
            (folder / f"{i:05d}-{photo.parent.name}-{photo.name}").symlink_to(photo)
        scores = Path(tmp) / "score.jsonl"
        for r in range(args.repeat):
            for name in names if r % 2 == 0 else names[::-1]:
                if name == "score":
                    cmd = [*musiq, "score", str(folder), "--format", "jsonl", "-o", str(scores), *cap]
                else:
                    out = Path(tmp) / f"{name}-{r}"
                    decode = ["--decode", name.removeprefix("bulk-")]
                    cmd = [*musiq, "bulk", str(folder), "--output", str(out), "--no-progress", *decode, *cap]
                walls[name].append(timed(cmd))
                print(f"{name:12s} run {r + 1}: {walls[name][-1]:7.1f} s", file=sys.stderr, flush=True)
        reference = {
            json.loads(line)["image"]: json.loads(line)["score"] for line in scores.read_text().splitlines()
        }
        for name in names[1:]:
            table = pq.read_table(Path(tmp) / f"{name}-0")
            bulk_scores[name] = dict(
                zip(table.column("image").to_pylist(), table.column("score").to_pylist(), strict=True)
            )
    score_wall = statistics.median(walls["score"])
    report: dict[str, object] = {
        "images": args.count,
        "cpus": os.cpu_count(),
        "score": {"wall_s": round(score_wall, 2), "images_per_s": round(args.count / score_wall, 2)},
    }
    for name, bulk in bulk_scores.items():
        common = [k for k, v in reference.items() if bulk.get(k) is not None]
        diffs = {k: abs(bulk[k] - reference[k]) for k in common}  # type: ignore[operator]
        worst = max(diffs, key=diffs.__getitem__) if diffs else None
        ordered = sorted(diffs.values())
        wall = statistics.median(walls[name])
        report[name] = {
            "wall_s": round(wall, 2),
            "images_per_s": round(args.count / wall, 2),
            "ratio_bulk_over_score": round(score_wall / wall, 3),
            "compared": len(diffs),
            "max_abs_score_diff": diffs[worst] if worst else None,
            "max_diff_image": Path(worst).name if worst else None,
            "p99_abs_score_diff": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            if ordered
            else None,
            "over_1e-5": sum(1 for d in ordered if d > 1e-5),
            "errors_in_bulk": sum(1 for v in bulk.values() if v is None),
            "scored_by_one_only": len(set(reference) ^ {k for k, v in bulk.items() if v is not None}),
        }
    report["runs_s"] = {name: [round(w, 1) for w in ws] for name, ws in walls.items()}
    report["load_average"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
