"""``kubetuner operator``: run the TrainingJob operator against a cluster.

Credentials: the in-cluster ServiceAccount when running in a pod, otherwise ``KUBECONFIG``
(or ``~/.kube/config``), so the same command works from a laptop against any cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .admission import TenancyPolicy
from .builders.network_policy import NetworkPolicySettings
from .handlers import OperatorSettings, run_operator
from .images import TAG, TRAINER_IMAGE_ENV, TRAINER_REPOSITORY
from .webhook import WebhookSettings


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", action="append", default=[], metavar="NAMESPACE",
                        help="Watch only this namespace (repeatable; glob patterns allowed). "
                             "Default: all namespaces.")
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="Kubeconfig to use outside a cluster (default: $KUBECONFIG, then ~/.kube/config).")
    parser.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                        help="Run without kopf peering (default). Use --no-standalone when running several "
                             "replicas with the kopf peering CRDs installed.")
    parser.add_argument("--health-port", type=int, default=8080, metavar="PORT",
                        help="Port of the liveness endpoint /healthz (0 disables it; default 8080).")
    parser.add_argument("--metrics-port", type=int, default=8081, metavar="PORT",
                        help="Port of the Prometheus endpoint /metrics (0 disables it; default 8081).")
    parser.add_argument("--poll-interval", type=float, default=15.0, metavar="SECONDS",
                        help="How often every TrainingJob's trainer progress is polled (default 15).")
    parser.add_argument("--webhook-port", type=int, default=0, metavar="PORT",
                        help="Serve the validating admission webhook (HTTPS) on this port (0: no webhook; the chart "
                             "uses 9443).")
    parser.add_argument("--webhook-host", action="append", default=[], metavar="NAME",
                        help="DNS name of the webhook Service, put into a self-signed certificate (repeatable).")
    parser.add_argument("--webhook-cert-dir", metavar="DIR",
                        help="Folder with tls.crt and tls.key (e.g. a cert-manager Secret); default: self-signed.")
    parser.add_argument("--webhook-configuration", metavar="NAME",
                        help="ValidatingWebhookConfiguration whose caBundle gets the self-signed CA.")
    parser.add_argument("--webhook-failure-policy", choices=["Fail", "Ignore"], default="Fail",
                        help="What the API server does when the webhook cannot answer (default Fail).")
    parser.add_argument("--trainer-image", metavar="IMAGE",
                        help=f"Trainer image of TrainingJobs that name none (default: ${TRAINER_IMAGE_ENV}, "
                             f"then {TRAINER_REPOSITORY}:{TAG}).")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="Log verbosity (default INFO).")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.trainer_image:
        os.environ[TRAINER_IMAGE_ENV] = args.trainer_image  # read by images.default_trainer_image
    if args.poll_interval <= 0:
        raise SystemExit("kubetuner operator: --poll-interval must be > 0")
    try:
        network_policy = NetworkPolicySettings.from_env(os.environ)
    except ValueError as exc:
        print(f"kubetuner operator: {exc}", file=sys.stderr)
        return 1
    missing = missing_credentials(os.environ)
    if missing:
        print(f"kubetuner operator: {missing}", file=sys.stderr)
        return 1
    settings = OperatorSettings(poll_interval=args.poll_interval,
                                metrics_port=args.metrics_port or None,
                                tenancy=TenancyPolicy.from_env(os.environ),
                                webhook=_webhook(args),
                                webhook_fail_closed=args.webhook_failure_policy == "Fail",
                                network_policy=network_policy)
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    try:
        asyncio.run(run_operator(settings, namespaces=list(args.namespace), liveness_endpoint=liveness,
                                 standalone=args.standalone))
    except KeyboardInterrupt:
        pass
    return 0


SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def missing_credentials(environ: Mapping[str, str], *, token: Path = SERVICE_ACCOUNT_TOKEN) -> str | None:
    """One line saying why no cluster can be reached, or None when in-cluster or kubeconfig credentials exist."""
    if environ.get("KUBERNETES_SERVICE_HOST") and token.is_file():
        return None
    configs = [Path(p).expanduser() for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    configs = configs or [Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"]
    if any(p.is_file() for p in configs):
        return None
    tried = ", ".join(str(p) for p in configs)
    return (f"no cluster credentials: not running in a pod with a service account, and no kubeconfig at {tried}; "
            "pass --kubeconfig FILE or set KUBECONFIG (`kubetuner run job.yaml` trains without a cluster)")


def _webhook(args: argparse.Namespace) -> WebhookSettings | None:
    if not args.webhook_port:
        return None
    return WebhookSettings(port=args.webhook_port, hostnames=tuple(args.webhook_host) or ("localhost",),
                           cert_dir=args.webhook_cert_dir, configuration=args.webhook_configuration)
