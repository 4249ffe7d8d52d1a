"""The per-job NetworkPolicy: built from the spec, valid upstream, selecting exactly the job's trainer
pods; created by the real operator (against kmock) before the trainer, owned by the TrainingJob."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest
from operator_helpers import NS, TJ, Cluster, create, eventually, make_trainingjob, pods

from kubetuner_operator.builders import (
    build_hook_job,
    build_indexed_job,
    build_network_policy,
    build_trainer_pod,
    resource_names,
)
from kubetuner_operator.builders.network_policy import (
    NETWORK_POLICY_ENV,
    NetworkPolicySettings,
    metrics_peers,
)
from kubetuner_operator.spec import parse_training_job

OPERATOR_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetuner-system"}},
                 "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetuner",
                                                 "app.kubernetes.io/instance": "kt"}}}
SCRAPER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
SETTINGS = NetworkPolicySettings((OPERATOR_PEER, SCRAPER))


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector as the API server evaluates it (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or ():
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {"In": present and value in expr.get("values", ()), "NotIn": value not in expr.get("values", ()),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def _pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"]["labels"] if obj["kind"] == "Pod" else obj["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("nodes", [1, 3])
def test_policy_selects_exactly_the_jobs_trainer_pods(nodes: int) -> None:
    job = parse_training_job(make_trainingjob(nodes=nodes))
    other = parse_training_job(make_trainingjob(name="other-job", nodes=nodes))
    policy = build_network_policy(job, SETTINGS)
    kubernetes_validate.validate(policy, kubernetes_validate.latest_version(), strict=True)
    build = build_trainer_pod if nodes == 1 else build_indexed_job
    own = [_pod_labels(build(job, attempt, resume=attempt > 0)) for attempt in (0, 4)]
    foreign = [_pod_labels(build(other, 0, resume=False)),
               *(_pod_labels(build_hook_job(job, hook, 10, "/x")) for hook in job.hooks)]
    spec = policy["spec"]
    for labels in own:
        assert selects(spec["podSelector"], labels)
    for labels in foreign:
        assert not selects(spec["podSelector"], labels)
    assert spec["policyTypes"] == ["Ingress"]  # egress stays open: S3, hubs, trackers
    peers_rule, metrics_rule = spec["ingress"]
    # From the job's own pods every port (the TCPStore and NCCL/gloo's run-time ports), from no one else.
    (peer,) = peers_rule["from"]
    assert set(peer) == {"podSelector"} and "ports" not in peers_rule
    assert all(selects(peer["podSelector"], labels) for labels in own)
    assert not any(selects(peer["podSelector"], labels) for labels in foreign)
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": job.metrics_port}]
    assert metrics_peers(policy) == [OPERATOR_PEER, SCRAPER]
    assert policy["metadata"]["name"] == resource_names(job)["network_policy"]


def test_without_metrics_peers_only_the_jobs_pods_get_in() -> None:
    policy = build_network_policy(parse_training_job(make_trainingjob()), NetworkPolicySettings())
    kubernetes_validate.validate(policy, "1.28", strict=True)
    assert len(policy["spec"]["ingress"]) == 1 and metrics_peers(policy) == ()


def test_settings_from_the_environment() -> None:
    assert NetworkPolicySettings.from_env({}) is None
    assert NetworkPolicySettings.from_env({NETWORK_POLICY_ENV: '{"metricsFrom": []}'}) == NetworkPolicySettings()
    for bad in ("not json", '{"metricsFrom": {}}', '[1]', '{"metricsFrom": ["x"]}'):
        with pytest.raises(ValueError, match=NETWORK_POLICY_ENV):
            NetworkPolicySettings.from_env({NETWORK_POLICY_ENV: bad})


POLICIES = "networking.k8s.io/v1/networkpolicies"


async def test_operator_creates_the_policy_before_the_trainer_once(cluster: Cluster) -> None:
    await cluster.start_operator(network_policy=SETTINGS)
    await create(cluster, make_trainingjob(nodes=2))
    name = "sdxl-style-trainers"
    await eventually(lambda: cluster.server.get("batch/v1/jobs", NS, "sdxl-style-t0"), "trainer Job t0")
    policy = cluster.server.get(POLICIES, NS, name)
    owner = cluster.server.get(TJ, NS, "sdxl-style")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert policy["spec"] == build_network_policy(parse_training_job(owner), SETTINGS)["spec"]
    order = [c[0] for c in cluster.server.created]
    assert order.index("networkpolicies") < order.index("jobs")  # fenced from the trainer's first moment

    # An operator restart re-plans the same: the policy is known (kopf's index), not created again.
    await cluster.stop_operator()
    await cluster.start_operator(network_policy=SETTINGS)
    await cluster.nudge("sdxl-style", times=2)
    assert [c for c in cluster.server.created if c[0] == "networkpolicies"] == [("networkpolicies", NS, name)]
    assert cluster.server.requests["create networkpolicies"] == 1

    # Owned: deleting the TrainingJob garbage-collects the policy.
    await cluster.client.delete("TrainingJob", NS, "sdxl-style")
    await eventually(lambda: cluster.server.get(POLICIES, NS, name) is None, "policy collected")


async def test_no_policy_when_the_operator_is_not_configured_for_them(cluster: Cluster) -> None:
    await cluster.start_operator()
    await create(cluster, make_trainingjob())
    await eventually(lambda: "sdxl-style-t0" in pods(cluster), "trainer pod t0")
    assert cluster.server.live(POLICIES) == [] and cluster.server.requests["list networkpolicies"] == 0
