#!/usr/bin/env bash
# Builds the CPU image with buildah and serves from it, on a machine without a Docker engine and
# without registry access (only the Debian and PyPI mirrors): the python base image is made
# locally with debootstrap. Not part of CI (minutes of downloads); run by hand, as root:
#   apt-get install -y podman buildah runc debootstrap && deploy/container_proof.sh
# Work files go to $WORK (default /tmp/musiq-container-proof). See deploy/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/musiq-container-proof}
mkdir -p "$WORK"
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
# vfs: overlay-on-overlay is not available inside this machine's own container.
printf '[storage]\ndriver = "vfs"\nrunroot = "%s/run"\ngraphroot = "%s/storage"\n' "$WORK" "$WORK" >"$CONTAINERS_STORAGE_CONF"

if ! podman image exists localhost/bookworm-python:3.11; then
    rm -rf "$WORK/rootfs"
    # debootstrap's resolver misses python3.11-venv's dependencies: finish with apt in the chroot.
    debootstrap --variant=minbase --include=ca-certificates bookworm "$WORK/rootfs" http://deb.debian.org/debian
    cp /etc/resolv.conf "$WORK/rootfs/etc/resolv.conf"
    chroot "$WORK/rootfs" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin;
        apt-get update -qq && apt-get install -y -qq --no-install-recommends python3.11-venv >/dev/null
        && apt-get clean && rm -rf /var/lib/apt/lists/*'
    tar -C "$WORK/rootfs" -c . | podman import - localhost/bookworm-python:3.11
fi

# The host's pip configuration and CA bundle reach the build's RUN steps only (not the image).
start=$(date +%s)
buildah bud --isolation chroot --network host --format docker --layers=false \
    --build-arg BASE_IMAGE=localhost/bookworm-python:3.11 \
    -v /etc/pip.conf:/etc/pip.conf:ro -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -t localhost/musiq:cpu .
echo "build: $(($(date +%s) - start)) s"
podman image inspect localhost/musiq:cpu \
    --format 'size={{.Size}} user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}} healthcheck={{.Config.Healthcheck.Test}}'

# `podman run` fails here (runc may not set rlimits inside this machine's container), so the
# image runs under buildah's chroot isolation, as its non-root user, on free loopback ports.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
gport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ctr=$(buildah from localhost/musiq:cpu)
cleanup() { [ -n "${server:-}" ] && kill "$server" 2>/dev/null; buildah rm "$ctr" >/dev/null; }
trap cleanup EXIT
run() { buildah run --isolation chroot --network host --user 10001:10001 \
    -e MUSIQ_HOST=127.0.0.1 -e MUSIQ_HTTP_PORT="$port" -e MUSIQ_GRPC_PORT="$gport" "$ctr" -- "$@"; }
run musiq serve >"$WORK/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf "127.0.0.1:$port/readyz" && break; sleep 1; done
echo
python3 -c 'import io, sys, zlib, struct
w, h = 96, 64
raw = b"".join(b"\0" + bytes((x * 3 + y * 5) % 256 for x in range(w) for _ in range(3)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
sys.stdout.buffer.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))' >"$WORK/test.png"
curl -sf --data-binary @"$WORK/test.png" -H 'Content-Type: image/png' "127.0.0.1:$port/v1/score"
echo
curl -sf "127.0.0.1:$port/metrics" | grep -E '^musiq_(model_info|requests_total)'
# The image's HEALTHCHECK command, run inside the container; then what the runtime image lacks.
run sh -c 'id; python -c "import os, urllib.request; urllib.request.urlopen(\"http://127.0.0.1:%s/healthz\" % os.environ[\"MUSIQ_HTTP_PORT\"], timeout=2)" && echo "HEALTHCHECK command: ok"
    python -c "import torch" 2>/dev/null && echo "torch present" || echo "no torch"
    command -v gcc cc pip || echo "no gcc, cc, pip"
    touch /opt/musiq/probe 2>/dev/null && echo "code tree writable" || echo "code tree not writable"'
echo "container proof: ok"
