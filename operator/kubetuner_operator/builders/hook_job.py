"""One Job per (checkpoint step, post-checkpoint hook).

The name is a pure function of (job, hook, step), so creating it twice (operator restart,
retried reconcile) hits "already exists" instead of launching a duplicate. The command is argv
with placeholders substituted per argument; it never passes through a shell.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from kubetuner_trainer.placeholders import placeholder_values as shared_placeholder_values
from kubetuner_trainer.placeholders import substitute_argv

from ..spec import HookSpec, TrainingJobSpec
from ..trainer_config import POD_PATHS, MountPaths
from .common import (
    LABEL_CHECKPOINT_STEP,
    LABEL_HOOK,
    container_security_context,
    dns_name,
    metadata,
    pod_security_context,
)
from .volumes import VOLUME_OUTPUT, output_volume

HOOK_TTL_SECONDS = 86400


def hook_job_name(job_name: str, hook: str, step: int) -> str:
    digest = hashlib.sha256(f"{job_name}\0{hook}\0{step}".encode()).hexdigest()[:8]
    return f"{dns_name(job_name, hook, str(step), limit=54)}-{digest}"


def placeholder_values(job: TrainingJobSpec, step: int, checkpoint_path: str,
                       paths: MountPaths = POD_PATHS) -> dict[str, Any]:
    """The trainer's placeholders (one table, :mod:`kubetuner_trainer.placeholders`) filled for one
    checkpoint, plus where the hook runs: ``output_dir``, ``job_name`` and ``namespace``."""
    options = {**job.config, "model_family": job.model.family, "model_type": job.model.type}
    values = shared_placeholder_values(options, global_step=step, local_checkpoint_path=checkpoint_path)
    values.update(output_dir=paths.output_dir, job_name=job.name, namespace=job.namespace)
    return values


def default_checkpoint_path(step: int, paths: MountPaths = POD_PATHS) -> str:
    return f"{paths.output_dir}/checkpoint-{step}"


def build_hook_job(job: TrainingJobSpec, hook: HookSpec, step: int, checkpoint_path: str,
                   paths: MountPaths = POD_PATHS) -> dict[str, Any]:
    """The Job running ``hook`` for the checkpoint at ``step`` (output mounted read-only)."""
    argv = substitute_argv(list(hook.command), placeholder_values(job, step, checkpoint_path, paths))
    env = [{"name": "KUBETUNER_JOB", "value": job.name},
           {"name": "KUBETUNER_CHECKPOINT_STEP", "value": str(step)},
           {"name": "KUBETUNER_CHECKPOINT_PATH", "value": checkpoint_path},
           {"name": "HOME", "value": "/tmp"},
           *[dict(e) for e in hook.env]]
    container: dict[str, Any] = {
        "name": "hook",
        "image": hook.image,
        "command": argv,
        "env": env,
        "volumeMounts": [{"name": VOLUME_OUTPUT, "mountPath": paths.output_dir, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security_context(),
    }
    if hook.image_pull_policy:
        container["imagePullPolicy"] = hook.image_pull_policy
    if hook.resources:
        container["resources"] = _plain(hook.resources)
    extra = {LABEL_HOOK: dns_name(hook.name), LABEL_CHECKPOINT_STEP: str(step)}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [output_volume(job, read_only=True), {"name": "tmp", "emptyDir": {}}],
    }
    tpl = job.pod_template
    if tpl.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [dict(s) for s in tpl.image_pull_secrets]
    if tpl.node_selector:
        pod_spec["nodeSelector"] = dict(tpl.node_selector)
    if tpl.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tpl.tolerations]
    meta = metadata(job, hook_job_name(job.name, hook.name, step), "hook", extra_labels=extra,
                    annotations={"kubetuner.dev/hook-name": hook.name})
    spec: dict[str, Any] = {
        "backoffLimit": hook.backoff_limit,
        "ttlSecondsAfterFinished": HOOK_TTL_SECONDS,
        "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": pod_spec},
    }
    if hook.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = int(hook.active_deadline_seconds)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
