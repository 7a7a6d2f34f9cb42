"""The GPU check's logic that needs no GPU: pieces in and out (bench/gpu_check.sh --stash), the
client split, the open loop, utilisation parsing and the verdicts against the issue's targets
(bench/gpu.py). The whole check is rehearsed on CPU with GPU_CHECK_DRY_RUN=1 (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from bench.gpu import Job, dmon_sm, open_loop, split_jobs, targets
from bench.load import Record
from bench.workload import BenchImage

ROOT = Path(__file__).resolve().parents[1]


def manifest(parts: Path, payload: bytes, size: int) -> list[str]:
    """Splits `payload` into pieces of `size` bytes under `parts` with a MANIFEST, as the tool does."""
    parts.mkdir(parents=True)
    lines = [f"payload {hashlib.sha256(payload).hexdigest()} {len(payload)}"]
    names = []
    for k in range(0, len(payload), size):
        name = f"part-{k // size:02d}"
        (parts / name).write_bytes(payload[k : k + size])
        lines.append(
            f"{name} {hashlib.sha256(payload[k : k + size]).hexdigest()} {len(payload[k : k + size])}"
        )
        names.append(name)
    (parts / "MANIFEST").write_text("\n".join(lines) + "\n")
    return names


def stash(tmp: Path, parts: Path) -> str:
    env = {
        **os.environ,
        "GPU_CHECK_PARTS": str(parts),
        "GPU_CHECK_STASH": str(tmp / "stash"),
        "GPU_CHECK_WORK": str(tmp / "work"),
        "OUT": str(tmp / "out"),
    }
    (tmp / "work").mkdir(exist_ok=True)
    (tmp / "work" / "export.started").touch()  # no background export from a test
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--stash"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_pieces_are_checked_stashed_and_counted(tmp_path: Path) -> None:
    """Each call moves its verified piece out of the tree and says which are still missing; a
    corrupted piece is refused (not stashed), and the reassembled pieces are the payload."""
    payload = os.urandom(10_000)
    source = tmp_path / "source"
    names = manifest(source, payload, 3_000)
    assert names == ["part-00", "part-01", "part-02", "part-03"]
    call = tmp_path / "call1"
    call.mkdir()
    for f in ("part-00", "MANIFEST"):
        (call / f).write_bytes((source / f).read_bytes())
    said = stash(tmp_path, call)
    assert "stashed part-00" in said and "pieces missing: part-01 part-02 part-03" in said
    assert not (call / "part-00").exists() and (tmp_path / "stash" / "part-00").is_file()

    call2 = tmp_path / "call2"
    call2.mkdir()
    (call2 / "MANIFEST").write_bytes((source / "MANIFEST").read_bytes())
    (call2 / "part-01").write_bytes(b"x" + (source / "part-01").read_bytes()[1:])  # damaged in transit
    (call2 / "part-02").write_bytes((source / "part-02").read_bytes())
    said = stash(tmp_path, call2)
    assert "BAD piece part-01" in said and "pieces missing: part-01 part-03" in said

    call3 = tmp_path / "call3"
    call3.mkdir()
    for f in ("part-01", "part-03", "MANIFEST"):
        (call3 / f).write_bytes((source / f).read_bytes())
    assert "pieces missing: none" in stash(tmp_path, call3)
    joined = b"".join((tmp_path / "stash" / n).read_bytes() for n in names)
    assert joined == payload


def test_a_level_is_shared_out_over_client_processes() -> None:
    images = (BenchImage("a", b"", 1, 1, 1), BenchImage("b", b"", 1, 1, 1), BenchImage("c", b"", 1, 1, 1))
    job = Job("grpc", "127.0.0.1:1", images, 0, 0, 0, 0)
    closed = split_jobs(job, 10, 4, 5.0)
    assert [j.clients for j in closed] == [3, 3, 2, 2] and all(j.rate == 0 for j in closed)
    assert len({j.offset % 3 for j in closed}) > 1  # not every process starts on the same image
    assert [j.clients for j in split_jobs(job, 2, 4, 5.0)] == [1, 1]  # no idle process
    rated = Job("grpc", "127.0.0.1:1", images, 0, 900.0, 0, 0)
    open_jobs = split_jobs(rated, 0, 4, 5.0)
    assert len(open_jobs) == 4 and sum(j.rate for j in open_jobs) == pytest.approx(900.0)
    assert all(j.clients == 0 and j.duration_s == 5.0 for j in open_jobs)


def test_open_loop_keeps_its_rate_and_counts_from_the_schedule() -> None:
    """A server slower than the rate does not slow the sender down; the latency includes the time a
    request waited for its turn at the server (no coordinated omission)."""
    busy = asyncio.Lock()

    async def send(image: BenchImage) -> Record:
        async with busy:  # one at a time, 20 ms each: 50/s at most
            await asyncio.sleep(0.02)
        return Record(image.name, 0.0, 0.0, 0.0, 0.0, 0.0, time.perf_counter())

    start = time.perf_counter()
    records, errors = asyncio.run(open_loop(send, [BenchImage("a", b"", 1, 1, 1)], 100.0, 0.5))
    assert errors == 0 and 45 <= len(records) <= 51
    assert time.perf_counter() - start < 2.0
    latencies = sorted(r.latency_s for r in records)
    assert latencies[-1] > 0.3  # the last ones waited behind the earlier ones


def test_gpu_utilisation_is_read_inside_the_level(tmp_path: Path) -> None:
    day = time.strftime("%Y-%m-%d")
    stamp = time.mktime(time.strptime(f"{day} 12:00:00", "%Y-%m-%d %H:%M:%S"))
    dmon = tmp_path / "dmon.txt"
    dmon.write_text(
        "#Time        gpu     sm    mem    enc    dec    jpg    ofa \n"
        "#HH:MM:SS    Idx      %      %      %      %      %      % \n"
        " 11:59:59      0     10      1      0      0      0      0 \n"
        " 12:00:00      0     80     30      0      0      0      0 \n"
        " 12:00:01      0     90     30      0      0      0      0 \n"
        " 12:00:02      0      -      -      -      -      -      - \n"
        " 12:00:03      0     20      1      0      0      0      0 \n"
    )
    assert dmon_sm(dmon, stamp, stamp + 2) == pytest.approx(85.0)
    assert math.isnan(dmon_sm(tmp_path / "none.txt", stamp, stamp + 2))


def row(
    mix: str, clients: int | str, rate: float, p50: float, p99: float, offered: float | None = None
) -> dict:
    return {
        "model": "official-fp16",
        "protocol": "grpc",
        "mix": mix,
        "clients": clients,
        "offered_per_s": offered,
        "images_per_s": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": 0,
    }


def test_targets_say_met_missed_or_not_measured() -> None:
    levels = [
        row("512x384", 1, 90.0, 11.0, 14.0),
        row("512x384", 256, 2100.0, 110.0, 180.0),
        row("512x384", "open loop", 1050.0, 40.0, 120.0, offered=1050.0),
        row("mixed", 64, 700.0, 80.0, 150.0),
    ]
    verdicts = targets(levels)
    assert verdicts[0].endswith("2100 -> met")
    assert "120.0 ms -> MISSED" in verdicts[1]
    assert verdicts[2].endswith("11.0 ms -> met")
    assert verdicts[3].endswith("700 -> MISSED")
    empty = targets([{**levels[0], "model": "default"}])
    assert all("not measured" in v for v in empty)


def test_helm_gpu_values_are_the_gpu_defaults() -> None:
    """values.yaml sets the CPU batching explicitly, so values-gpu.yaml must set the GPU defaults."""
    import yaml

    from service.runtime import GPU_DEFAULTS

    settings = yaml.safe_load((ROOT / "deploy" / "helm" / "musiq" / "values-gpu.yaml").read_text())[
        "settings"
    ]
    assert settings["maxBatchSize"] == GPU_DEFAULTS.max_batch_size
    assert settings["maxBatchTokens"] == GPU_DEFAULTS.max_batch_tokens
    assert settings["maxQueueDelayS"] == GPU_DEFAULTS.max_queue_delay_s
    assert settings["padMultiple"] == GPU_DEFAULTS.pad_multiple
    assert settings["ioBinding"] is GPU_DEFAULTS.io_binding
