"""`musiq bulk`'s pipeline on a real local Ray cluster (`ray.init(num_cpus=2)`, started once for
this module): every input gets one row, good images the server's exact score, bad ones the
server's error code."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="the bulk extra (ray[data]) is not installed")

from bulk.pipeline import BulkOptions, Summary, init_ray, packing_for, run
from bulk.sources import expand_sources, part_files, read_output
from service.errors import ERRORS
from service.prepare import prepare_image
from service.runtime import ModelRuntime
from service.settings import EMBEDDED_ONNX
from tests.bulk.images import EXPECTED, MISSING, write_images

# The server-path comparison: the same rows through the same session, alone instead of batched.
# Padding an item inside a batch changes only the float summation order.
TOLERANCE = 1e-5
PART_ROWS = {"tasks": 3, "actors": 10}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    init_ray(None, num_cpus=2, object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("images")
    return root, write_images(root)


@pytest.fixture(scope="module", params=["tasks", "actors"])
def scored(
    request: pytest.FixtureRequest,
    ray_cluster: None,
    images: tuple[Path, dict[str, bytes]],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Summary, list[dict[str, Any]], str]:
    """Both places decoding can run: its own CPU tasks (as with GPUs) and the scoring actors."""
    root, _ = images
    listing = tmp_path_factory.mktemp("list") / "inputs.txt"
    listing.write_text(f"{root / MISSING}\n")
    out = str(tmp_path_factory.mktemp("out") / "scores")
    inputs = expand_sources([str(root), str(listing)])
    # Batches of two and several actor calls, parts and buckets; with decoding in the actors, a
    # part of 10 rows is decoded 8 (4 batches) and 2 at a time.
    part_rows = PART_ROWS[request.param]
    options = BulkOptions(
        model=EMBEDDED_ONNX, output=out, part_rows=part_rows, batch_size=2, decode=request.param
    )
    summary = run(inputs, options)
    return summary, read_output(out).to_pylist(), out


def test_every_input_gets_exactly_one_row(
    scored: tuple[Summary, list[dict[str, Any]], str],
    images: tuple[Path, dict[str, bytes]],
    request: pytest.FixtureRequest,
) -> None:
    summary, rows, out = scored
    root, _ = images
    names = [str(root / n) for n in EXPECTED] + [str(root / MISSING)]
    assert sorted(r["image"] for r in rows) == sorted(names)
    assert summary.images == len(names) and summary.errors == 5
    assert len(part_files(out)) == math.ceil(len(names) / PART_ROWS[request.node.callspec.params["scored"]])
    # Decoding ran where it was asked to: its own CPU tasks, or inside the scoring actors.
    separate = "MapBatches(prepare_batch)" in summary.operators
    assert separate == (request.node.callspec.params["scored"] == "tasks"), summary.operators


def test_bad_input_gets_the_servers_error_code(
    scored: tuple[Summary, list[dict[str, Any]], str], images: tuple[Path, dict[str, bytes]]
) -> None:
    _, rows, _ = scored
    root, _ = images
    by_image = {r["image"]: r for r in rows}
    expected = {str(root / n): code for n, code in EXPECTED.items()} | {
        str(root / MISSING): "image_not_found"
    }
    assert {k: by_image[k]["error"] for k in expected} == expected
    for row in rows:
        assert row["error"] is None or row["error"] in ERRORS
        if row["error"] is not None:
            assert row["score"] is None and row["tokens"] is None and row["distribution"] is None


def test_scores_equal_the_server_path(
    scored: tuple[Summary, list[dict[str, Any]], str], images: tuple[Path, dict[str, bytes]]
) -> None:
    """`ModelRuntime.predict` on `prepare_image(...).compute`, what `/v1/score` runs, per image."""
    _, rows, _ = scored
    root, files = images
    runtime = ModelRuntime(EMBEDDED_ONNX)
    packing = packing_for(runtime.packing, None)
    by_image = {r["image"]: r for r in rows}
    diffs = []
    for name, code in EXPECTED.items():
        if code is not None:
            continue
        row = by_image[str(root / name)]
        prepared = prepare_image(files[name], packing, max_pixels=10**9, drop_padding_rows=True)
        expected = runtime.predict([prepared.compute])[0]
        assert row["tokens"] == prepared.packed.num_tokens
        assert row["model"] == runtime.metadata.name and row["model_version"] == runtime.metadata.version
        assert row["distribution"] is None  # the default model has a score head, not 10 bins
        diffs.append(abs(row["score"] - expected.score))
    assert len(diffs) == 8 and max(diffs) <= TOLERANCE, diffs
    assert len({r["tokens"] for r in rows if r["tokens"]}) >= 4, "several token lengths (buckets)"
