"""Prepares `.data/` (git-ignored via .git/info/exclude) for the GPU stages in tools/gpu_train.sh.

The lent machine receives the working tree plus carried paths, 64 MiB per call, and cannot read
../shared/data. So:
- `.data/bsds500/images`: BSDS500's 500 photos, as released (37 MB; stage 1b);
- `.data/clive`: CLIVE's JPEGs as released, the lossless WebP images re-encoded as JPEG quality 90
  (47 MB), and `labels.csv` with the project split (seeded 80/20, `musiq split` seed 0; stage 2);
- `.data/init/stage1.fp16.safetensors`: stage 1's network (runs/pretrain_gpu/best.safetensors,
  from configs/pretrain_synthetic_gpu.toml), stored as float16, when that run is on this disk;
- `.data/init/stage1b.fp16.safetensors`: stage 1b's network, the start of issue 17's ranking stages
  (`runs/pretrain_synthetic.fp16.safetensors`; restored there from git history first when this
  disk lacks it, as model/weights/MODEL_CARD.md says: a fresh machine has no runs/).
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

from PIL import Image

from model.data import read_labels, split_samples
from tools.half_checkpoint import main as half_checkpoint

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = Path(__file__).resolve().parents[1] / ".data"
STAGE1B = Path("runs/pretrain_synthetic.fp16.safetensors")
# The commit that last held stage 1b's network in the tree (model/weights/MODEL_CARD.md).
STAGE1B_IN_HISTORY = "2d43095:model/weights/pretrain_synthetic.fp16.safetensors"


def restore_stage1b() -> bool:
    """Writes stage 1b's network to STAGE1B from git history unless it is there; False if the
    history is not at hand (a shallow clone)."""
    if STAGE1B.exists():
        return True
    found = subprocess.run(["git", "show", STAGE1B_IN_HISTORY], capture_output=True, check=False)
    if found.returncode != 0:
        print(f"stage 1b is not in this clone's history ({STAGE1B_IN_HISTORY}): skipped")
        return False
    STAGE1B.parent.mkdir(parents=True, exist_ok=True)
    STAGE1B.write_bytes(found.stdout)
    return True


def main() -> None:
    shutil.copytree(SHARED / "bsds500" / "images", DATA / "bsds500" / "images", dirs_exist_ok=True)
    (DATA / "init").mkdir(parents=True, exist_ok=True)
    if Path("runs/pretrain_gpu/best.safetensors").exists():
        half_checkpoint("runs/pretrain_gpu/best.safetensors", str(DATA / "init" / "stage1.fp16.safetensors"))
    if restore_stage1b():
        shutil.copy(STAGE1B, DATA / "init" / "stage1b.fp16.safetensors")
    train, val = split_samples(read_labels(SHARED / "clive" / "labels.csv"), 0.2, 0)
    images = DATA / "clive" / "images"
    images.mkdir(parents=True, exist_ok=True)
    with (DATA / "clive" / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos", "split"])
        for split, samples in (("train", train), ("val", val)):
            for s in samples:
                dst = images / (s.path.stem + ".jpg")
                if s.path.suffix.lower() == ".jpg":
                    shutil.copy(s.path, dst)
                else:
                    Image.open(s.path).convert("RGB").save(dst, quality=90)
                writer.writerow([f"images/{dst.name}", f"{float(s.target[0]):.6f}", split])
    print(
        f"{DATA}: {len(train)} train + {len(val)} val CLIVE images, BSDS500, {sorted(p.name for p in (DATA / 'init').iterdir())}"
    )


if __name__ == "__main__":
    main()
