"""`musiq bulk` as a user runs it: a run whose driver is SIGKILLed halfway, then `--resume`, leaves
each input exactly once in the output. Each run is a fresh `musiq bulk` process with its own local
Ray cluster (two starts: the cost of this module)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the bulk extra (ray[data]) is not installed")

from bulk.sources import TMP_PREFIX, part_files, read_output
from tests.bulk.images import EXPECTED, write_images
from tests.helpers import musiq

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def bulk_command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "bulk", str(src), "--output", str(out), "--num-cpus", "2", *extra]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_run_resumed_scores_each_image_exactly_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_images(src)
    for copy in range(2):  # 36 inputs: enough parts of two that the kill lands mid-run
        shutil.copytree(src / "a", src / f"copy{copy}")
        shutil.copytree(src / "bad", src / f"copy{copy}-bad")
        for name in ("photo-astronaut.png", "photo-coffee.jpg", "photo-chelsea.jpg"):
            shutil.copy(src / name, src / f"copy{copy}" / name)
    total = len(EXPECTED) * 3
    out = tmp_path / "out"
    # The first run, in its own process group (ours to clean up), killed once a part is written.
    first = subprocess.Popen(
        bulk_command(src, out, "--part-rows", "2", "--batch-size", "2", "--no-progress"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not part_files(str(out)):
            assert first.poll() is None, first.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no part written in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        # Ray's processes go with the driver that started them; whatever lingers is still ours.
        for _ in range(100):
            if not group_alive(first.pid):
                break
            time.sleep(0.2)
        else:
            os.killpg(first.pid, signal.SIGKILL)
    finally:
        if group_alive(first.pid):
            os.killpg(first.pid, signal.SIGKILL)
    first.stderr.close()  # type: ignore[union-attr]
    killed_rows = read_output(str(out), ["image"]).num_rows
    assert 0 < killed_rows < total, f"the kill did not land mid-run ({killed_rows} of {total} rows)"

    # A second run without --resume refuses to mix into the same output.
    refused = musiq("bulk", str(src), "--output", str(out))
    assert refused.returncode == 1 and "--resume" in refused.stderr

    resumed = subprocess.run(
        bulk_command(src, out, "--resume", "--no-progress"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{killed_rows} inputs already done" in resumed.stderr
    counts = Counter(read_output(str(out), ["image"]).column("image").to_pylist())
    assert len(counts) == total and set(counts.values()) == {1}, counts.most_common(3)
    assert not [p for p in out.iterdir() if p.name.startswith(TMP_PREFIX)]
    # Resuming a finished output scores nothing and starts no cluster.
    again = musiq("bulk", str(src), "--output", str(out), "--resume")
    assert again.returncode == 0 and f"{total} inputs already done, 0 to score" in again.stderr
