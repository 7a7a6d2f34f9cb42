#!/usr/bin/env bash
# Trains the embedded default model on this machine's CPU, stage by stage, then evaluates,
# installs and exports it. Hours on 2 cores: `make default-model` runs it in the background with
# its log in runs/default-model.log. Interrupted? Run it again: each stage resumes from its
# runs/<stage>/state.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CLIVE=${CLIVE:-../shared/data/clive}
date
$BIN/musiq train --config configs/pretrain_synthetic.toml --no-progress
date
$BIN/musiq train --config configs/clive_finetune.toml --no-progress
date
$BIN/musiq split --data "$CLIVE/labels.csv" -o runs/clive_split.csv
$BIN/musiq eval --checkpoint runs/clive/best.safetensors --data runs/clive_split.csv --split val --out runs/clive/eval_val
cp runs/clive/best.safetensors model/weights/default.safetensors
# The scoring file, and the explanation graph beside it (fp16 weights: half the size, checked
# against the fp32 rollout on real photos before it is written).
$BIN/musiq export --checkpoint model/weights/default.safetensors -o model/weights/default.onnx \
    --rollout --rollout-weights fp16
date
