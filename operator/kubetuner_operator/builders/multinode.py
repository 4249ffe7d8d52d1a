"""Multi-node training: an Indexed Job (one pod per node) and a headless Service for rendezvous.

Each pod gets a stable hostname ``<job>-<index>.<service>``; node 0 is the rendezvous master.
``backoffLimit: 0`` (no podFailurePolicy needed): any failed node fails the whole attempt at once,
and the operator reads the pods' exit codes / disruption conditions to decide whether to resume.
"""

from __future__ import annotations

from typing import Any

from ..spec import TrainingJobSpec
from .common import LABEL_ATTEMPT, LABEL_QUEUE, labels, metadata, resource_names, trainer_name
from .trainer_pod import pod_annotations, pod_labels, trainer_pod_spec

RENDEZVOUS_PORT = 29500
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def build_headless_service(job: TrainingJobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(job, resource_names(job)["service"], "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before readiness
            "selector": labels(job, "trainer"),
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _completion_index() -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}


def rendezvous_env(job: TrainingJobSpec, attempt: int) -> list[dict[str, Any]]:
    """Rendezvous variables; NODE_RANK comes from the pod's completion index.

    One GPU (or none) per node: each pod is one rank, so the trainer gets the torch.distributed
    variables directly (RANK, WORLD_SIZE, ...) and runs as that rank, keeping its exit codes.
    Several GPUs per node: ``torchrun`` starts the local ranks (see :func:`torchrun_argv`).
    """
    per_node = max(1, job.resources.gpus)
    master = f"{trainer_name(job, attempt)}-0.{resource_names(job)['service']}"
    env: list[dict[str, Any]] = [
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "NUM_NODES", "value": str(job.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(per_node)},
        {"name": "NODE_RANK", "valueFrom": _completion_index()},
    ]
    if per_node == 1:
        env += [{"name": "RANK", "valueFrom": _completion_index()},
                {"name": "LOCAL_RANK", "value": "0"},
                {"name": "WORLD_SIZE", "value": str(job.nodes)},
                {"name": "LOCAL_WORLD_SIZE", "value": "1"}]
    return env


def torchrun_argv(job: TrainingJobSpec, trainer_args: list[str]) -> tuple[list[str], list[str]]:
    """(command, args) starting one trainer process per GPU of this node under torchrun.

    torchrun reports any failed worker as exit code 1, so with several GPUs per node the
    trainer's "interrupted" (75) and "config error" (78) codes arrive as crashes: retried with
    resume within ``backoffLimit``.
    """
    return ["torchrun"], [
        "--nnodes", str(job.nodes), "--nproc-per-node", str(max(1, job.resources.gpus)),
        "--node-rank", "$(NODE_RANK)", "--master-addr", "$(MASTER_ADDR)", "--master-port", "$(MASTER_PORT)",
        "--max-restarts", "0", "-m", "kubetuner_trainer.cli", *trainer_args]


def build_indexed_job(job: TrainingJobSpec, attempt: int, *, resume: bool) -> dict[str, Any]:
    name = trainer_name(job, attempt)
    pod_spec = trainer_pod_spec(job, resume=resume, extra_env=rendezvous_env(job, attempt))
    pod_spec["subdomain"] = resource_names(job)["service"]
    if job.resources.gpus > 1:
        container = pod_spec["containers"][0]
        container["command"], container["args"] = torchrun_argv(job, container["args"])
    extra = {LABEL_ATTEMPT: str(attempt)}
    if job.queue_name:
        extra[LABEL_QUEUE] = job.queue_name
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": job.nodes,
        "parallelism": job.nodes,
        "backoffLimit": 0,
        "template": {"metadata": {"labels": pod_labels(job, attempt), "annotations": pod_annotations(job)},
                     "spec": pod_spec},
    }
    if job.queue_name:
        # Kueue admits a queued Job by unsuspending it; the operator never unsuspends it itself.
        spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": metadata(job, name, "trainer", extra_labels=extra), "spec": spec}
