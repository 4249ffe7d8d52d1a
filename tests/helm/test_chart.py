"""The operator's Helm chart: lints, renders, every manifest is valid, the pod is restricted-PSS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetuner"
NEWEST = kv_utils.latest_version()
MONITORING = "monitoring.coreos.com/v1"
NAMESPACED_VARIANT = {
    "watchNamespaces": ["team-a", "team-b"],
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True}},
}


def render(values: dict[str, Any] | None = None, namespace: str = "kubetuner-system") -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name="kt", namespace=namespace, is_install=True)
    manifests = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


@pytest.mark.parametrize("values", [None, NAMESPACED_VARIANT], ids=["defaults", "namespaced-monitoring"])
@pytest.mark.parametrize("kube_version", ["v1.28.0", f"v{NEWEST}"])
def test_chart_lints_clean(values, kube_version):
    report = helm.lint(CHART, values, strict=True, kube_version=kube_version, namespace="kubetuner-system")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [None, NAMESPACED_VARIANT], ids=["defaults", "namespaced-monitoring"])
@pytest.mark.parametrize("version", ["1.28", NEWEST])
def test_rendered_manifests_validate_strictly(values, version):
    manifests = render(values)
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= kinds
    for manifest in manifests:
        if manifest["apiVersion"] == MONITORING:
            continue  # not a built-in kind; checked against the Service below
        assert kubernetes_validate.validate(manifest, version, strict=True)


def test_strict_validation_notices_a_broken_manifest():
    deployment = by_kind(render(), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28", strict=True)


def _crd(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return by_kind(manifests, "CustomResourceDefinition")


def test_chart_ships_the_generated_crd_from_templates_kept_on_uninstall():
    generated_text = (ROOT / "crds" / "trainingjobs.kubetuner.dev.yaml").read_text(encoding="utf-8")
    assert (CHART / "files" / "trainingjobs.kubetuner.dev.yaml").read_text(encoding="utf-8") == generated_text, (
        "helm/kubetuner/files/ is out of date: cp crds/trainingjobs.kubetuner.dev.yaml helm/kubetuner/files/")
    with helm.Chart.load(CHART) as chart:
        assert chart.crds == []  # crds/ is installed once and never upgraded by Helm
    (crd,) = _crd(render())
    generated = yaml.safe_load(generated_text)
    annotations = crd["metadata"].pop("annotations")
    assert annotations == {**generated["metadata"]["annotations"], "helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"].items() >= generated["metadata"]["labels"].items()
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert crd["spec"] == generated["spec"]  # the template's YAML round trip changes nothing


def test_crd_install_and_keep_are_switches():
    assert _crd(render({"crds": {"install": False}})) == []
    (crd,) = _crd(render({"crds": {"keep": False}}))
    assert "helm.sh/resource-policy" not in crd["metadata"]["annotations"]


def test_upgrade_renders_the_crd_too():
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=None, name="kt", namespace="kubetuner-system", is_install=False)
    assert any("kind: CustomResourceDefinition" in text for text in rendered.values())


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """Violations of the Pod Security Standards' restricted profile (the checks a pod spec can fail)."""
    problems = []
    pod_ctx = pod_spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(f"{flag} is set")
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} uses {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    for container in containers:
        ctx = container.get("securityContext", {})
        name = container["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: uses a hostPort")
    return problems


@pytest.mark.parametrize("values", [None, NAMESPACED_VARIANT], ids=["defaults", "namespaced-monitoring"])
def test_operator_pod_is_restricted_pss_compliant(values):
    pod = by_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_restricted_check_catches_a_relaxed_pod():
    pod = by_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True, capabilities={"add": ["SYS_ADMIN"]})
    pod["securityContext"].pop("seccompProfile")
    pod["containers"][0]["securityContext"].pop("seccompProfile")
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = restricted_violations(pod)
    assert problems == [
        "volume host uses ['hostPath']",
        "operator: allowPrivilegeEscalation must be false",
        "operator: capabilities must drop ALL",
        "operator: adds capabilities ['SYS_ADMIN']",
        "operator: seccompProfile must be RuntimeDefault or Localhost",
    ]


def test_default_install_watches_all_namespaces_with_a_clusterrole():
    manifests = render()
    container = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubetuner"] and container["args"][0] == "operator"
    assert not any(a.startswith("--namespace") for a in container["args"])
    assert by_kind(manifests, "Role") == [] and by_kind(manifests, "RoleBinding") == []
    (role,) = by_kind(manifests, "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {
        ("kubetuner.dev", "trainingjobs", "watch"), ("kubetuner.dev", "trainingjobs", "patch"),
        ("kubetuner.dev", "trainingjobs/status", "patch"), ("", "pods", "create"), ("", "pods", "delete"),
        ("batch", "jobs", "create"), ("", "services", "create"),
        ("", "persistentvolumeclaims", "create"), ("", "events", "create"),
    }
    assert needed <= granted, needed - granted
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    assert not any(resource == "secrets" for _g, resource, _v in granted)
    (binding,) = by_kind(manifests, "ClusterRoleBinding")
    (account,) = by_kind(manifests, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "kubetuner-system"}]


def test_namespaced_install_uses_roles_in_the_watched_namespaces():
    manifests = render(NAMESPACED_VARIANT, namespace="ops")
    container = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["operator", "--namespace=team-a", "--namespace=team-b"]
    roles = by_kind(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for binding in by_kind(manifests, "RoleBinding"):
        assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
        assert binding["subjects"][0]["namespace"] == "ops"
    # Cluster-wide only the self-signed webhook's caBundle, on its own configuration.
    (cluster_role,) = by_kind(manifests, "ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": ["admissionregistration.k8s.io"],
                                      "resources": ["validatingwebhookconfigurations"],
                                      "resourceNames": ["kt-kubetuner-webhook"], "verbs": ["get", "patch"]}]


def test_probes_and_metrics_ports():
    manifests = render(NAMESPACED_VARIANT)
    container = by_kind(manifests, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8081, "webhook": 9443}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    (service,) = [s for s in by_kind(manifests, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (monitor,) = by_kind(manifests, "ServiceMonitor")
    (pod_monitor,) = by_kind(manifests, "PodMonitor")
    # The ServiceMonitor selects the metrics Service and scrapes its named port.
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    # The PodMonitor and the Service both reach the operator pod.
    pod_labels = by_kind(manifests, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


# The parts of the Prometheus Operator's monitoring.coreos.com/v1 API the chart uses (its CRDs are not part of
# kubernetes-validate); field names and the duration syntax as that API defines them.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_SELECTOR = {"type": "object", "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
}}
_ENDPOINT = {"type": "object", "properties": {
    "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
    "scheme": {"type": "string", "enum": ["http", "https"]},
    "interval": {"type": "string", "pattern": _DURATION}, "scrapeTimeout": {"type": "string", "pattern": _DURATION},
}}


def _monitor_schema(endpoints_field: str) -> dict[str, Any]:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"type": "string", "enum": [MONITORING]},
        "kind": {"type": "string"},
        "metadata": {"type": "object", "required": ["name", "namespace"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["selector", endpoints_field], "properties": {
            "selector": _SELECTOR,
            "namespaceSelector": {"type": "object", "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "jobLabel": {"type": "string"},
            endpoints_field: {"type": "array", "minItems": 1, "items": _ENDPOINT},
        }},
    }}


def test_monitors_match_the_prometheus_operator_api():
    from kubetuner_operator.crd.validation import validate_value

    manifests = render(NAMESPACED_VARIANT)
    (service_monitor,) = by_kind(manifests, "ServiceMonitor")
    (pod_monitor,) = by_kind(manifests, "PodMonitor")
    assert validate_value(service_monitor, _monitor_schema("endpoints")) == []
    assert validate_value(pod_monitor, _monitor_schema("podMetricsEndpoints")) == []
    pod_monitor["spec"]["podMetricEndpoints"] = pod_monitor["spec"].pop("podMetricsEndpoints")
    assert validate_value(pod_monitor, _monitor_schema("podMetricsEndpoints")) != []


def test_monitors_are_off_by_default():
    kinds = {m["kind"] for m in render()}
    assert "ServiceMonitor" not in kinds and "PodMonitor" not in kinds


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"replicaCount": 2}, "replicaCount"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"metrics": {"port": 80}}, "port"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        ({"imge": {"repository": "x"}}, "imge"),
    ],
)
def test_values_schema_rejects_bad_values(values, fragment):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError) as caught:
            chart.render(values=values, name="kt", namespace="kubetuner-system")
    assert fragment in str(caught.value)


def test_service_monitor_without_service_fails_clearly():
    values = {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError) as caught:
            chart.render(values=values, name="kt", namespace="kubetuner-system")
    assert "metrics.service.enabled" in str(caught.value)


def test_trainer_image_is_one_chart_value_passed_to_the_operator():
    from kubetuner_operator.images import TRAINER_IMAGE_ENV, default_trainer_image

    def env(values=None):
        deployment = by_kind(render(values), "Deployment")[0]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}[TRAINER_IMAGE_ENV]

    assert env() == default_trainer_image({})  # the chart's default is the operator's own default
    mirrored = env({"trainerImage": {"repository": "registry.internal/ml/kubetuner-trainer", "tag": "2026.11"}})
    assert mirrored == "registry.internal/ml/kubetuner-trainer:2026.11"
    assert default_trainer_image({TRAINER_IMAGE_ENV: mirrored}) == mirrored
