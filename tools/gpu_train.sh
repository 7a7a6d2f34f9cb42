#!/usr/bin/env bash
# The default model's GPU stages, as run on a lent machine (one H100/H200, 16 cores, no network):
#   tools/gpu_train.sh pretrain   # stage 1b: configs/pretrain_continue_gpu.toml (~6 min)
#   tools/gpu_train.sh finetune   # stage 2: two learning rates side by side (~3 min)
#   tools/gpu_train.sh rank       # issue 17: stage 1c (ranking, from stage 1b), then stage 3
#                                 # (CLIVE + ranking groups), then the synthetic order check (~8 min).
#                                 # It needs .data/init/stage1b + .data/bsds500 + .data/clive: 95 MB,
#                                 # so two calls (a warm machine keeps what the first carried).
#                                 # Rehearsed here on CPU with device/precision/budget overridden.
# First, here: `python -m tools.prepare_gpu_data` (fills .data/), and carry .data/init +
# .data/bsds500 for pretrain, .data/clive for finetune (stage 2 reads stage 1b's runs/ output, which
# stays on the warm machine between the two calls). Results go to $OUT, checkpoints as float16.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_out}
mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then  # wheels the machine lacks (simplejpeg)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
half() { python3 tools/half_checkpoint.py "$1" "$2"; }
case "${1:-}" in
pretrain)
    python3 -m cli train --config configs/pretrain_continue_gpu.toml --no-progress 2>&1 | tee runs/pretrain2.log
    half runs/pretrain2_gpu/best.safetensors "$OUT/pretrain2_best.fp16.safetensors"
    tar czf "$OUT/pretrain2_logs.tar.gz" runs/pretrain2.log runs/pretrain2_gpu/metrics.jsonl \
        runs/pretrain2_gpu/plots.png runs/pretrain2_gpu/config.json
    ;;
finetune)
    test -f runs/pretrain2_gpu/best.safetensors || { echo "stage 1b output missing"; exit 1; }
    for recipe in clive_finetune_gpu clive_finetune_gpu_lowlr; do
        python3 -m cli train --config "configs/$recipe.toml" --no-progress > "runs/$recipe.log" 2>&1 &
    done
    wait
    half runs/clive2_gpu_a/best.safetensors "$OUT/clive2_a_best.fp16.safetensors"
    half runs/clive2_gpu_b/best.safetensors "$OUT/clive2_b_best.fp16.safetensors"
    tar czf "$OUT/finetune_logs.tar.gz" runs/clive_finetune_gpu*.log runs/clive2_gpu_*/metrics.jsonl \
        runs/clive2_gpu_*/plots.png runs/clive2_gpu_*/config.json
    ;;
rank)
    test -f .data/init/stage1b.fp16.safetensors || { echo "carry .data/init (stage 1b)"; exit 1; }
    python3 -m cli train --config configs/pretrain_rank_gpu.toml --no-progress 2>&1 | tee runs/pretrain3.log
    python3 -m cli train --config configs/clive_rank_gpu.toml --no-progress 2>&1 | tee runs/clive3.log
    half runs/pretrain3_gpu/best.safetensors "$OUT/pretrain3_best.fp16.safetensors"
    half runs/clive3_gpu/best.safetensors "$OUT/clive3_best.fp16.safetensors"
    # The order check's scores, for both networks (BRISQUE and the report run back here).
    python3 -m bench.synthetic_order --out runs/synthetic_order make --photos .data/bsds500/images
    for stage in pretrain3 clive3; do
        python3 -m bench.synthetic_order --out runs/synthetic_order score --name "$stage" \
            --checkpoint "runs/${stage}_gpu/best.safetensors"
    done
    tar czf "$OUT/rank_logs.tar.gz" runs/pretrain3.log runs/clive3.log runs/pretrain3_gpu/metrics.jsonl \
        runs/clive3_gpu/metrics.jsonl runs/*3_gpu/plots.png runs/synthetic_order/scores
    ;;
*)
    echo "usage: $0 pretrain|finetune|rank" >&2
    exit 2
    ;;
esac
