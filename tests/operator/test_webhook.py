"""The validating admission webhook, served by the running operator over HTTPS on loopback and asked with
real AdmissionReview requests, as the API server asks it."""

from __future__ import annotations

import asyncio
import base64
import copy
import socket
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from operator_helpers import UNBUILT_OPTION, Cluster, eventually

from kubetuner_operator.admission import TenancyPolicy, validate_all
from kubetuner_operator.handlers import OperatorSettings, Reconciler, run_operator
from kubetuner_operator.webhook import WEBHOOK_ID, WebhookSettings, fill_ca_bundle, self_signed_certificate

GOOD = {
    "apiVersion": "kubetuner.dev/v1alpha1", "kind": "TrainingJob",
    "metadata": {"name": "tiny", "namespace": "team-a", "uid": "u-1", "generation": 1},
    "spec": {
        "model": {"family": "sdxl", "type": "lora", "source": {"hub": {"id": "stabilityai/sdxl"}}},
        "config": {"optimizer": "adamw_bf16", "learning_rate": 1e-4, "max_train_steps": 100},
        "datasets": [{"id": "images", "type": "local", "pvc": {"claimName": "data"}}],
        "output": {"pvc": {"size": "10Gi"}},
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admission_review(obj: dict[str, Any], operation: str = "CREATE", old: dict[str, Any] | None = None) -> dict:
    gvr = {"group": "kubetuner.dev", "version": "v1alpha1", "resource": "trainingjobs"}
    gvk = {"group": "kubetuner.dev", "version": "v1alpha1", "kind": "TrainingJob"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
        "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"], "operation": operation,
        "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
        "object": obj, "oldObject": old, "dryRun": False, "options": {"apiVersion": "meta.k8s.io/v1"}}}


async def start_with_webhook(cluster: Cluster, webhook: WebhookSettings, policy: TenancyPolicy) -> None:
    url = cluster.url
    settings = OperatorSettings(login=lambda **_: kopf.ConnectionInfo(server=url), metrics_port=None,
                                clock=cluster.clock, tenancy=policy, webhook=webhook)
    reconciler = Reconciler(settings)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=asyncio.run, daemon=True, name="operator",
                              args=(run_operator(settings, stop_flag=stop, ready_flag=ready, reconciler=reconciler),))
    thread.start()
    cluster.operators.append((reconciler, thread, stop))
    await eventually(lambda: ready.is_set(), "operator ready")


async def test_webhook_answers_admission_reviews_over_https(cluster: Cluster, tmp_path: Path) -> None:
    port, cadump = free_port(), tmp_path / "ca.pem"
    policy = TenancyPolicy(allowed_images=("ghcr.io/kubetuner/",))
    await start_with_webhook(cluster, WebhookSettings(addr="127.0.0.1", port=port, hostnames=("127.0.0.1",),
                                                      cadump=str(cadump)), policy)
    await eventually(lambda: cadump.is_file(), "CA dumped")
    context = ssl.create_default_context(cafile=str(cadump))  # verifies the certificate and its SAN
    endpoint = f"https://127.0.0.1:{port}/{WEBHOOK_ID}"

    async def ask(review: dict[str, Any]) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async def post() -> Any:
                try:
                    async with session.post(endpoint, json=review, ssl=context) as resp:
                        return resp.status == 200 and await resp.json()
                except aiohttp.ClientConnectionError:
                    return False
            answer = await eventually(post, "webhook answers", timeout=90.0)  # slow start on a busy machine
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == review["request"]["uid"]
        return answer["response"]

    first = await ask(admission_review(GOOD))
    assert first["allowed"] is True, first
    bad = copy.deepcopy(GOOD)
    bad["spec"]["config"][UNBUILT_OPTION] = True
    bad["spec"]["config"].update(max_train_steps=0, num_train_epochs=0,
                                 webhook_config={"webhook_type": "raw", "callback_url": "https://h.example/x",
                                                 "api_key": "literal"})
    bad["spec"]["image"] = "docker.io/someone/miner:1"
    response = await ask(admission_review(bad))
    assert response["allowed"] is False and response["status"]["code"] == 422, response
    message = response["status"]["message"]
    expected = validate_all(bad, policy=policy)  # the same function backs crd --validate and run
    assert len(expected) == 4 and message == "; ".join(expected)
    for field in (f"spec.config.{UNBUILT_OPTION}", "spec.config.max_train_steps", "spec.config.webhook_config.api_key", "spec.image"):
        assert field + ":" in message
    # An update that leaves spec alone passes (the operator's own metadata writes), a spec change is judged.
    touched = copy.deepcopy(bad)
    touched["metadata"]["annotations"] = {"kubetuner.dev/attempt": "1"}
    assert (await ask(admission_review(touched, "UPDATE", old=bad)))["allowed"] is True
    assert (await ask(admission_review(bad, "UPDATE", old=GOOD)))["allowed"] is False


def test_self_signed_certificate_names_the_service():
    from cryptography import x509

    cert_pem, key_pem = self_signed_certificate(("kubetuner-webhook.kubetuner.svc", "10.0.0.1"))
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["kubetuner-webhook.kubetuner.svc"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert b"PRIVATE KEY" in key_pem


async def test_ca_bundle_is_written_into_every_webhook_of_the_configuration():
    calls: list[tuple[str, str, Any]] = []

    class Api:
        async def get_cluster(self, kind: str, name: str) -> dict[str, Any]:
            calls.append(("get", name, None))
            return {"webhooks": [{"name": "a", "clientConfig": {"service": {"name": "s", "namespace": "n"}}},
                                 {"name": "b", "clientConfig": {"service": {"name": "s", "namespace": "n"}}}]}

        async def patch_cluster(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
            calls.append(("patch", name, patch))
            return {}

    await fill_ca_bundle(Api(), "kubetuner", b"CA")
    (_, name, patch) = calls[-1]
    assert name == "kubetuner" and [h["clientConfig"]["caBundle"] for h in patch["webhooks"]] == \
        [base64.b64encode(b"CA").decode()] * 2
    assert all(h["clientConfig"]["service"]["name"] == "s" for h in patch["webhooks"])


def test_the_ca_is_dumped_whole_before_the_server_listens(tmp_path: Path):
    """The flaky NO_CERTIFICATE_OR_CRL_FOUND: kopf's cadump creates the file, then fills it, so a poller
    could load it empty. build_server writes it itself, complete, by rename, before kopf starts."""
    from kubetuner_operator.webhook import build_server

    cadump = tmp_path / "ca.pem"
    server, ca = build_server(WebhookSettings(addr="127.0.0.1", port=free_port(), hostnames=("127.0.0.1",),
                                              cadump=str(cadump)))
    assert server.cadump is None  # not kopf's in-place write
    assert cadump.read_bytes() == ca and ca.rstrip().endswith(b"-----END CERTIFICATE-----")
    ssl.create_default_context(cafile=str(cadump))
    assert [p.name for p in tmp_path.iterdir()] == ["ca.pem"]  # no temporary file left behind
