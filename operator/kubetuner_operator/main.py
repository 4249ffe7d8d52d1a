"""``kubetuner operator``: run the TrainingJob operator against a cluster.

Credentials: the in-cluster ServiceAccount when running in a pod, otherwise ``KUBECONFIG``
(or ``~/.kube/config``), so the same command works from a laptop against any cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from .admission import TenancyPolicy
from .handlers import OperatorSettings, run_operator


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
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="Log verbosity (default INFO).")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.poll_interval <= 0:
        raise SystemExit("kubetuner operator: --poll-interval must be > 0")
    settings = OperatorSettings(poll_interval=args.poll_interval,
                                metrics_port=args.metrics_port or None,
                                tenancy=TenancyPolicy.from_env(os.environ))
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    try:
        asyncio.run(run_operator(settings, namespaces=list(args.namespace), liveness_endpoint=liveness,
                                 standalone=args.standalone))
    except KeyboardInterrupt:
        pass
    return 0
