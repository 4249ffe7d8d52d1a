"""PersistentVolumeClaims for the caches and the output, and the pod volumes that use them.

Ownership: claims the operator creates (``size`` given, no ``existingClaim``) are named after the
job and owned by it, so deleting the TrainingJob deletes them. A cache meant to be shared between
jobs (typically the model-weights cache, ReadWriteMany) is created by the user and referenced with
``existingClaim``; the operator mounts it but never owns, modifies or deletes it.
Without a ``caches.*`` entry the cache is an emptyDir (lost with the pod).
"""

from __future__ import annotations

from typing import Any

from ..spec import TrainingJobSpec, VolumeSpec
from .common import metadata, resource_names

VOLUME_OUTPUT = "output"
VOLUME_MODELS = "model-cache"
VOLUME_LATENTS = "data-cache"


def _pvc(job: TrainingJobSpec, name: str, component: str, vol: VolumeSpec) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": list(vol.access_modes),
                            "resources": {"requests": {"storage": vol.size}}}
    if vol.storage_class_name:
        spec["storageClassName"] = vol.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(job, name, component), "spec": spec}


def build_pvcs(job: TrainingJobSpec) -> list[dict[str, Any]]:
    """The claims this job needs created (never one for an existingClaim)."""
    names = resource_names(job)
    wanted = [("output", "output", job.output_pvc), ("models", "model-cache", job.model_cache),
              ("latents", "data-cache", job.data_cache)]
    return [_pvc(job, names[key], component, vol) for key, component, vol in wanted
            if vol is not None and vol.creates_claim]


def claim_name(job: TrainingJobSpec, key: str) -> str | None:
    """The claim backing ``output``/``models``/``latents``; None for an emptyDir."""
    vol = {"output": job.output_pvc, "models": job.model_cache, "latents": job.data_cache}[key]
    if vol is None:
        return None
    return vol.existing_claim or resource_names(job)[key]


def _volume(name: str, claim: str | None, *, read_only: bool = False) -> dict[str, Any]:
    if claim is None:
        return {"name": name, "emptyDir": {}}
    source: dict[str, Any] = {"claimName": claim}
    if read_only:
        source["readOnly"] = True
    return {"name": name, "persistentVolumeClaim": source}


def cache_and_output_volumes(job: TrainingJobSpec) -> list[dict[str, Any]]:
    return [
        _volume(VOLUME_OUTPUT, claim_name(job, "output")),
        _volume(VOLUME_MODELS, claim_name(job, "models")),
        _volume(VOLUME_LATENTS, claim_name(job, "latents")),
    ]


def output_volume(job: TrainingJobSpec, *, read_only: bool) -> dict[str, Any]:
    return _volume(VOLUME_OUTPUT, claim_name(job, "output"), read_only=read_only)
