# syntax=docker/dockerfile:1
# MUSIQ scoring service image: CPU (default) or CUDA, one Dockerfile, chosen by build arguments.
#
#   docker build -t musiq:cpu .
#   docker build -t musiq:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 \
#     --build-arg ONNXRUNTIME=onnxruntime-gpu==1.22.0 .
#
# The venv is built in a stage on the same base as the runtime (so its interpreter links hold)
# and copied over: the runtime stage has no compilers, no pip, no torch. The embedded default
# model ships inside the installed `model` package; more ONNX files are mounted at /models and
# named in MUSIQ_MODELS. See deploy/README.md.

# The CUDA base must carry CUDA 12 + cuDNN 9: what onnxruntime-gpu >= 1.19 on PyPI is built for.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# ---- interpreter -------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The python image has 3.11; CUDA images have no Python: 3.11 comes from the distribution (Ubuntu
# 22.04 universe, Debian 12 main). The project requires 3.11 exactly.
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11=3.11.* python3.11-venv=3.11.* \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---- build the venv ----------------------------------------------------------------------------
FROM base AS build
# Which ONNX Runtime wheel serves: onnxruntime (CPU) or e.g. onnxruntime-gpu==1.22.0 (CUDA).
ARG ONNXRUNTIME=onnxruntime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/musiq
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY service/ service/
COPY cli/ cli/
COPY export/ export/
COPY musiq_client/ musiq_client/
# The base dependency set only (no train/export extras: no torch). Another ONNX Runtime wheel
# replaces the CPU one: both install the same `onnxruntime` module.
RUN /opt/musiq/bin/pip install . \
    && if [ "${ONNXRUNTIME}" != "onnxruntime" ]; then \
         /opt/musiq/bin/pip uninstall -y onnxruntime \
         && /opt/musiq/bin/pip install "${ONNXRUNTIME}"; \
       fi \
    && /opt/musiq/bin/pip uninstall -y pip \
    && ! /opt/musiq/bin/python -c "import torch" 2>/dev/null
# Only the ONNX file of the embedded model is served; the checkpoints and plots are not needed.
RUN find /opt/musiq/lib/python3.11/site-packages/model/weights \
        -type f ! -name '*.onnx' ! -name '*.md' -delete

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
