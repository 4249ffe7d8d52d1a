"""The validating admission webhook: ``admission.policy_problems`` at ``kubectl apply`` time.

Served by kopf's admission server (HTTPS) inside the operator. TLS comes either from a mounted
certificate (cert-manager writes ``tls.crt``/``tls.key`` and injects the CA into the chart's
ValidatingWebhookConfiguration) or from a self-signed certificate generated at start-up, whose CA
the operator then writes into ``caBundle`` of that configuration (``--webhook-configuration``).
The chart renders the configuration with a Service reference and the path ``/<WEBHOOK_ID>``.
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from .admission import TenancyPolicy, policy_problems
from .spec import GROUP, PLURAL, VERSION

WEBHOOK_ID = "validate.trainingjobs.kubetuner.dev"
DEFAULT_WEBHOOK_PORT = 9443
CERT_VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class WebhookSettings:
    """Where and how the webhook listens.

    ``cert_dir`` holds ``tls.crt``/``tls.key`` (cert-manager); without it a self-signed certificate
    is made for ``hostnames``. ``configuration`` names the ValidatingWebhookConfiguration whose
    ``caBundle`` the operator fills in self-signed mode. ``cadump`` writes the CA (tests, curl), whole
    and before the server starts listening.
    """

    addr: str = "0.0.0.0"
    port: int = DEFAULT_WEBHOOK_PORT
    hostnames: tuple[str, ...] = ("localhost",)
    cert_dir: str | None = None
    configuration: str | None = None
    cadump: str | None = None


def self_signed_certificate(hostnames: tuple[str, ...]) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): an EC P-256 certificate valid for ``hostnames`` (DNS names or IPs)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64])])
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def build_server(settings: WebhookSettings) -> tuple[kopf.WebhookServer, bytes]:
    """kopf's HTTPS admission server and the CA bundle clients must trust."""
    if settings.cert_dir:
        certfile, keyfile = Path(settings.cert_dir) / "tls.crt", Path(settings.cert_dir) / "tls.key"
        ca = (Path(settings.cert_dir) / "ca.crt") if (Path(settings.cert_dir) / "ca.crt").is_file() else certfile
    else:
        cert, key = self_signed_certificate(settings.hostnames)
        folder = Path(tempfile.mkdtemp(prefix="kubetuner-webhook-"))
        certfile, keyfile = folder / "tls.crt", folder / "tls.key"
        certfile.write_bytes(cert)
        keyfile.write_bytes(key)
        keyfile.chmod(0o600)
        ca = certfile
    server = kopf.WebhookServer(addr=settings.addr, port=settings.port, host=settings.hostnames[0],
                                certfile=str(certfile), pkeyfile=str(keyfile), cafile=str(ca))
    ca_bytes = ca.read_bytes()
    if settings.cadump:
        dump_ca(Path(settings.cadump), ca_bytes)
    return server, ca_bytes


def dump_ca(path: Path, ca: bytes) -> None:
    """Write the CA bundle so that readers never see a partial file: a temporary file renamed into place.

    kopf's own ``cadump`` writes in place (create, then fill), so a reader polling for the file could
    open it empty, which ssl reports as ``NO_CERTIFICATE_OR_CRL_FOUND``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(ca)
    tmp.replace(path)


def review(body: dict[str, Any], old: dict[str, Any] | None, policy: TenancyPolicy) -> list[str]:
    """The problems to refuse an admission request with ([] = allowed).

    An update that leaves ``spec`` as it was is always allowed: the operator's own metadata writes
    (attempt counters, kopf bookkeeping) must go through even if the policy changed since creation.
    """
    if old and old.get("spec") == body.get("spec"):
        return []
    return policy_problems(body, policy)


def register(registry: kopf.OperatorRegistry, policy: TenancyPolicy, *, fail_closed: bool = True) -> None:
    """Add the validating handler (CREATE and UPDATE of TrainingJobs, not their status) to ``registry``."""

    @kopf.on.validate(GROUP, VERSION, PLURAL, id=WEBHOOK_ID, operations=["CREATE", "UPDATE"],
                      ignore_failures=not fail_closed, registry=registry)
    def validate_trainingjob(body: Any, old: Any, **_: Any) -> None:
        problems = review(dict(body), dict(old) if old else None, policy)
        if problems:
            raise kopf.AdmissionError("; ".join(problems), code=422)


async def fill_ca_bundle(api: Any, configuration: str, ca: bytes) -> None:
    """Write ``ca`` into every webhook of the ValidatingWebhookConfiguration ``configuration`` (a KubeApi)."""
    import base64

    current = await api.get_cluster("ValidatingWebhookConfiguration", configuration)
    bundle = base64.b64encode(ca).decode("ascii")
    webhooks = [{**hook, "clientConfig": {**hook.get("clientConfig", {}), "caBundle": bundle}}
                for hook in current.get("webhooks") or ()]
    await api.patch_cluster("ValidatingWebhookConfiguration", configuration, {"webhooks": webhooks})
