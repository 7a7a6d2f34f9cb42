"""pyiqa's MUSIQ forward time per image: runs INSIDE the pyiqa virtualenv (see bench/pyiqa_env.py).

Usage: .venv-pyiqa/bin/python bench/pyiqa_forward.py --runs 5 IMAGE... > result.json

The reference users would otherwise pick: `pyiqa.archs.musiq_arch.MUSIQ` in its official
27.1 M configuration (14 layers, D=384, scales 224 and 384 plus the native one, no native-token
cap), pretrained=False (random weights: nothing is downloaded, speed does not depend on them),
eval mode, `torch.inference_mode()`. The timed call is `model(x)` on the decoded image as a
[1, 3, H, W] tensor in 0..1, which includes pyiqa's own multi-scale patching (as its users call
it); decoding is outside the timing. Prints one JSON object: {image: [seconds per run]}.
Imports nothing from this project (a different virtualenv, a different torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

# The CPU torch wheel with PyPI's torchvision: torchvision's compiled operators do not load, but
# its Python side registers fake kernels for them at import. Defining the operators' schemas
# first lets the import through; MUSIQ never calls them.
_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    # A torchvision whose operators did load already defines them.
    with contextlib.suppress(RuntimeError):
        _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image
    from pyiqa.archs.musiq_arch import MUSIQ

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MUSIQ(pretrained=False).eval()
    params = sum(p.numel() for p in model.parameters())
    seconds: dict[str, list[float]] = {}
    result: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": params,
        "seconds": seconds,
    }
    with torch.inference_mode():
        for path in args.images:
            rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
            model(x)  # warm-up
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
            seconds[path] = times
            print(f"pyiqa {path}: {sorted(times)[len(times) // 2] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
