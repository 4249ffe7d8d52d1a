"""Multi-node training as a JobSet (``jobset.x-k8s.io``), where that API is installed.

One JobSet per attempt, holding one replicated Job (``node``, one replica) that is the same
Indexed Job as without JobSet: one pod per node, ``backoffLimit: 0``. JobSet adds what we build by
hand otherwise: the headless Service and pod hostnames (``network.enableDNSHostnames``; the
subdomain defaults to the JobSet's name, so every attempt has its own), and it is the unit Kueue
admits natively. ``failurePolicy.maxRestarts: 0``: the operator, not JobSet, restarts the group,
because only the operator reads the trainer's exit codes (75 resume, 78 config error, never
retried), counts restarts against ``runPolicy.backoffLimit`` and adds ``--resume_from_checkpoint``.

Names follow JobSet's rules (its admission webhook): Job ``<jobset>-<replicatedJob>-<jobIndex>``
and pod ``<job>-<podIndex>-<5 random>`` must be DNS-1035 labels (at most 63 characters, starting
with a letter), hence a shorter name than the Indexed Job's.
"""

from __future__ import annotations

from typing import Any

from ..spec import TrainingJobSpec
from .common import LABEL_ATTEMPT, LABEL_QUEUE, NAME_LIMIT, dns_name, metadata
from .multinode import rendezvous_env
from .trainer_pod import pod_annotations, pod_labels, trainer_pod_spec

JOBSET_GROUP, JOBSET_VERSION, JOBSET_PLURAL = "jobset.x-k8s.io", "v1alpha2", "jobsets"
JOBSET_API_VERSION = f"{JOBSET_GROUP}/{JOBSET_VERSION}"
REPLICATED_JOB = "node"
# The longest pod name JobSet derives: "<jobset>-node-0-<pod index>-<5 random>" (indexes below 1000).
JOBSET_NAME_LIMIT = NAME_LIMIT - len(f"-{REPLICATED_JOB}-0-999-abcde")


def jobset_name(job: TrainingJobSpec, attempt: int) -> str:
    """The JobSet of one attempt: a DNS-1035 label short enough for every name JobSet derives from it."""
    name = dns_name(job.name, f"t{attempt}", limit=JOBSET_NAME_LIMIT)
    return name if name[0].isalpha() else dns_name("tj", job.name, f"t{attempt}", limit=JOBSET_NAME_LIMIT)


def node_hostname(name: str, index: int) -> str:
    """DNS name of node ``index`` of JobSet ``name``: ``<job>-<index>.<subdomain>`` (subdomain = JobSet name)."""
    return f"{name}-{REPLICATED_JOB}-0-{index}.{name}"


def build_jobset(job: TrainingJobSpec, attempt: int, *, resume: bool) -> dict[str, Any]:
    """The JobSet running attempt ``attempt`` of a multi-node job (suspended for Kueue when queued)."""
    name = jobset_name(job, attempt)
    pod_spec = trainer_pod_spec(job, resume=resume, extra_env=rendezvous_env(job, node_hostname(name, 0)))
    pod_spec["subdomain"] = name
    extra = {LABEL_ATTEMPT: str(attempt)}
    if job.queue_name:
        extra[LABEL_QUEUE] = job.queue_name
    node_job = {
        "completionMode": "Indexed",
        "completions": job.nodes,
        "parallelism": job.nodes,
        "backoffLimit": 0,  # one failed node fails the Job, which stops its other pods at once
        "template": {"metadata": {"labels": pod_labels(job, attempt), "annotations": pod_annotations(job)},
                     "spec": pod_spec},
    }
    spec: dict[str, Any] = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},  # rendezvous before readiness
        "failurePolicy": {"maxRestarts": 0},
        "successPolicy": {"operator": "All"},
        "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": node_job}}],
    }
    if job.queue_name:
        spec["suspend"] = True  # Kueue admits the JobSet by unsuspending it; the operator never does
    return {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet",
            "metadata": metadata(job, name, "trainer", extra_labels=extra), "spec": spec}
