"""The official-size (27.1 M) model with random weights, exported by the project's exporter.

Speed does not depend on the weights, and random weights need no download. The exporter
verifies fp32 against PyTorch and refuses an int8 file whose scores rank the 56 check photos
differently from fp32 (SRCC < 0.995), so the int8 figures are for a file the service would accept.
Files are cached by seed and preset: exporting takes minutes on 2 cores, once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PRECISIONS = ("fp32", "int8")
# A reduced shape check (the exporter's full sweep runs 4096-token batches, minutes at this
# size); batch 1..8, ragged masks and 1..1500 tokens are still covered.
BENCH_SHAPES = ((1, 1, "none"), (8, 64, "heavy"), (5, 385, "heavy"), (2, 1500, "heavy"))


def official_models(cache: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Path]:
    """{precision: ONNX path}, exporting what the cache lacks. fp32 and int8 come with their CPU
    halves (`--split`), which the service runs on a CPU as it would for a user's export."""
    from export.metadata import split_paths

    paths = {p: cache / f"musiq-official-seed{seed}.{p}.onnx" for p in PRECISIONS}
    wanted = {p: (path, *split_paths(path)) for p, path in paths.items()}
    if all(f.is_file() for files in wanted.values() for f in files):
        return paths
    import torch

    from export.exporter import export_checkpoint
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.network import Musiq, to_checkpoint

    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / f"musiq-official-seed{seed}.safetensors"
    if not ckpt.is_file():
        torch.manual_seed(seed)
        model = Musiq(preset("official")).eval()
        with torch.no_grad():  # a spread of scores, so that rank agreement means something
            model.head.weight.normal_(0, 0.05)
        save_checkpoint(to_checkpoint(model, name="musiq-official-random", version=str(seed)), ckpt)
    for precision, path in paths.items():
        if not all(f.is_file() for f in wanted[precision]):
            log(f"exporting the official-size model ({precision}) to {path} ...")
            export_checkpoint(ckpt, path, precision=precision, split=True, shapes=BENCH_SHAPES, log=log)
    return paths
