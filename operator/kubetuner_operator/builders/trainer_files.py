"""The trainer's config.json and multidatabackend.json, carried by the trainer pod itself.

Both files are annotations of the pod (or of the pod template of a multi-node Job/JobSet) and
reach the container through a downwardAPI volume, instead of a ConfigMap: one object and one API
write less per job, no ConfigMap permissions for the operator, and every attempt runs the config
of the spec it was built from (a ConfigMap, created once, kept an edited spec's old config).
The API server bounds a pod's annotations (keys and values together) to 256 KiB; admission checks
the rendered files against that (``admission.annotation_problems``). Resume is passed on the
command line, so the files are the same for every attempt of one spec.
"""

from __future__ import annotations

import json
from typing import Any

from ..spec import GROUP, TrainingJobSpec
from ..trainer_config import CONFIG_FILE, DATABACKEND_FILE, POD_PATHS, MountPaths, render_trainer_files

#: file name in the config folder -> annotation key holding it
FILE_ANNOTATIONS = {CONFIG_FILE: f"{GROUP}/{CONFIG_FILE}", DATABACKEND_FILE: f"{GROUP}/{DATABACKEND_FILE}"}
CONFIG_VOLUME = "config"


def trainer_files_annotations(job: TrainingJobSpec, paths: MountPaths = POD_PATHS) -> dict[str, str]:
    """The annotations carrying the trainer's files (JSON text, as the trainer reads them)."""
    files = render_trainer_files(job, paths, resume=False)
    return {FILE_ANNOTATIONS[CONFIG_FILE]: json.dumps(files.config_json, indent=2, sort_keys=True),
            FILE_ANNOTATIONS[DATABACKEND_FILE]: json.dumps(files.databackend_json, indent=2)}


def config_volume() -> dict[str, Any]:
    """The pod volume exposing those annotations as files (mounted read-only at ``paths.config_dir``)."""
    return {"name": CONFIG_VOLUME, "downwardAPI": {"items": [
        {"path": name, "fieldRef": {"fieldPath": f"metadata.annotations['{key}']"}}
        for name, key in FILE_ANNOTATIONS.items()]}}
