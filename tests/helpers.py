"""Small helpers shared by the test modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def musiq(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs the `musiq` console entry point in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
