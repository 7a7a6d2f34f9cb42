#!/usr/bin/env bash
# Builds the CPU and CUDA images with buildah and proves each runs, on a machine without a Docker
# engine and without registry access (only the Debian and PyPI mirrors): the plain Debian + Python
# base is made locally with debootstrap. `make image-proof` runs it (as root; it installs podman,
# buildah, runc and debootstrap when missing). Not part of `make test`: minutes of downloads and
# several GB of disk. Work files go to $WORK (default /tmp/musiq-container-proof); VARIANTS picks
# what to build ("cpu cuda" by default). Results: $WORK/proof.txt. See deploy/README.md.
#
# CPU image: serves as its non-root user; the REST score, /metrics, the HEALTHCHECK command, the
# time from start to /readyz, and what the runtime lacks (torch, compilers, pip, a writable tree).
# CUDA image: every library that ONNX Runtime's CUDA provider needs resolves (ldd), the provider is
# listed, and the image still serves on a machine without a GPU (CPU fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/musiq-container-proof}
VARIANTS=${VARIANTS:-cpu cuda}
CUDA_ORT=${CUDA_ORT:-onnxruntime-gpu[cuda,cudnn]==1.31.1}
BASE=localhost/debian-python:bookworm
mkdir -p "$WORK"
proof=$WORK/proof.txt
: >"$proof"
say() { echo "$*" | tee -a "$proof"; }

missing=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
# vfs: overlay-on-overlay is not available inside this machine's own container.
printf '[storage]\ndriver = "vfs"\nrunroot = "%s/run"\ngraphroot = "%s/storage"\n' "$WORK" "$WORK" >"$CONTAINERS_STORAGE_CONF"

if ! podman image exists "$BASE"; then
    rm -rf "$WORK/rootfs"
    # debootstrap's resolver misses python3-venv's dependencies: finish with apt in the chroot.
    debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian
    cp /etc/resolv.conf "$WORK/rootfs/etc/resolv.conf"
    chroot "$WORK/rootfs" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin;
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null &&
        apt-get clean && rm -rf /var/lib/apt/lists/*'
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE"
fi

# The host's pip configuration and CA bundle reach the build's RUN steps only (not the image).
build() {  # build TAG [BUILD-ARG...]
    local tag=$1 start
    shift
    if [ -n "${REUSE:-}" ] && podman image exists "$tag"; then
        say "$tag: reused (REUSE=1)"
    else
        start=$(date +%s)
    buildah bud --isolation chroot --network host --format docker --layers=false \
        --build-arg BASE_IMAGE="$BASE" "$@" \
        -v /etc/pip.conf:/etc/pip.conf:ro -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        -t "$tag" .
        say "$tag: built in $(($(date +%s) - start)) s"
    fi
    say "$tag: $(podman image inspect "$tag" --format 'size={{.Size}} user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}}')"
    say "$tag: size $(podman image inspect "$tag" --format '{{.Size}}' | awk '{printf "%.0f MiB", $1 / 2^20}')"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# `podman run` fails here (runc may not set rlimits inside this machine's container), so images run
# under buildah's chroot isolation, as their non-root user, on free loopback ports.
serve_and_score() {  # serve_and_score TAG
    local tag=$1 port gport ctr server start ready
    port=$(free_port)
    gport=$(free_port)
    ctr=$(buildah from "$tag")
    run() { buildah run --isolation chroot --network host --user 10001:10001 \
        -e MUSIQ_HOST=127.0.0.1 -e MUSIQ_HTTP_PORT="$port" -e MUSIQ_GRPC_PORT="$gport" "$ctr" -- "$@"; }
    start=$(date +%s.%N)
    run musiq serve >"$WORK/serve-${tag##*:}.log" 2>&1 &
    server=$!
    ready=""
    for _ in $(seq 600); do
        if curl -sf "127.0.0.1:$port/readyz" >/dev/null; then ready=$(date +%s.%N); break; fi
        sleep 0.2
    done
    [ -n "$ready" ] || { cat "$WORK/serve-${tag##*:}.log"; kill "$server"; buildah rm "$ctr"; return 1; }
    say "$tag: start to ready $(python3 -c "print(f'{$ready - $start:.1f}')") s"
    python3 -c 'import sys, zlib, struct
w, h = 96, 64
raw = b"".join(b"\0" + bytes((x * 3 + y * 5) % 256 for x in range(w) for _ in range(3)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
sys.stdout.buffer.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))' >"$WORK/test.png"
    say "$tag: POST /v1/score -> $(curl -sf --data-binary @"$WORK/test.png" -H 'Content-Type: image/png' "127.0.0.1:$port/v1/score")"
    curl -sf "127.0.0.1:$port/metrics" | grep -E '^musiq_(model_info|requests_total)' | tee -a "$proof"
    # gRPC health with the image's own grpcio, the HEALTHCHECK command, then what the runtime lacks.
    run python -c "import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg
print('gRPC health:', h.HealthCheckResponse.ServingStatus.Name(hg.HealthStub(grpc.insecure_channel('127.0.0.1:$gport')).Check(h.HealthCheckRequest(), timeout=10).status))" \
        | tee -a "$proof"
    run sh -c 'id; python -c "import os, urllib.request; urllib.request.urlopen(\"http://127.0.0.1:%s/healthz\" % os.environ[\"MUSIQ_HTTP_PORT\"], timeout=2)" && echo "HEALTHCHECK command: ok"
        python -c "import torch" 2>/dev/null && echo "torch present" || echo "no torch"
        command -v gcc cc pip || echo "no gcc, cc, pip"
        touch /opt/musiq/probe 2>/dev/null && echo "code tree writable" || echo "code tree not writable"' | tee -a "$proof"
    kill "$server"
    wait "$server" || true
    buildah rm "$ctr" >/dev/null
}

cuda_libraries() {  # cuda_libraries TAG: ldd of the CUDA provider inside the image, and the providers
    local tag=$1 ctr out
    ctr=$(buildah from "$tag")
    # cuDNN and cuFFT are not NEEDED by the provider: it opens them when a session first needs
    # them, through the same linker cache, so they are listed from it too.
    out=$(buildah run --isolation chroot --user 10001:10001 "$ctr" -- sh -c '
        lib=$(ls /opt/musiq/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so)
        echo "$lib"; ldd "$lib"
        echo "linker cache:"; ldconfig -p | grep -E "lib(cudnn|cufft|cublas|cudart|curand)[^ ]*\.so\.[0-9]+ " | sed "s/^\s*/  /"
        python -c "import onnxruntime as ort; print(\"onnxruntime\", ort.__version__, ort.get_available_providers())"')
    buildah rm "$ctr" >/dev/null
    echo "$out" | tee -a "$proof"
    # libcuda.so.1 is the GPU driver's: the host provides it (the NVIDIA container toolkit mounts it).
    if echo "$out" | grep "not found" | grep -vq "libcuda.so.1 "; then say "$tag: UNRESOLVED libraries"; return 1; fi
    grep -q "libcudnn.so.9 " <<<"$out" || { say "$tag: no cuDNN 9 in the linker cache"; return 1; }
    grep -q CUDAExecutionProvider <<<"$out" || { say "$tag: no CUDAExecutionProvider"; return 1; }
    say "$tag: every NEEDED library of the CUDA provider resolves but the host driver's libcuda.so.1; cuDNN 9 found; CUDAExecutionProvider listed"
}

for variant in $VARIANTS; do
    case $variant in
        cpu)
            build localhost/musiq:cpu
            serve_and_score localhost/musiq:cpu || exit 1
            ;;
        cuda)
            build localhost/musiq:cuda --build-arg ONNXRUNTIME="$CUDA_ORT"
            cuda_libraries localhost/musiq:cuda || exit 1
            serve_and_score localhost/musiq:cuda || exit 1
            ;;
        *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
done
say "container proof: ok ($VARIANTS)"
