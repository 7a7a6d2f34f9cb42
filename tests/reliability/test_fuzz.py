"""The bounded fuzzing run of CI: decode + pack under atheris for FUZZ_SECONDS (the long run and
its figures are in tests/reliability/README.md). atheris is a dev dependency: without it this
test fails, it does not skip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FUZZ_SECONDS = 12
# libFuzzer's -rss_limit_mb reads the process's peak RSS (ru_maxrss), which Linux carries across
# exec from the process that spawned it: a fuzzer started straight from a pytest process that once
# held 3 GB of models reports "out-of-memory" on its first input. One small Python in between
# (its own peak ~10 MiB) makes the limit measure the fuzzer alone.
HOP = ["-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))", sys.executable]


def test_decode_and_pack_survive_a_bounded_fuzzing_run(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            *HOP,
            "-m",
            "tests.reliability.fuzz_decode",
            f"-max_total_time={FUZZ_SECONDS}",
            "-timeout=20",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}/",
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    log = run.stderr
    tail = "\n".join(ln for ln in log.splitlines() if not ln.startswith("INFO: Instrumenting"))[-4000:]
    assert run.returncode == 0 and not list(artifacts.iterdir()), tail
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    coverage = re.findall(r"cov: (\d+) ft: (\d+)", log)
    assert done and coverage, tail
    runs, seconds = int(done.group(1)), int(done.group(2))
    print(f"\nfuzz: {runs} runs in {seconds} s, cov {coverage[-1][0]} ft {coverage[-1][1]}")
    assert runs >= 1000, tail  # it really fuzzed, it did not just load the seeds
