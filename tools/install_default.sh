#!/usr/bin/env bash
# Makes a trained checkpoint the embedded default model: stores it as
# model/weights/default.safetensors (float32), exports default.onnx, default.rollout.onnx and the
# CPU halves default.features.onnx / default.head.onnx beside it (each export verified against
# PyTorch before it is written), links the graphs' weights to the
# checkpoint (ONNX external data: each weight stored once, the outputs checked bit-identical), then
# evaluates it on the CLIVE validation split and compares it with BRISQUE on the same images
# (bench/results/).
#   tools/install_default.sh runs/clive/best.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CLIVE=${CLIVE:-../shared/data/clive}
CKPT=${1:?usage: $0 CHECKPOINT}
$BIN/python - "$CKPT" <<'PY'
import sys

from model.checkpoint import load_checkpoint, save_checkpoint

save_checkpoint(load_checkpoint(sys.argv[1]), "model/weights/default.safetensors")  # float32
PY
# The scoring file, the explanation graph and the two halves a CPU server runs (all fp32).
$BIN/musiq export --checkpoint model/weights/default.safetensors -o model/weights/default.onnx --rollout --split
# The graphs then read their weights from default.safetensors instead of holding a copy (about
# 0.4 MiB each instead of 21): keep the files together (export/external.py).
$BIN/python -m export.external --checkpoint model/weights/default.safetensors \
    model/weights/default.onnx model/weights/default.rollout.onnx \
    model/weights/default.features.onnx model/weights/default.head.onnx
make brisque-compare CLIVE="$CLIVE"
