# syntax=docker/dockerfile:1.7
# Two images from one file (names and tags: operator/kubetuner_operator/images.py; the chart's
# image.repository and trainerImage default to them):
#   docker build --target operator -t ghcr.io/kubetuner/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetuner/trainer:0.1.0 .
# The operator runs as uid 65532 (the chart's securityContext), the trainer as uid 1000 (the trainer
# pod's securityContext). Dependencies install from constraints.txt (pinned) in a layer of their
# own, before the source is copied, so a code change does not reinstall torch.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt ./
# The project's requirements (base + one extra) read from pyproject.toml, for the dependency layer.
RUN printf '%s\n' \
      'import sys, tomllib' \
      'project = tomllib.load(open("pyproject.toml", "rb"))["project"]' \
      'extras = project["optional-dependencies"]' \
      'print("\n".join(project["dependencies"] + [d for e in sys.argv[1:] for d in extras[e]]))' \
      > /usr/local/bin/project-requirements.py

FROM base AS operator
RUN python /usr/local/bin/project-requirements.py operator > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt
COPY README.md ./
COPY operator/ operator/
COPY trainer_image/ trainer_image/
# The operator never needs torch: only the torch-free parts of the trainer package are imported.
RUN pip install --no-deps . \
 && groupadd --gid 65532 kubetuner && useradd --uid 65532 --gid 65532 --no-create-home kubetuner
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["kubetuner", "operator"]

# The trainer: CUDA torch from PyPI (its wheels bundle the CUDA runtime), then the pinned stack.
FROM base AS trainer
ENV HF_HOME=/cache/huggingface
RUN pip install -c constraints.txt torch \
 && python /usr/local/bin/project-requirements.py trainer > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt
COPY README.md ./
COPY operator/ operator/
COPY trainer_image/ trainer_image/
RUN pip install --no-deps . \
 && groupadd --gid 1000 kubetuner && useradd --uid 1000 --gid 1000 --create-home kubetuner \
 && mkdir -p /cache /output && chown 1000:1000 /cache /output
USER 1000:1000
EXPOSE 9400
ENTRYPOINT ["kubetuner-train"]
