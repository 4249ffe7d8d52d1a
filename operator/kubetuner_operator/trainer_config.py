"""Translate a TrainingJob spec into the trainer's ``config.json`` and ``multidatabackend.json``.

Pure: the same spec and paths always give the same files. Paths are parameters so that the
in-cluster pod (mount points, :data:`POD_PATHS`) and the local runner (plain directories) share
this code. Credentials are never written here; they reach the trainer as environment variables
from Secrets (see :mod:`kubetuner_operator.builders.trainer_pod`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from .spec import DatasetSpec, SpecError, TrainingJobSpec

CONFIG_FILE = "config.json"
OUTPUT_S3_ENV_PREFIX = "KUBETUNER_OUTPUT_"
DATABACKEND_FILE = "multidatabackend.json"


@dataclass(frozen=True)
class MountPaths:
    """Where each volume is visible to the trainer (mount points in a pod, directories locally)."""

    config_dir: str = "/etc/kubetuner"
    output_dir: str = "/workspace/output"
    model_cache_dir: str = "/workspace/cache/models"
    data_cache_dir: str = "/workspace/cache/data"
    model_dir: str = "/workspace/model"
    datasets_dir: str = "/workspace/datasets"

    @property
    def config_file(self) -> str:
        return posixpath.join(self.config_dir, CONFIG_FILE)

    @property
    def databackend_file(self) -> str:
        return posixpath.join(self.config_dir, DATABACKEND_FILE)

    @property
    def logging_dir(self) -> str:
        return posixpath.join(self.output_dir, "logs")

    def dataset_dir(self, dataset: DatasetSpec) -> str:
        """The directory a PVC-backed dataset is mounted at."""
        return posixpath.join(self.datasets_dir, dataset.id)

    def s3_model_dir(self, uri: str) -> str:
        """Where an S3 model source is downloaded (inside the model cache, so jobs can share it)."""
        return posixpath.join(self.model_cache_dir, "s3", uri.removeprefix("s3://").strip("/"))


POD_PATHS = MountPaths()


@dataclass(frozen=True)
class TrainerFiles:
    config_json: dict[str, Any]
    databackend_json: list[dict[str, Any]]


def pretrained_path(job: TrainingJobSpec, paths: MountPaths) -> str:
    """The value of ``pretrained_model_name_or_path``: a hub id or a local directory."""
    src = job.model.source
    if src.kind == "hub":
        return src.hub_id
    if src.kind == "s3":
        return paths.s3_model_dir(src.s3_uri)
    return paths.model_dir


def _databackend(job: TrainingJobSpec, paths: MountPaths) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    has_text_embeds = False
    for ds in job.datasets:
        entry = dict(ds.entry)
        dataset_type = entry.get("dataset_type", "image")
        if dataset_type == "text_embeds":
            has_text_embeds = True
            entry["cache_dir"] = posixpath.join(paths.data_cache_dir, "text", ds.id)
        elif dataset_type == "image_embeds":
            entry["cache_dir"] = posixpath.join(paths.data_cache_dir, "image_embeds", ds.id)
        else:
            entry["cache_dir_vae"] = posixpath.join(paths.data_cache_dir, "vae", ds.id)
        if ds.pvc is not None:
            entry["instance_data_dir"] = paths.dataset_dir(ds)
        entries.append(entry)
    if not has_text_embeds:
        entries.append({"id": "kubetuner-text-embeds", "dataset_type": "text_embeds", "default": True,
                        "type": "local", "cache_dir": posixpath.join(paths.data_cache_dir, "text", "default")})
    return entries


def _publishing_targets(job: TrainingJobSpec) -> list[dict[str, Any]]:
    """``spec.output.s3`` as a trainer publishing target, after any the user configured.

    Credentials are referenced by environment variable name only (set from the Secret).
    """
    out = job.output_s3
    assert out is not None
    target: dict[str, Any] = {"provider": "s3", "bucket": out.bucket, "base_path": out.prefix.strip("/")}
    if out.endpoint_url:
        target["endpoint_url"] = out.endpoint_url
    if out.region:
        target["region"] = out.region
    if out.credentials:
        target["access_key_env"] = f"{OUTPUT_S3_ENV_PREFIX}AWS_ACCESS_KEY_ID"
        target["secret_key_env"] = f"{OUTPUT_S3_ENV_PREFIX}AWS_SECRET_ACCESS_KEY"
    existing = job.config.get("publishing_config")
    if existing is None:
        return [target]
    if isinstance(existing, dict):
        return [existing, target]
    if isinstance(existing, list):
        return [*existing, target]
    raise SpecError("config.publishing_config", "give it inline (an object or a list) when spec.output.s3 is set")


def render_trainer_files(job: TrainingJobSpec, paths: MountPaths, *, resume: bool) -> TrainerFiles:
    """The trainer's config (user options + operator-owned options) and dataset list."""
    config: dict[str, Any] = dict(job.config)
    src = job.model.source
    config.update({
        "model_family": job.model.family,
        "model_type": job.model.type,
        "pretrained_model_name_or_path": pretrained_path(job, paths),
        "output_dir": paths.output_dir,
        "data_backend_config": paths.databackend_file,
        "logging_dir": paths.logging_dir,
        "num_processes": max(1, job.resources.gpus) * job.nodes,
        "metrics_port": job.metrics_port,
        "cache_dir": paths.data_cache_dir,
        "cache_dir_vae": posixpath.join(paths.data_cache_dir, "vae"),
        "cache_dir_text": posixpath.join(paths.data_cache_dir, "text"),
    })
    if job.model.flavour:
        config["model_flavour"] = job.model.flavour
    if src.kind == "hub" and src.revision:
        config["revision"] = src.revision
    if src.kind == "hub" and src.variant:
        config["variant"] = src.variant
    if job.output_s3 is not None:
        config["publishing_config"] = _publishing_targets(job)
    if resume:
        config["resume_from_checkpoint"] = "latest"
    return TrainerFiles(config_json=dict(sorted(config.items())), databackend_json=_databackend(job, paths))
