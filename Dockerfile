# syntax=docker/dockerfile:1
# MUSIQ scoring service image: CPU (default) or CUDA, one Dockerfile, chosen by build arguments.
# Both build on a plain Debian + Python base; CUDA comes from PyPI, not from an nvidia/cuda base:
#
#   docker build -t musiq:cpu .
#   docker build -t musiq:cuda --build-arg ONNXRUNTIME='onnxruntime-gpu[cuda,cudnn]==1.31.1' .
#   docker build -t musiq:bulk --build-arg EXTRAS=bulk .   # + ray[data]: the Ray worker image (docs/bulk.md)
#
# onnxruntime-gpu 1.31.1 is built for CUDA 13 and cuDNN 9; its `cuda` and `cudnn` extras install
# NVIDIA's runtime wheels (cuBLAS, cuDNN, cuFFT, cuRAND, the CUDA runtime) into the venv, and the
# runtime stage registers their folders with the dynamic linker. Only the GPU driver (libcuda.so.1)
# comes from the host, as the NVIDIA container toolkit mounts it.
#
# The venv is built in a stage on the same base as the runtime (so its interpreter links hold)
# and copied over: the runtime stage has no compilers, no pip, no torch. The embedded default
# model ships inside the installed `model` package; more ONNX files are mounted at /models and
# named in MUSIQ_MODELS. See deploy/README.md; deploy/container_proof.sh builds and runs both.

ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# ---- interpreter -------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The python images have Python; a plain Debian base gets the distribution's python3 (3.11 on
# Debian 12, 3.13 on Debian 13: the project runs on 3.11 to 3.13).
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3-venv=3.* \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build the venv ----------------------------------------------------------------------------
FROM base AS build
# Which ONNX Runtime wheel serves: onnxruntime (CPU) or 'onnxruntime-gpu[cuda,cudnn]==1.31.1'.
ARG ONNXRUNTIME=onnxruntime
# Optional extras to install beside the base set: `bulk` (ray[data], for `musiq bulk` on a Ray
# cluster). Empty by default: the server image holds no Ray.
ARG EXTRAS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
COPY export/ export/
COPY musiq_client/ musiq_client/
COPY bulk/ bulk/
COPY deploy/build_venv.sh deploy/
RUN deploy/build_venv.sh /opt/musiq "${ONNXRUNTIME}" "${EXTRAS}"

# ---- runtime -----------------------------------------------------------------------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="musiq-service" \
      org.opencontainers.image.description="MUSIQ image quality scoring: REST :8000, gRPC :50051" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG UID=10001
RUN groupadd --system --gid "${UID}" musiq \
    && useradd --system --uid "${UID}" --gid musiq --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin musiq \
    && mkdir -p /models \
    && chown musiq:musiq /models
COPY --from=build /opt/musiq /opt/musiq
# NVIDIA's wheels (CUDA image only) keep their libraries in site-packages/nvidia/*/lib: registered
# with the dynamic linker, ONNX Runtime's CUDA provider finds them without LD_LIBRARY_PATH.
RUN find /opt/musiq/lib/python3*/site-packages/nvidia -maxdepth 2 -name lib -type d 2>/dev/null \
        > /etc/ld.so.conf.d/musiq-nvidia.conf; \
    ldconfig
# Read-only root filesystem: nothing is written beside the code (no bytecode, no home); uploads
# that spill to disk go to /tmp, which the orchestrator mounts writable (emptyDir / tmpfs).
ENV PATH=/opt/musiq/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MUSIQ_HOST=0.0.0.0 \
    MUSIQ_HTTP_PORT=8000 \
    MUSIQ_GRPC_PORT=50051
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MUSIQ_HTTP_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["musiq"]
CMD ["serve"]
