"""The tracked tree stays small: a clone, a Docker build context and a CI checkout all carry it.

Sums the working-tree sizes of the files `git ls-files` lists (a tracked file deleted in the
working tree counts 0). The embedded default model is the bulk: its weights are stored once, in
model/weights/default.safetensors, and both ONNX graphs read them from there (`export.external`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 30 * 2**20  # bytes (30 MiB)


def tracked_sizes() -> dict[str, int]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, timeout=60
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.skip(f"{ROOT} is not a git checkout")
    sizes = {}
    for raw in out.split(b"\0"):
        if raw:
            name = raw.decode("utf-8", "surrogateescape")
            path = ROOT / name  # a symlink counts as itself; a submodule (a folder) as 0
            sizes[name] = path.lstat().st_size if path.is_symlink() or path.is_file() else 0
    if not sizes:
        pytest.skip(f"{ROOT}: git tracks no files here")
    return sizes


def test_tracked_tree_is_at_most_30_mib() -> None:
    sizes = tracked_sizes()
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:10]
    listing = "\n".join(f"  {size / 2**20:8.2f} MiB  {name}" for name, size in largest)
    assert total <= LIMIT, (
        f"tracked files sum to {total / 2**20:.2f} MiB > {LIMIT / 2**20:.0f} MiB; the ten largest:\n{listing}"
    )
