"""Read Kubernetes manifests the way kubectl does.

PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a *string*; kubectl's YAML reader follows 1.2
and reads a number. Trainer options such as ``learning_rate: 1e-4`` must mean the same here as
in the cluster, so this loader adds the YAML 1.2 float forms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class ManifestLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-4`` and ``5E3``."""


ManifestLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_manifests(text: str) -> list[Any]:
    """Every non-empty document of a (multi-document) YAML text."""
    return [doc for doc in yaml.load_all(text, Loader=ManifestLoader) if doc is not None]


def load_manifest_file(path: str | Path) -> list[Any]:
    return load_manifests(Path(path).read_text(encoding="utf-8"))
