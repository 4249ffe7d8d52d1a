"""The ConfigMap holding the trainer's config.json and multidatabackend.json."""

from __future__ import annotations

import json
from typing import Any

from ..spec import TrainingJobSpec
from ..trainer_config import CONFIG_FILE, DATABACKEND_FILE, POD_PATHS, MountPaths, render_trainer_files
from .common import metadata, resource_names


def build_configmap(job: TrainingJobSpec, paths: MountPaths = POD_PATHS) -> dict[str, Any]:
    """Resume is passed on the command line, so the ConfigMap is the same for every attempt."""
    files = render_trainer_files(job, paths, resume=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, resource_names(job)["configmap"], "config"),
        "data": {
            CONFIG_FILE: json.dumps(files.config_json, indent=2, sort_keys=True),
            DATABACKEND_FILE: json.dumps(files.databackend_json, indent=2),
        },
    }
