# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target operator -t kubetuner/operator:0.1.0 .
#   docker build --target trainer  -t kubetuner/trainer:0.1.0 .
# Both run as the unprivileged user 1000 and install from constraints.txt (pinned).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 1000 kubetuner && useradd --uid 1000 --gid 1000 --create-home kubetuner
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY operator/ operator/
COPY trainer_image/ trainer_image/

# The operator never needs torch: only the torch-free parts of the trainer package are imported.
FROM base AS operator
RUN pip install -c constraints.txt ".[operator]"
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["kubetuner", "operator"]

# The trainer: CUDA torch from PyPI (its wheels bundle the CUDA runtime), then the pinned stack.
FROM base AS trainer
ENV HF_HOME=/cache/huggingface
RUN pip install "torch==2.13.0" \
 && pip install -c constraints.txt ".[trainer]" \
 && mkdir -p /cache /output && chown 1000:1000 /cache /output
USER 1000:1000
EXPOSE 9400
ENTRYPOINT ["kubetuner-train"]
