#!/usr/bin/env bash
# Builds the serving virtualenv at PREFIX from the source folder it runs in: the base dependency set
# only (no train/export extras, so no torch), the chosen ONNX Runtime wheel, no pip, and no files the
# server does not read. The Dockerfile's build stage runs exactly this, and so does
# tests/deploy/test_image_content.py, so what the image serves is what the test serves.
#   deploy/build_venv.sh PREFIX [ONNXRUNTIME] [EXTRAS]
# ONNXRUNTIME: `onnxruntime` (CPU, the default) or another wheel that provides the same module,
# e.g. 'onnxruntime-gpu[cuda,cudnn]==1.31.1' (CUDA 13 + cuDNN 9 from NVIDIA's PyPI wheels).
# EXTRAS: optional extras installed beside the base set, e.g. `bulk` (ray[data]: the Ray worker
# image of docs/bulk.md); empty (the default): none, the server image.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
prefix=$1
onnxruntime=${2:-onnxruntime}
extras=${3:-}
"${PYTHON:-python3}" -m venv "$prefix"
"$prefix/bin/pip" install --quiet .
if [ -n "$extras" ]; then
    "$prefix/bin/pip" install --quiet ".[$extras]"
fi
if [ "$onnxruntime" != onnxruntime ]; then
    # Both wheels install the module `onnxruntime`: the CPU one goes first so they do not mix.
    "$prefix/bin/pip" uninstall --quiet -y onnxruntime
    "$prefix/bin/pip" install --quiet "$onnxruntime"
fi
"$prefix/bin/pip" uninstall --quiet -y pip
if "$prefix/bin/python" -c "import torch" 2>/dev/null; then
    echo "build_venv: torch slipped into the serving set" >&2
    exit 1
fi
# The embedded model's plots are documentation, not something the server reads.
find "$prefix"/lib/python3*/site-packages/model/weights -type f -name '*.png' -delete
