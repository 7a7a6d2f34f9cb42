"""Worker processes that die under `musiq bulk`, on a real local Ray cluster (`num_cpus=2`) whose
workers decode through `tests/bulk/crash_hook.py`: a process killed once while decoding is Ray's
to retry, and the job still writes every input exactly once; an input that kills every process
that decodes it stops the job after a bounded number of retries instead of looping forever.
Both places decoding can run: its own tasks (Ray's `max_retries`) and the scoring actors
(`DECODE_RETRIES` on the actor pool)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the bulk extra (ray[data]) is not installed")

from bulk.pipeline import BulkOptions, Summary, init_ray, run
from bulk.sources import expand_sources, read_output
from service.settings import EMBEDDED_ONNX
from tests.bulk.crash_hook import CRASH_ALWAYS, CRASH_ONCE, crashed_marker
from tests.helpers import jpeg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    runtime_env = {
        "env_vars": {"PYTHONPATH": str(ROOT)},
        "worker_process_setup_hook": "tests.bulk.crash_hook.install",
    }
    init_ray(None, num_cpus=2, object_store_memory=200 * 2**20, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def photos(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir()
    for seed, name in enumerate(names):
        (folder / name).write_bytes(jpeg(96, 128, seed=seed))
    return [str(folder / n) for n in names]


@pytest.mark.parametrize("decode", ["tasks", "actors"])
def test_a_process_that_dies_decoding_is_retried_and_nothing_is_lost(
    ray_cluster: None, tmp_path: Path, decode: str
) -> None:
    paths = photos(tmp_path / "in", [f"{i}.jpg" for i in range(5)] + [f"x-{CRASH_ONCE}.jpg"])
    out = str(tmp_path / "out")
    summary = run(
        expand_sources([str(tmp_path / "in")]), BulkOptions(EMBEDDED_ONNX, out, part_rows=3, decode=decode)
    )
    assert crashed_marker(paths[-1]).exists(), "the hook did not kill a process"
    rows = read_output(out).to_pylist()
    assert sorted(r["image"] for r in rows) == sorted(paths)
    assert all(r["error"] is None and r["score"] is not None for r in rows)
    assert summary.images == len(paths) and summary.errors == 0


@pytest.mark.parametrize("decode", ["tasks", "actors"])
def test_an_input_that_kills_every_decoder_stops_the_job(
    ray_cluster: None, tmp_path: Path, decode: str
) -> None:
    photos(tmp_path / "in", ["0.jpg", "1.jpg", f"x-{CRASH_ALWAYS}.jpg"])
    options = BulkOptions(EMBEDDED_ONNX, str(tmp_path / "out"), part_rows=3, decode=decode)
    outcome: list[Summary | BaseException] = []

    def job() -> None:
        try:
            outcome.append(run(expand_sources([str(tmp_path / "in")]), options))
        except BaseException as exc:  # what the driver sees once the retries are spent
            outcome.append(exc)

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "the job kept retrying the input for 2 minutes"
    assert len(outcome) == 1 and isinstance(outcome[0], Exception), outcome
