"""The ``kubetuner`` command: one entry point, subcommands loaded lazily from their owners.

Each subcommand module provides ``register(parser)`` and ``main(args) -> int``; importing is
deferred so that ``kubetuner crd`` never imports torch and ``kubetuner data`` never imports kopf.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("kubetuner_operator.local_run", "Run a TrainingJob manifest end to end on this machine."),
    "crd": ("kubetuner_operator.crd_cli", "Print the TrainingJob CustomResourceDefinition."),
    "operator": ("kubetuner_operator.main", "Run the operator against a cluster (in-cluster or KUBECONFIG)."),
    "data": ("kubetuner_trainer.data.cli", "Inspect datasets before training (kubetuner data inspect ...)."),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``kubetuner``; output piped into a closed reader (``| head``) ends quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from kubetuner_trainer.cli import version

        print(f"kubetuner {version()}")
        return 0
    parser = argparse.ArgumentParser(prog="kubetuner", description="Fine-tune diffusion models on Kubernetes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"kubetuner {name}", description=SUBCOMMANDS[name][1])
    module.register(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
