"""The pyiqa virtualenv (`.venv-pyiqa`, git-ignored), created by the harness on first use.

pyiqa gets its own environment because it pulls a large stack (transformers, timm, OpenCV, ...)
that the project must not depend on. torch is pinned to the same CPU wheel as the project's
(2.13.0) so that both sides use the same BLAS, and torchvision to the release built for it
(0.28.0; its compiled operators do not load with the CPU wheel: bench/pyiqa_forward.py works
around that). Nothing is downloaded at run time: the model is built with random weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-pyiqa"
REQUIREMENTS = ("torch==2.13.0", "torchvision==0.28.0", "pyiqa==0.1.16")
STAMP = VENV / ".installed"


def ensure(venv: Path = VENV, log: Callable[[str], None] = print) -> Path:
    """The virtualenv's python, installing it when the stamp (the pinned requirements) differs."""
    python = venv / "bin" / "python"
    wanted = "\n".join(REQUIREMENTS)
    if python.is_file() and STAMP.is_file() and STAMP.read_text() == wanted:
        return python
    log(f"creating {venv} with {', '.join(REQUIREMENTS)} (a few minutes, once) ...")
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first: nothing pulls CUDA
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    STAMP.write_text(wanted)
    return python


def forward_times(
    images: list[Path], runs: int, threads: int = 0, log: Callable[[str], None] = print
) -> dict[str, object]:
    """pyiqa's per-image forward seconds ({"seconds": {path: [s, ...]}, "torch", ...})."""
    python = ensure(log=log)
    cmd = [str(python), str(REPO / "bench" / "pyiqa_forward.py"), "--runs", str(runs)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run([*cmd, *map(str, images)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)
