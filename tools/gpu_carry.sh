#!/usr/bin/env bash
# Prepares what the GPU check (bench/gpu_check.sh) needs on the H200 test host and cannot find there,
# in pieces that each fit into one `run` transfer beside the tracked tree, and prints the calls.
#
#   bash tools/gpu_carry.sh            # once, here (network to PyPI); minutes: xz -9 of ~330 MiB
#   bash tools/gpu_carry.sh --print    # only print the run calls for pieces already made
#
# The host (device README, KINDS.md) has Python 3.12 with torch 2.11 cu130 and NVIDIA's CUDA 13 wheels,
# numpy, Pillow, onnx and the CPU onnxruntime, but no network, no fastapi/pydantic/uvicorn, and a
# grpcio/protobuf of unknown version (the generated stubs need grpcio >= 1.85.1, protobuf >= 7.35.1).
# So one payload travels: onnxruntime-gpu installed (pip --target, for cp312 manylinux_2_28) minus its
# TensorRT provider library (it needs libnvinfer, which the host lacks; the check asks for CUDA only),
# plus cp312 wheels of the serving set at the versions tested here (.venv), numpy and Pillow excepted.
# xz -9 of the tar, split into pieces of PIECE_MIB, each with its sha256 in MANIFEST.
# All of it lies in .gpu-carry/ (ignored by git, so it travels only when `carry` names it).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu-carry
PARTS=$DIR/parts
PIECE_MIB=${PIECE_MIB:-35}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
PY=${PY:-.venv/bin/python}
# The serving set: the closure of pyproject.toml's [project] dependencies as installed in $PY's venv (the
# versions tested here), without numpy and Pillow (on the host) and onnxruntime (the GPU build replaces it).
closure() {
    "$PY" - <<'PYEOF'
import importlib.metadata as m
from packaging.requirements import Requirement
seen, todo = {}, [r for r in m.requires("musiq-service") or [] if "extra ==" not in r]
while todo:
    req = Requirement(todo.pop())
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    name = req.name.lower().replace("_", "-")
    if name in seen:
        continue
    seen[name] = m.version(name)
    todo += m.requires(name) or []
for name in sorted(set(seen) - {"numpy", "pillow", "onnxruntime"}):
    print(f"{name}=={seen[name]}")
PYEOF
}
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
size() { stat -c %s "$1"; }

print_calls() {
    local parts=("$PARTS"/part-*) tree n i
    n=${#parts[@]}
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo
    echo "== tracked tree $(mib "$tree"); each call carries one piece (<= $PIECE_MIB MiB) + MANIFEST."
    echo "== Make these calls back to back (the host keeps carried files only while it stays warm, 30 s"
    echo "== after a call). Calls 1..$((n - 1)) only stash their piece (and start the model export);"
    echo "== call $n brings the last piece and runs the check (about 8 minutes):"
    for i in $(seq 1 "$n"); do
        local part=${parts[$((i - 1))]}
        if [ "$i" -lt "$n" ]; then
            echo "run(command=\"bash bench/gpu_check.sh --stash\", carry=[\"$part\", \"$PARTS/MANIFEST\"], timeout_s=120)"
        else
            echo "run(command=\"bash bench/gpu_check.sh\", carry=[\"$part\", \"$PARTS/MANIFEST\"], timeout_s=600)"
        fi
    done
    echo "== A call that reports missing pieces: send those again with --stash, then the last call again."
}

if [ "${1-}" = --print ]; then
    print_calls
    exit 0
fi

rm -rf "$DIR/cache/wheels"  # only the wheels pinned now: two versions of one package stop pip
mkdir -p "$DIR/cache/wheels" "$DIR/build"
start=$(date +%s)
echo "== 1. download $ORT_GPU (cp312) and the serving wheels"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DIR/cache" "$ORT_GPU"
mapfile -t pins < <(closure)
echo "   serving set: ${pins[*]}"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DIR/cache/wheels" "${pins[@]}"
wheel=$(ls "$DIR"/cache/onnxruntime_gpu-*.whl)
echo "   $wheel: $(mib "$(size "$wheel")")"
echo "   serving wheels: ${#pins[@]}, $(mib "$(du -cb "$DIR"/cache/wheels/*.whl | tail -1 | cut -f1)")"

echo "== 2. install it for cp312 into a folder; drop the TensorRT provider"
rm -rf "$DIR/build/payload"
mkdir -p "$DIR/build/payload/wheels"
"$PY" -m pip install -q --no-deps --no-compile --no-index "${PLATFORM[@]}" --target "$DIR/build/payload/ort" "$wheel"
trt=$DIR/build/payload/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
[ -f "$trt" ] && echo "   dropped $(basename "$trt"): $(mib "$(size "$trt")")" && rm "$trt"
rm -rf "$DIR/build/payload/ort/bin"  # onnxruntime_test, unused
cp "$DIR"/cache/wheels/*.whl "$DIR/build/payload/wheels/"
echo "   installed: $(mib "$(du -sb "$DIR/build/payload" | cut -f1)")"

echo "== 3. tar | xz -9 (both cores; a few minutes)"
tar -C "$DIR/build" -cf - payload | xz -9 -T0 >"$DIR/build/payload.tar.xz"
echo "   payload.tar.xz: $(mib "$(size "$DIR/build/payload.tar.xz")") (the wheel as downloaded: $(mib "$(size "$wheel")"))"

echo "== 4. split into pieces of $PIECE_MIB MiB"
rm -rf "$PARTS"
mkdir -p "$PARTS"
split -b "${PIECE_MIB}M" -d -a 2 "$DIR/build/payload.tar.xz" "$PARTS/part-"
{
    echo "payload $(sha256sum "$DIR/build/payload.tar.xz" | cut -d' ' -f1) $(size "$DIR/build/payload.tar.xz")"
    for part in "$PARTS"/part-*; do
        echo "$(basename "$part") $(sha256sum "$part" | cut -d' ' -f1) $(size "$part")"
    done
} >"$PARTS/MANIFEST"
cat "$PARTS/MANIFEST"
echo "== done in $(($(date +%s) - start)) s"
print_calls
