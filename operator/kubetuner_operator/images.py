"""The one source of the project's image names and tags.

The chart's ``image.repository`` and ``trainerImage`` default to these (a test compares them),
the Dockerfile's build commands name them, and a TrainingJob without ``spec.image`` runs
:func:`default_trainer_image`: the operator's ``--trainer-image`` flag (``$KUBETUNER_TRAINER_IMAGE``,
which the chart sets from ``trainerImage``), else ``ghcr.io/kubetuner/trainer:<version>``. The
default is the operator's setting, not the CRD's, so a private registry needs one value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from . import __version__

REGISTRY = "ghcr.io/kubetuner"
OPERATOR_REPOSITORY = f"{REGISTRY}/operator"
TRAINER_REPOSITORY = f"{REGISTRY}/trainer"
TAG = __version__
TRAINER_IMAGE_ENV = "KUBETUNER_TRAINER_IMAGE"


def default_trainer_image(environ: Mapping[str, str] | None = None) -> str:
    """The trainer image of a TrainingJob that names none (see the module docstring)."""
    env = os.environ if environ is None else environ
    return env.get(TRAINER_IMAGE_ENV) or f"{TRAINER_REPOSITORY}:{TAG}"
