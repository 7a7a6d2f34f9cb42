#!/usr/bin/env bash
# The GPU benchmark as one script for a lent machine (1x H100/H200, 16 cores, no network).
# From the repository root there:   bash bench/gpu_run.sh        (about 4 minutes)
# Results: $OUT/gpu_results.md, $OUT/gpu_results.json, $OUT/gpu_log.txt, $OUT/env.txt.
# Optional: wheels in .whl/ (carried) are installed first, e.g. simplejpeg for cp312.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    $PY -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
} | tee "$OUT/env.txt"
timeout 240 $PY -m bench.gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_log.txt"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_log.txt"
