"""Shared pieces of every child object: names, labels, owner references, security contexts."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from ..spec import API_VERSION, KIND, TrainingJobSpec

LABEL_JOB = "kubetuner.dev/job"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_ATTEMPT = "kubetuner.dev/attempt"
LABEL_HOOK = "kubetuner.dev/hook"
LABEL_CHECKPOINT_STEP = "kubetuner.dev/checkpoint-step"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "kubetuner-operator"
TRAINER_CONTAINER = "trainer"
NAME_LIMIT = 63


def dns_name(*parts: str, limit: int = NAME_LIMIT) -> str:
    """Join parts into a DNS-1123 label; too long names are cut and get a stable hash suffix."""
    name = re.sub(r"[^a-z0-9-]", "-", "-".join(p for p in parts if p).lower()).strip("-")
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def labels(job: TrainingJobSpec, component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetuner",
        "app.kubernetes.io/instance": job.name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job.name,
        **extra,
    }


def owner_reference(job: TrainingJobSpec) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(job: TrainingJobSpec, name: str, component: str, *, owned: bool = True,
             extra_labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": job.namespace,
                            "labels": labels(job, component, **(extra_labels or {}))}
    if annotations:
        meta["annotations"] = dict(annotations)
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def pod_security_context() -> dict[str, Any]:
    """Pod-level settings of the 'restricted' Pod Security Standard."""
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(*, read_only_root: bool = True) -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "readOnlyRootFilesystem": read_only_root, "seccompProfile": {"type": "RuntimeDefault"}}


def resource_names(job: TrainingJobSpec) -> dict[str, str]:
    """Deterministic names of the per-job children (hook Jobs are named in hook_job)."""
    return {
        "output": dns_name(job.name, "output"),
        "models": dns_name(job.name, "models"),
        "latents": dns_name(job.name, "latents"),
        "service": dns_name(job.name, "nodes"),
        "network_policy": dns_name(job.name, "trainers"),
    }


def trainer_name(job: TrainingJobSpec, attempt: int) -> str:
    """The trainer pod (single node) or Indexed Job (multi-node) of one attempt.

    Short enough that Indexed Job pod hostnames (``<name>-<index>``) stay valid labels.
    """
    return dns_name(job.name, f"t{attempt}", limit=52)
