"""Stores a project checkpoint's tensors as float16 (same metadata): half the bytes to carry.

The lent GPU machine returns files of at most 16 MiB and takes 64 MiB per call, so checkpoints
travel this way; loading casts them back to float32 (load_checkpoint accepts either).

    python tools/half_checkpoint.py SRC.safetensors DST.safetensors
"""

from __future__ import annotations

import sys

import numpy as np
from safetensors.numpy import load_file, save_file

from model.checkpoint import read_metadata


def main(src: str, dst: str) -> None:
    meta = read_metadata(src)
    tensors = {k: v.astype(np.float16) for k, v in load_file(src).items()}
    save_file(tensors, dst, metadata=meta)


if __name__ == "__main__":
    main(*sys.argv[1:3])
