"""The per-job NetworkPolicy: a trainer pod accepts connections only from its own job's pods,
plus its metrics port from the peers the operator is configured with (itself, Prometheus).

Multi-node training opens an unauthenticated torch TCPStore (the rendezvous) and NCCL/gloo
connections on ports the libraries pick at run time, so between the pods of one job every port
is open; nothing else reaches them except ``metricsPort`` (``/status`` for the operator,
``/metrics`` for scrapers). Egress is left alone: the issue asks to fence the rendezvous, and
trainers need S3, model hubs and trackers. NetworkPolicies add up (a pod is reachable when any
policy selecting it allows it), so the chart ships no namespace-wide policy next to these.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..spec import TrainingJobSpec
from .common import LABEL_COMPONENT, LABEL_JOB, metadata, resource_names

NETWORK_POLICY_ENV = "KUBETUNER_NETWORK_POLICY"


@dataclass(frozen=True)
class NetworkPolicySettings:
    """What the operator puts into every job's NetworkPolicy (chart value ``networkPolicy``).

    ``metrics_from``: NetworkPolicyPeers (``podSelector``/``namespaceSelector``/``ipBlock`` dicts)
    allowed to connect to the trainer's metrics port; the chart puts the operator's own pods first.
    """

    metrics_from: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> NetworkPolicySettings | None:
        """From ``KUBETUNER_NETWORK_POLICY`` (JSON ``{"metricsFrom": [peer, ...]}``); None when unset (no policies).

        Raises ValueError naming the variable when its value is not such a document.
        """
        raw = environ.get(NETWORK_POLICY_ENV, "").strip()
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{NETWORK_POLICY_ENV} is not JSON: {exc}") from None
        peers = doc.get("metricsFrom") if isinstance(doc, dict) else None
        if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
            raise ValueError(f'{NETWORK_POLICY_ENV} must be {{"metricsFrom": [NetworkPolicyPeer, ...]}}, got {raw!r}')
        return cls(tuple(peers))


def trainer_selector(job: TrainingJobSpec) -> dict[str, Any]:
    """Every trainer pod of ``job`` (all attempts, all nodes) and nothing else in the namespace."""
    return {"matchLabels": {"app.kubernetes.io/name": "kubetuner", LABEL_JOB: job.name, LABEL_COMPONENT: "trainer"}}


def build_network_policy(job: TrainingJobSpec, settings: NetworkPolicySettings) -> dict[str, Any]:
    """The NetworkPolicy fencing ``job``'s trainer pods (owned by the TrainingJob)."""
    own_pods = trainer_selector(job)
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": own_pods}]}]  # rendezvous + collectives, any port
    if settings.metrics_from:
        ingress.append({"from": [copy.deepcopy(dict(p)) for p in settings.metrics_from],
                        "ports": [{"protocol": "TCP", "port": job.metrics_port}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(job, resource_names(job)["network_policy"], "network-policy"),
        "spec": {"podSelector": own_pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def metrics_peers(policy: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The peers a built policy admits on the metrics port (for tests and docs)."""
    rules = policy["spec"]["ingress"]
    return rules[1]["from"] if len(rules) > 1 else ()
