"""A test that needs a system tool fails when the tool is missing, instead of passing silently as a
skip (issue 16, silent skips). `make test` installs the tools (tools/system_deps.sh); a developer
without them opts out with MUSIQ_TESTS_ALLOW_MISSING_TOOLS=1, and those tests are then skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPT_OUT = "MUSIQ_TESTS_ALLOW_MISSING_TOOLS"
METRICS_TEST = "tests/test_rest.py::test_metrics_are_promtool_clean_and_count_what_happened"


def test_the_metrics_test_fails_without_promtool(tmp_path: Path) -> None:
    """Run with a PATH that holds no promtool (an empty directory): the test must fail, not skip."""
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT}
    env["PATH"] = str(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", METRICS_TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "1 failed" in out, out[-3000:]
    assert "promtool is not installed" in out and OPT_OUT in out, out[-3000:]


def test_a_missing_tool_fails_unless_the_opt_out_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import require_tool

    assert require_tool("sh", "POSIX") == "/usr/bin/sh" or require_tool("sh", "POSIX").endswith("/sh")
    monkeypatch.delenv(OPT_OUT, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-16 is not installed"):
        require_tool("no-such-tool-16", "nowhere")
    monkeypatch.setenv(OPT_OUT, "1")
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-16 is not installed"):
        require_tool("no-such-tool-16", "nowhere")
