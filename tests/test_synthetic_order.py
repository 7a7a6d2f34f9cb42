"""The synthetic order check (bench/synthetic_order.py): pair outcomes, accuracy, report."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from bench.synthetic_order import CHECK, accuracy, pair_outcomes, report


def fake_index(n_photos: int) -> list[dict[str, str]]:
    return [
        {"image": f"{p}_{kind}_{rank}.png", "photo": str(p), "kind": kind, "rank": str(rank)}
        for p in range(n_photos)
        for kind in CHECK
        for rank in range(4)
    ]


def test_pairs_are_judged_within_one_photo_and_kind_ties_count_half() -> None:
    index = fake_index(2)
    # Perfect order everywhere (milder = higher), except photo 1's JPEG: ranks 0 and 1 swapped,
    # and a tie between its ranks 2 and 3. Photos are offset by 1000 so cross-photo pairs would
    # look misordered if they were (wrongly) compared.
    quality = {r["image"]: 1000.0 * int(r["photo"]) - int(r["rank"]) for r in index}
    quality["1_jpeg_0.png"], quality["1_jpeg_1.png"] = quality["1_jpeg_1.png"], quality["1_jpeg_0.png"]
    quality["1_jpeg_3.png"] = quality["1_jpeg_2.png"]
    outcomes = pair_outcomes(index, quality)
    assert len(outcomes) == 6 * len(CHECK)
    assert outcomes[("jpeg", 0, 1)].tolist() == [1.0, 0.0]
    assert outcomes[("jpeg", 2, 3)].tolist() == [1.0, 0.5]
    assert accuracy(outcomes, ["blur"])[0] == 1.0
    assert accuracy(outcomes, ["jpeg"])[0] == pytest.approx((12 - 1 - 0.5) / 12)
    overall, lo, hi = accuracy(outcomes, list(CHECK))
    assert overall == pytest.approx(1 - 1.5 / (12 * len(CHECK))) and lo <= overall <= hi


def test_report_writes_a_table_per_model(tmp_path: Path) -> None:
    index = fake_index(3)
    (tmp_path / "scores").mkdir()
    with (tmp_path / "index.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(index[0]))
        writer.writeheader()
        writer.writerows(index)
    rng = np.random.default_rng(0)
    for name, q in (("good", lambda r: -int(r["rank"])), ("random", lambda r: rng.random())):
        with (tmp_path / "scores" / f"{name}.csv").open("w", newline="") as f:
            f.write("image,quality\n" + "".join(f"{r['image']},{q(r)}\n" for r in index))
    md = tmp_path / "out.md"
    report(tmp_path, ["good", "random"], md)
    text = md.read_text()
    assert "| good | 1.000 [1.000, 1.000] |" in text and "| random |" in text
    assert md.with_suffix(".png").stat().st_size > 0
