"""The trainer Pod (single node) and the pod spec shared with the multi-node Indexed Job.

``restartPolicy: Never``: the operator decides about retries (resume after preemption, no retry
after a configuration error), so the kubelet must not restart the container behind its back.
"""

from __future__ import annotations

from typing import Any

from kubetuner_trainer.termination import DEFAULT_TERMINATION_LOG, TERMINATION_LOG_ENV

from ..spec import S3CredentialsSecret, TrainingJobSpec
from ..trainer_config import OUTPUT_S3_ENV_PREFIX, POD_PATHS, MountPaths
from .common import (
    LABEL_ATTEMPT,
    LABEL_QUEUE,
    TRAINER_CONTAINER,
    container_security_context,
    labels,
    metadata,
    owner_reference,
    pod_security_context,
    trainer_name,
)
from .model_fetch import model_fetch_init_container
from .trainer_files import CONFIG_VOLUME, config_volume, trainer_files_annotations
from .volumes import VOLUME_LATENTS, VOLUME_MODELS, VOLUME_OUTPUT, cache_and_output_volumes

TRAINER_COMMAND = ["kubetuner-train"]
STOP_GRACE_MARGIN_SECONDS = 30
RESUME_ARGS = ["--resume_from_checkpoint", "latest"]


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _s3_env(prefix: str, cred: S3CredentialsSecret) -> list[dict[str, Any]]:
    return [_secret_env(f"{prefix}AWS_ACCESS_KEY_ID", cred.name, cred.access_key_id_key),
            _secret_env(f"{prefix}AWS_SECRET_ACCESS_KEY", cred.name, cred.secret_access_key_key)]


def termination_grace_seconds(job: TrainingJobSpec) -> int:
    """Longer than the trainer's own SIGTERM budget (``stop_grace_seconds``), so its checkpoint lands."""
    from kubetuner_trainer.options import get_registry

    budget = job.config.get("stop_grace_seconds", get_registry().get("stop_grace_seconds").default)
    return int(float(budget)) + STOP_GRACE_MARGIN_SECONDS


def trainer_env(job: TrainingJobSpec, paths: MountPaths = POD_PATHS) -> list[dict[str, Any]]:
    """Plain settings plus Secret references; never a secret value."""
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": paths.model_cache_dir},
        {"name": "SIMPLETUNER_JOB_ID", "value": f"{job.namespace}/{job.name}"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The trainer writes its final status there; the operator reads it from the pod's status.
        {"name": TERMINATION_LOG_ENV, "value": DEFAULT_TERMINATION_LOG},
    ]
    if job.hf_token:
        env.append(_secret_env("HF_TOKEN", job.hf_token.name, job.hf_token.key))
    for ds in job.datasets:
        if ds.credentials:
            env += _s3_env(ds.env_prefix, ds.credentials)
    if job.output_s3 and job.output_s3.credentials:
        # The bucket, prefix and endpoint travel in publishing_config (trainer_config.py);
        # the keys only as Secret references, named there by OUTPUT_S3_ENV_PREFIX.
        env += _s3_env(OUTPUT_S3_ENV_PREFIX, job.output_s3.credentials)
    env += [_secret_env(str(e["name"]), str(e["secretKeyRef"]["name"]), str(e["secretKeyRef"]["key"]))
            for e in job.secret_env]
    return env


def _mounts(job: TrainingJobSpec, paths: MountPaths) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) of the trainer container."""
    volumes = [config_volume(),
               *cache_and_output_volumes(job),
               {"name": "tmp", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.resources.shared_memory}}]
    mounts = [{"name": CONFIG_VOLUME, "mountPath": paths.config_dir, "readOnly": True},
              {"name": VOLUME_OUTPUT, "mountPath": paths.output_dir},
              {"name": VOLUME_MODELS, "mountPath": paths.model_cache_dir},
              {"name": VOLUME_LATENTS, "mountPath": paths.data_cache_dir},
              {"name": "tmp", "mountPath": "/tmp"},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    src = job.model.source
    if src.kind == "pvc":
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": src.pvc_claim, "readOnly": True}})
        mount = {"name": "model", "mountPath": paths.model_dir, "readOnly": True}
        if src.pvc_path:
            mount["subPath"] = src.pvc_path
        mounts.append(mount)
    for i, ds in enumerate(job.datasets):
        if ds.pvc is None:
            continue
        volumes.append({"name": f"dataset-{i}",
                        "persistentVolumeClaim": {"claimName": ds.pvc.claim_name, "readOnly": True}})
        mount = {"name": f"dataset-{i}", "mountPath": paths.dataset_dir(ds), "readOnly": True}
        if ds.pvc.path:
            mount["subPath"] = ds.pvc.path
        mounts.append(mount)
    return volumes, mounts


def _resources(job: TrainingJobSpec) -> dict[str, Any]:
    res = job.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus > 0:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pod_labels(job: TrainingJobSpec, attempt: int) -> dict[str, str]:
    extra = {LABEL_ATTEMPT: str(attempt)}
    if job.queue_name:
        extra[LABEL_QUEUE] = job.queue_name
    # Our labels win: selectors and the operator's watches depend on them.
    return {**job.pod_template.labels, **labels(job, "trainer", **extra)}


def pod_annotations(job: TrainingJobSpec) -> dict[str, str]:
    """The user's annotations, Prometheus scraping hints and the trainer's files (see trainer_files)."""
    return {**job.pod_template.annotations, "prometheus.io/scrape": "true",
            "prometheus.io/port": str(job.metrics_port), "prometheus.io/path": "/metrics",
            **trainer_files_annotations(job)}


def trainer_pod_spec(job: TrainingJobSpec, *, resume: bool, extra_env: list[dict[str, Any]] | None = None,
                     paths: MountPaths = POD_PATHS) -> dict[str, Any]:
    """The pod spec of a trainer (one node, or each node of a multi-node job)."""
    volumes, mounts = _mounts(job, paths)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": job.image,
        "imagePullPolicy": job.image_pull_policy,
        "command": list(TRAINER_COMMAND),
        "args": ["--config", paths.config_file, *(RESUME_ARGS if resume else [])],
        "env": trainer_env(job, paths) + list(extra_env or []),
        "ports": [{"name": "metrics", "containerPort": job.metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        # The final status document (kubetuner_trainer.termination), not the logs: those are no JSON.
        "terminationMessagePath": DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "File",
    }
    resources = _resources(job)
    if resources:
        container["resources"] = resources
    tpl = job.pod_template
    tolerations = list(tpl.tolerations)
    if job.resources.gpus > 0:
        tolerations.append({"key": job.resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": termination_grace_seconds(job),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    init = model_fetch_init_container(job, [m for m in mounts if m["name"] == VOLUME_MODELS] +
                                      [{"name": "tmp", "mountPath": "/tmp"}], paths)
    if init:
        spec["initContainers"] = [init]
    if tolerations:
        spec["tolerations"] = tolerations
    if tpl.node_selector:
        spec["nodeSelector"] = dict(tpl.node_selector)
    if tpl.affinity:
        spec["affinity"] = dict(tpl.affinity)
    if tpl.priority_class_name:
        spec["priorityClassName"] = tpl.priority_class_name
    if tpl.service_account_name:
        spec["serviceAccountName"] = tpl.service_account_name
    if tpl.image_pull_secrets:
        spec["imagePullSecrets"] = [dict(s) for s in tpl.image_pull_secrets]
    return spec


def build_trainer_pod(job: TrainingJobSpec, attempt: int, *, resume: bool) -> dict[str, Any]:
    """The single-node trainer Pod of one attempt (attempt > 0 usually resumes)."""
    meta = metadata(job, trainer_name(job, attempt), "trainer", annotations=pod_annotations(job))
    meta["labels"] = pod_labels(job, attempt)
    meta["ownerReferences"] = [owner_reference(job)]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": trainer_pod_spec(job, resume=resume)}
