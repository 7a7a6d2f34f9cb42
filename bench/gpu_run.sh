#!/usr/bin/env bash
# Superseded by bench/gpu_check.sh (issue 15), which serves through the real server with onnxruntime-gpu
# carried in pieces (tools/gpu_carry.sh). Kept so older notes that name this script still work.
exec bash "$(dirname "$0")/gpu_check.sh" "$@"
