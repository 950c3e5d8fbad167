# syntax=docker/dockerfile:1
# The VAE inference service on CPU.
#   docker build -t vae-service:0.1.0 .                                 the API (default target: runtime)
#   docker build --target train -t vae-service-train:0.1.0 .            the same plus the training extras
#   docker run -p 8000:8000 vae-service:0.1.0                           serves the default model
# torch comes from PyTorch's CPU index: the default index would pull the multi-GB CUDA build.

ARG PYTHON_IMAGE=python:3.11-slim
# keep equal to the torch pin in pyproject.toml (tests/test_deploy.py checks it)
ARG TORCH_VERSION=2.13.0

# ---- builder: a venv with the service and its runtime dependencies ------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch alone first: by far the largest layer, rebuilt only when its pin changes
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml ./
COPY service ./service
COPY training ./training
# torch==2.13.0 is already met by 2.13.0+cpu, so this adds only the small dependencies
RUN pip install .

# ---- train-builder: the same venv plus the training extras --------------------------------------
FROM builder AS train-builder
RUN pip install ".[train]"

# ---- base: what both final images share ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && install -d -o 10001 -g 10001 /models
# The default model. /models and its files belong to the app user: a new named volume mounted on
# /models starts as a copy of this directory (the default model, same owner), so the API serves it
# with no training first and the train image can write next to it.
COPY --chown=10001:10001 models/digits.pt models/digits.pt.sha256 /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VAE_MODEL_PATH=/models/digits.pt
WORKDIR /home/app

# ---- train: `docker run --rm -v models:/models vae-service-train:0.1.0 python -m training train ...`
FROM base AS train
COPY --from=train-builder /opt/venv /opt/venv
USER 10001:10001
CMD ["python", "-m", "training", "train", "--help"]

# ---- runtime (the default target): the API ------------------------------------------------------
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
# one worker with one torch thread: compose and Kubernetes give each replica one CPU and scale by
# replicas; VAE_WORKERS=0 instead runs one worker per CPU of the container's limit
ENV VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_WORKERS=1 \
    VAE_LOG_LEVEL=info
USER 10001:10001
EXPOSE 8000
# slim has no curl; python's urllib fails (exit 1) on a refused connection and on any non-2xx, so a
# 503 from /readyz (no model loaded) marks the container unhealthy
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VAE_PORT', '8000'), timeout=4)"]
# the same serving command as `make run`; `--host 0.0.0.0` comes from VAE_HOST
CMD ["python", "-m", "service"]
