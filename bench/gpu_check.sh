#!/usr/bin/env bash
# The GPU check: the first thing to run whenever the H200 test host is lent (issue 15). About 8 minutes.
#
#   here, once:  bash tools/gpu_carry.sh      (onnxruntime-gpu + serving wheels, in pieces; prints the calls)
#   there:       bash bench/gpu_check.sh --stash   for every piece but the last (each its own `run` call)
#                bash bench/gpu_check.sh           with the last piece: reassemble, install, measure
#   CPU rehearsal (no GPU): GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh   (tiny model, CPU provider, ~2 min)
#
# What it measures (bench/gpu.py): the real `musiq serve` on the CUDA provider with the official-size
# network (random weights, fp16 and fp32, exported there with the host's torch) and the default model,
# under closed-loop gRPC and REST clients from 1 to 256 on 512x384 and on the mixed set, plus an open-loop
# level at half the best rate; images/s, p50/p99, the server's per-stage timings and batching, and GPU
# utilisation (nvidia-smi dmon). Results: $OUT/gpu_results.md (+ .json, the log, server logs, dmon).
# Every step has its own timeout inside a global budget (GPU_CHECK_BUDGET_S, default 480 s); whatever
# happens, the report of what finished is written (trap on EXIT).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
STASH=${GPU_CHECK_STASH:-/tmp/musiq-gpu-carry}  # outside the tree: later transfers cannot replace it
WORK=${GPU_CHECK_WORK:-/tmp/musiq-gpu}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
PY=${GPU_CHECK_PYTHON:-python3}             # the host's Python 3.12 (torch, numpy, Pillow)
EXPORT_PY=${GPU_CHECK_EXPORT_PYTHON:-$PY}   # needs torch + onnx; runs without the carried wheels
PARTS=${GPU_CHECK_PARTS:-.gpu-carry/parts}  # where `carry` puts the pieces (tools/gpu_carry.sh)
export PYTHONUNBUFFERED=1
# Until the carried wheels are installed: the repository alone (the report needs only numpy and Pillow).
export PYTHONPATH="$REPO${GPU_CHECK_EXTRA_PYTHONPATH:+:$GPU_CHECK_EXTRA_PYTHONPATH}"
T0=$(date +%s)
mkdir -p "$STASH" "$WORK"
LOG=$OUT/gpu_check.log

say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
# step_timeout MAX: MAX seconds, or what is left of the budget less 20 s for the report, if less
step_timeout() {
    local l
    l=$(($(left) - 20))
    [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"
}

# ---------------------------------------------------------------- pieces
stash() {  # moves this call's pieces out of the tree after checking each against MANIFEST
    [ -f "$PARTS/MANIFEST" ] && cp "$PARTS/MANIFEST" "$STASH/MANIFEST"
    for part in "$PARTS"/part-*; do
        [ -f "$part" ] || continue
        name=$(basename "$part")
        want=$(awk -v n="$name" '$1 == n { print $2 }' "$STASH/MANIFEST" 2>/dev/null)
        have=$(sha256sum "$part" | cut -d' ' -f1)
        if [ -n "$want" ] && [ "$want" = "$have" ]; then
            mv "$part" "$STASH/$name" && say "stashed $name ($(stat -c %s "$STASH/$name") bytes, sha256 ok)"
        else
            say "BAD piece $name: sha256 $have, MANIFEST says '${want:-nothing}': send it again"
        fi
    done
    missing=()
    if [ -f "$STASH/MANIFEST" ]; then
        while read -r name sha _; do
            [ "$name" = payload ] && continue
            [ -f "$STASH/$name" ] && [ "$(sha256sum "$STASH/$name" | cut -d' ' -f1)" = "$sha" ] || missing+=("$name")
        done <"$STASH/MANIFEST"
    else
        missing=(MANIFEST)
    fi
    say "pieces missing: ${missing[*]:-none}"
}

export_models() {  # the official-size models (random weights) with the host's torch; the tiny one when dry
    local args=(--out "$WORK/models" --precision fp16 fp32)
    [ "$DRY" = 1 ] && args+=(--tiny)
    (cd "$REPO" && PYTHONPATH="$REPO" "$EXPORT_PY" -m bench.gpu export "${args[@]}")
}

if [ "${1-}" = --stash ]; then
    : >"$LOG"
    stash
    # Start the export now, in a session of its own (it outlives this call while the host stays warm),
    # so the last call finds the models ready instead of spending GPU time on a CPU job.
    if [ ! -f "$WORK/export.started" ] && command -v setsid >/dev/null; then
        touch "$WORK/export.started"
        setsid nohup bash -c "$(declare -f export_models); REPO='$REPO' WORK='$WORK' DRY='$DRY' EXPORT_PY='$EXPORT_PY'; export_models" \
            >"$WORK/export.log" 2>&1 </dev/null &
        say "model export started in the background (log: $WORK/export.log)"
    fi
    exit 0
fi

# ---------------------------------------------------------------- the check
: >"$LOG"
NOTES=()
finish() {
    say "report (global budget ${BUDGET_S}s, used $(($(date +%s) - T0))s)"
    [ -f "$WORK/dmon.pid" ] && kill "$(cat "$WORK/dmon.pid")" 2>/dev/null
    local notes=()
    for n in "${NOTES[@]}"; do notes+=(--note "$n"); done
    notes+=(--note "whole check: $(($(date +%s) - T0)) s of a ${BUDGET_S} s budget")
    timeout 60 "$PY" -m bench.gpu report --out "$OUT" --env-file "$OUT/env.txt" "${notes[@]}" >/dev/null 2>>"$LOG" \
        || say "report failed (see above); gpu_results.json holds the levels"
    for f in "$WORK"/server-*.log; do
        [ -f "$f" ] && { echo "== $f (last 60 lines but access logs)"; grep -v '" 200 OK$' "$f" | tail -60; }
    done >"$OUT/server_logs.txt" 2>/dev/null
    [ -f "$WORK/export.log" ] && { echo "== export"; tail -20 "$WORK/export.log"; } >>"$OUT/server_logs.txt"
    [ -f "$WORK/dmon.txt" ] && cp "$WORK/dmon.txt" "$OUT/dmon.txt"
    say "done: $OUT/gpu_results.md"
}
trap finish EXIT
rm -f "$OUT/gpu_results.json" "$OUT/gpu_results.md"

if [ "$DRY" = 1 ]; then
    say "DRY RUN: CPU provider, tiny model, short levels (a rehearsal of every step but the GPU)"
    PROVIDERS=(CPUExecutionProvider)
    LEVEL_S=${GPU_CHECK_LEVEL_S:-3}
    CLIENT_PROCS=2
    DECODE=1
else
    PROVIDERS=(CUDAExecutionProvider CPUExecutionProvider)
    LEVEL_S=${GPU_CHECK_LEVEL_S:-5}
    CLIENT_PROCS=4
    DECODE=10  # of 16 cores: 4 client processes and the server's event loops keep the rest
fi

{
    echo "date: $(date -u)"
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || echo none)"
    echo "cpus: $(nproc)"
    echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)' 2>&1)"
    echo "torch: $("$EXPORT_PY" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1)"
    echo "mode: $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, tiny model): not a GPU result' || echo GPU)"
} >"$OUT/env.txt"
cat "$OUT/env.txt" | tee -a "$LOG"

say "1. pieces: stash this call's, reassemble, verify"
stash
if [ "${#missing[@]}" -gt 0 ]; then
    NOTES+=("STOPPED: pieces missing on the host: ${missing[*]} (send them with --stash, then run this again)")
    exit 2
fi
payload_sha=$(awk '$1 == "payload" { print $2 }' "$STASH/MANIFEST")
if [ ! -d "$WORK/payload/ort" ] || [ "$(cat "$WORK/payload.sha256" 2>/dev/null)" != "$payload_sha" ]; then
    cat $(awk '$1 != "payload" { print "'"$STASH"'/" $1 }' "$STASH/MANIFEST") >"$WORK/payload.tar.xz"
    have=$(sha256sum "$WORK/payload.tar.xz" | cut -d' ' -f1)
    if [ "$have" != "$payload_sha" ]; then
        NOTES+=("STOPPED: reassembled payload sha256 $have != $payload_sha")
        exit 3
    fi
    rm -rf "$WORK/payload" "$WORK/site"
    timeout "$(step_timeout 90)" tar -C "$WORK" -xJf "$WORK/payload.tar.xz" || { NOTES+=("STOPPED: unpacking failed"); exit 3; }
    rm -f "$WORK/payload.tar.xz"
    say "2. install the serving wheels (--target, no index)"
    timeout "$(step_timeout 120)" "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$WORK/site" "$WORK"/payload/wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG"
    echo "$payload_sha" >"$WORK/payload.sha256"
fi
# onnxruntime-gpu first, then the serving wheels, then the repository; GPU_CHECK_EXTRA_PYTHONPATH: the
# rehearsal's stand-in for the host's own numpy and Pillow.
export PYTHONPATH="$WORK/payload/ort:$WORK/site:$REPO${GPU_CHECK_EXTRA_PYTHONPATH:+:$GPU_CHECK_EXTRA_PYTHONPATH}"

say "3. preflight: onnxruntime-gpu, CUDA libraries, one session on the default model"
preflight() {
timeout "$(step_timeout 120)" "$PY" - "${PROVIDERS[@]}" <<'EOF' 2>&1 | tee -a "$LOG" "$OUT/preflight.txt"
import sys, time
import onnxruntime as ort
from service.runtime import ModelRuntime, RuntimeOptions, nvidia_library_dirs
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
print("nvidia libraries:", nvidia_library_dirs())
start = time.perf_counter()
rt = ModelRuntime("model/weights/default.onnx", RuntimeOptions(providers=tuple(sys.argv[1:])))
p = rt.warm_up()
print(f"session providers {rt.providers}, inputs by {rt.host_memory}, pad multiple {rt.pad_multiple}, "
      f"warm-up score {p.score:.3f}, {time.perf_counter() - start:.1f} s")
if rt.providers[0] != sys.argv[1]:
    sys.exit(f"PREFLIGHT: wanted {sys.argv[1]}, the session runs on {rt.providers[0]}")
EOF
return "${PIPESTATUS[0]}"
}
# First as the service would run: service.runtime.load_cuda_libraries finds the CUDA 13 and cuDNN 9 libraries
# of torch's nvidia-* wheels. Should that fail, again with every nvidia/*/lib folder on LD_LIBRARY_PATH.
if ! preflight; then
    NOTES+=("preflight without LD_LIBRARY_PATH failed ($(tail -1 "$OUT/preflight.txt")): load_cuda_libraries needs a fix")
    NV=$("$PY" -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/*/lib/lib*.so*')})))" 2>/dev/null)
    export LD_LIBRARY_PATH="$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "retrying with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if ! preflight; then
        NOTES+=("STOPPED: preflight failed ($(tail -1 "$OUT/preflight.txt")); see gpu_check.log")
        exit 4
    fi
fi
NOTES+=("preflight: $(grep -h 'session providers' "$OUT/preflight.txt")")

say "4. models: wait for (or run) the export"
if [ -f "$WORK/export.started" ]; then
    for _ in $(seq 1 "$(step_timeout 240)"); do
        [ -f "$WORK/models/$([ "$DRY" = 1 ] && echo tiny || echo official).fp32.onnx" ] && break
        pgrep -f "bench.gpu export" >/dev/null || break
        sleep 1
    done
fi
timeout "$(step_timeout 240)" bash -c "$(declare -f export_models); REPO='$REPO' WORK='$WORK' DRY='$DRY' EXPORT_PY='$EXPORT_PY'; export_models" \
    2>&1 | tail -5 | tee -a "$LOG"
NAME=$([ "$DRY" = 1 ] && echo tiny || echo official)

if command -v nvidia-smi >/dev/null && [ "$DRY" != 1 ]; then
    nvidia-smi dmon -s u -o T -d 1 >"$WORK/dmon.txt" 2>&1 &
    echo $! >"$WORK/dmon.pid"
fi

serve() {  # serve LABEL MODEL MAX_S LEVEL...
    local label=$1 model=$2 max_s=$3
    shift 3
    local t
    t=$(step_timeout "$max_s")
    if [ ! -f "$model" ]; then
        NOTES+=("$label: no model file $model (export failed? see server_logs.txt)")
        return
    fi
    say "5. $label: ${t}s at most"
    timeout -k 10 "$t" "$PY" -m bench.gpu serve --out "$OUT" --model "$model" --label "$label" \
        --providers "${PROVIDERS[@]}" --level-s "$LEVEL_S" --deadline $(($(date +%s) + t - 15)) \
        --client-processes "$CLIENT_PROCS" --dmon "$WORK/dmon.txt" --log "$WORK/server-$label.log" \
        --env "MUSIQ_DECODE_PROCESSES=$DECODE" ${SERVE_ENV:-} --levels "$@" 2>&1 | tail -40 >>"$LOG"
    [ "${PIPESTATUS[0]}" = 124 ] && NOTES+=("$label: stopped by its ${t}s timeout")
}

if [ "$DRY" = 1 ]; then
    serve official-fp16 "$WORK/models/$NAME.fp16.onnx" 60 \
        grpc:512x384:1 grpc:512x384:4 grpc:512x384:half grpc:mixed:4 rest:512x384:4
    serve default "model/weights/default.onnx" 40 grpc:512x384:4 rest:mixed:2
    SERVE_ENV=MUSIQ_IO_BINDING=false serve official-fp16-no-binding "$WORK/models/$NAME.fp16.onnx" 40 grpc:512x384:4
else
    # The headline first: whatever the budget cuts, it cuts the least important runs.
    serve official-fp16 "$WORK/models/$NAME.fp16.onnx" 170 \
        grpc:512x384:1 grpc:512x384:8 grpc:512x384:32 grpc:512x384:64 grpc:512x384:128 grpc:512x384:256 \
        grpc:512x384:half grpc:mixed:1 grpc:mixed:64 grpc:mixed:256 \
        rest:512x384:1 rest:512x384:64 rest:512x384:256 rest:mixed:64
    serve official-fp32 "$WORK/models/$NAME.fp32.onnx" 70 \
        grpc:512x384:1 grpc:512x384:64 grpc:512x384:256 grpc:mixed:64
    serve default "model/weights/default.onnx" 80 \
        grpc:512x384:1 grpc:512x384:64 grpc:512x384:256 grpc:mixed:64 rest:512x384:64
    # IO binding from pinned buffers against plain session.run: the A/B that justifies the GPU default.
    SERVE_ENV=MUSIQ_IO_BINDING=false serve official-fp16-no-binding "$WORK/models/$NAME.fp16.onnx" 55 \
        grpc:512x384:1 grpc:512x384:256
fi

say "6. the engine alone (in process, no HTTP/gRPC, no decode): what the server adds is the difference"
timeout -k 5 "$(step_timeout 40)" "$PY" -m bench.gpu pipeline --out "$OUT" --model "$WORK/models/$NAME.fp16.onnx" \
    --label official-fp16 --providers "${PROVIDERS[@]}" --level-s "$LEVEL_S" --deadline $(($(date +%s) + $(step_timeout 40) - 10)) \
    --mixes 512x384 --concurrency 64 2>&1 | tail -5 >>"$LOG"
exit 0
