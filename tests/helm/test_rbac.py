"""The chart grants exactly what the operator calls: verbs derived from the API client's call sites
(and kopf's watches and indexes) compared with the rendered Role/ClusterRole; plus the webhook and
the settings of the operator's per-job NetworkPolicies."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from test_chart import by_kind, render

from kubetuner_operator import handlers, reconcile
from kubetuner_operator.cache import owned_kinds
from kubetuner_operator.kube_api import CLUSTER_RESOURCES, RESOURCES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "kubetuner_operator"
METHOD_VERBS = {"get": "get", "list": "list", "create": "create", "patch": "patch", "delete": "delete",
                "get_cluster": "get", "patch_cluster": "patch"}
Grant = tuple[str, str, str]  # (apiGroup, resource, verb)


def _group_and_plural(kind: str) -> tuple[str, str]:
    if kind in CLUSTER_RESOURCES:
        parts = CLUSTER_RESOURCES[kind].split("/")
        return parts[2], parts[-1]
    prefix, plural = RESOURCES[kind]
    return ("" if prefix == "/api/v1" else prefix.split("/")[2]), plural


def _kind_literals(path: Path, pattern: str) -> set[str]:
    return {k for k in re.findall(pattern, path.read_text(encoding="utf-8")) if k in RESOURCES}


def _dynamic_kinds(method: str) -> set[str]:
    """Kinds reaching ``create(obj)`` / ``delete(kind, ...)`` through variables."""
    if method == "create":  # objects built by the builders, plus core Events
        kinds = set()
        for path in [*(PACKAGE / "builders").glob("*.py"), PACKAGE / "handlers.py"]:
            kinds |= _kind_literals(path, r'"kind":\s*"(\w+)"')
        return kinds
    # delete: the (kind, name) pairs the planner schedules: literal ones and trainers of every kind
    return _kind_literals(PACKAGE / "reconcile.py", r'\("(\w+)",') | set(reconcile.TRAINER_KINDS)


def used_by_the_client() -> set[Grant]:
    """Every (group, resource, verb) of a KubeApi call in the operator package."""
    grants: set[Grant] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "kube_api.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in METHOD_VERBS and ast.unparse(node.func.value).endswith("api")):
                continue
            method, first = node.func.attr, node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                kinds = {first.value}
            elif isinstance(first, ast.Name) and first.id == "KIND":
                kinds = {"TrainingJob"}
            else:
                kinds = _dynamic_kinds(method)
            subresource = next((k.value.value for k in node.keywords
                                if k.arg == "subresource" and isinstance(k.value, ast.Constant)), None)
            for kind in kinds:
                group, plural = _group_and_plural(kind)
                grants.add((group, f"{plural}/{subresource}" if subresource else plural, METHOD_VERBS[method]))
    return grants


def watched_by_kopf(*, network_policies: bool = True) -> set[Grant]:
    """kopf lists and watches the resources of every ``kopf.on.event`` handler and every index
    (the owned kinds of :mod:`kubetuner_operator.cache`; NetworkPolicies only when it creates them)."""
    source = (PACKAGE / "handlers.py").read_text(encoding="utf-8")
    grants: set[Grant] = set()
    module = vars(handlers)
    for args in re.findall(r"@kopf\.on\.event\(([^)]*)\)", source):
        positional = [a.strip() for a in re.split(r"\b\w+=", args)[0].split(",") if a.strip()]
        # string literals, or the names of module-level constants the handlers module imports
        literal = [p.strip('"') if p.startswith('"') else module[p] for p in positional]
        group, plural = ("", literal[1]) if literal[0] == "v1" else (literal[0], literal[2])
        grants |= {(group, plural, "list"), (group, plural, "watch")}
    for group, _version, plural in owned_kinds(network_policies=network_policies).values():
        grants |= {(group, plural, "list"), (group, plural, "watch")}
    return grants


def needed(*, network_policies: bool = True) -> set[Grant]:
    """What the operator calls, without the NetworkPolicy grants when the chart turns policies off."""
    grants = used_by_the_client() | watched_by_kopf(network_policies=network_policies)
    return grants if network_policies else {g for g in grants if g[1] != "networkpolicies"}


def granted(rules: list[dict[str, Any]]) -> set[Grant]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_derivation_finds_the_calls_it_must():
    used = used_by_the_client()
    assert ("kubetuner.dev", "trainingjobs/status", "patch") in used
    assert ("", "pods", "create") in used and ("batch", "jobs", "delete") in used
    assert ("", "events", "create") in used and ("", "persistentvolumeclaims", "list") in used
    assert ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch") in used
    assert ("kubetuner.dev", "trainingjobs", "watch") in watched_by_kopf()
    assert ("", "persistentvolumeclaims", "watch") in watched_by_kopf()  # kopf's index of owned children
    assert not any(resource == "configmaps" for _, resource, _ in used | watched_by_kopf())  # files ride on the pod
    assert ("jobset.x-k8s.io", "jobsets", "watch") in watched_by_kopf()
    assert {("jobset.x-k8s.io", "jobsets", verb) for verb in ("create", "delete", "list")} <= used
    assert ("networking.k8s.io", "networkpolicies", "create") in used
    assert ("networking.k8s.io", "networkpolicies", "watch") not in watched_by_kopf(network_policies=False)


WEBHOOK = {("admissionregistration.k8s.io", "validatingwebhookconfigurations", verb) for verb in ("get", "patch")}


@pytest.mark.parametrize("network_policies", [True, False])
def test_cluster_role_grants_exactly_what_the_code_calls(network_policies):
    (role,) = by_kind(render({"networkPolicy": {"enabled": network_policies}}), "ClusterRole")
    assert granted(role["rules"]) == needed(network_policies=network_policies)
    webhook_rules = [r for r in role["rules"] if "validatingwebhookconfigurations" in r["resources"]]
    assert [r["resourceNames"] for r in webhook_rules] == [["kt-kubetuner-webhook"]]


def test_namespaced_roles_grant_exactly_the_namespaced_calls():
    manifests = render({"watchNamespaces": ["team-a", "team-b"]})
    for role in by_kind(manifests, "Role"):
        assert granted(role["rules"]) == needed() - WEBHOOK
    (cluster_role,) = by_kind(manifests, "ClusterRole")
    assert granted(cluster_role["rules"]) == WEBHOOK


def test_no_cluster_role_without_a_need_for_one():
    manifests = render({"watchNamespaces": ["team-a"], "webhook": {"tls": "certManager"}})
    assert by_kind(manifests, "ClusterRole") == [] and by_kind(manifests, "ClusterRoleBinding") == []


@pytest.mark.parametrize("tls", ["selfSigned", "certManager"])
def test_webhook_is_wired_to_the_operator(tls):
    manifests = render({"webhook": {"tls": tls, "failurePolicy": "Ignore"}, "watchNamespaces": ["team-a"]})
    (config,) = by_kind(manifests, "ValidatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    service = next(s for s in by_kind(manifests, "Service") if s["metadata"]["name"] == "kt-kubetuner-webhook")
    deployment = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    assert hook["failurePolicy"] == "Ignore" and "--webhook-failure-policy=Ignore" in container["args"]
    assert hook["clientConfig"]["service"] == {"name": service["metadata"]["name"], "namespace": "kubetuner-system",
                                               "path": "/validate.trainingjobs.kubetuner.dev", "port": 443}
    from kubetuner_operator.webhook import WEBHOOK_ID

    assert hook["clientConfig"]["service"]["path"] == f"/{WEBHOOK_ID}"
    assert hook["rules"][0]["resources"] == ["trainingjobs"]  # not trainingjobs/status
    assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
    target = service["spec"]["ports"][0]["targetPort"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[target] == 9443
    assert "--webhook-port=9443" in container["args"]
    assert "--webhook-host=kt-kubetuner-webhook.kubetuner-system.svc" in container["args"]
    if tls == "certManager":
        (certificate,) = by_kind(manifests, "Certificate")
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"kubetuner-system/{certificate['metadata']['name']}"
        assert "--webhook-cert-dir=/certs" in container["args"]
        volume = next(v for v in deployment["volumes"] if v["name"] == "webhook-tls")
        assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    else:
        assert by_kind(manifests, "Certificate") == []
        assert f"--webhook-configuration={config['metadata']['name']}" in container["args"]


def test_webhook_can_be_turned_off():
    manifests = render({"webhook": {"enabled": False}})
    assert by_kind(manifests, "ValidatingWebhookConfiguration") == []
    container = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--webhook") for a in container["args"])


def test_tenancy_values_reach_the_operator():
    manifests = render({"tenancy": {"allowedImages": ["ghcr.io/kubetuner/", "registry.internal/"],
                                    "allowedServiceAccounts": ["trainer"]}})
    env = {e["name"]: e.get("value") for e in
           by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    from kubetuner_operator.admission import TenancyPolicy

    assert TenancyPolicy.from_env(env) == TenancyPolicy(("ghcr.io/kubetuner/", "registry.internal/"), ("trainer",))


def _operator_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    container = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_network_policy_settings_reach_the_operator():
    """The operator's own pods (by namespace and labels) and the configured scrapers may reach the
    trainers' metrics port; the chart renders no namespace-wide policy (policies add up)."""
    from kubetuner_operator.builders.network_policy import NetworkPolicySettings

    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
               "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    manifests = render({"watchNamespaces": ["team-a"], "networkPolicy": {"metricsFrom": [scraper]}}, namespace="ops")
    assert by_kind(manifests, "NetworkPolicy") == []
    settings = NetworkPolicySettings.from_env(_operator_env(manifests))
    assert settings is not None
    operator, *rest = settings.metrics_from
    assert rest == [scraper]
    pod_labels = by_kind(manifests, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert operator["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}
    assert operator["podSelector"]["matchLabels"] and operator["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert NetworkPolicySettings.from_env(_operator_env(render({"networkPolicy": {"enabled": False}}))) is None
