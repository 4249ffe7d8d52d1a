"""Multi-node training: an Indexed Job (one pod per node) and a headless Service for rendezvous.

Each pod gets a stable hostname ``<job>-<index>.<service>``; node 0 is the rendezvous master.
Every pod runs ``kubetuner-train``, which starts the node's local ranks itself (see
:func:`rendezvous_env`), so a pod's exit code keeps the trainer contract (0 / 75 / 78).
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


def rendezvous_env(job: TrainingJobSpec, master: str) -> list[dict[str, Any]]:
    """Where and how the nodes meet (``master``: node 0's DNS name); ``NODE_RANK`` comes from the pod's
    completion index.

    ``kubetuner-train`` runs directly in every pod (no torchrun, whose exit code 1 would hide the
    trainer's "interrupted"/"config error" codes): it starts ``NPROC_PER_NODE`` local workers as
    global ranks ``NODE_RANK * NPROC_PER_NODE + local rank`` of ``NUM_NODES * NPROC_PER_NODE``
    (the rendered ``num_processes``) and gives the pod one exit code by the trainer contract.
    """
    return [
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "NUM_NODES", "value": str(job.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(processes_per_node(job))},
        {"name": "NODE_RANK", "valueFrom": _completion_index()},
    ]


def processes_per_node(job: TrainingJobSpec) -> int:
    """One trainer process per GPU of a node (one on a CPU-only node)."""
    return max(1, job.resources.gpus)


def build_indexed_job(job: TrainingJobSpec, attempt: int, *, resume: bool) -> dict[str, Any]:
    name = trainer_name(job, attempt)
    master = f"{name}-0.{resource_names(job)['service']}"  # Indexed Job pod hostnames: <job>-<index>
    pod_spec = trainer_pod_spec(job, resume=resume, extra_env=rendezvous_env(job, master))
    pod_spec["subdomain"] = resource_names(job)["service"]
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
