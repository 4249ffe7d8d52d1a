"""The TrainingJob CustomResourceDefinition: generated schema, defaulting and validation.

Names are loaded on first use, so that reading defaults (the operator) or printing the CRD does
not import the CEL interpreter that only validation needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CRD_NAME": "schema",
    "GROUP": "schema",
    "KIND": "schema",
    "PLURAL": "schema",
    "VERSION": "schema",
    "build_crd": "schema",
    "trainingjob_openapi_schema": "schema",
    "apply_defaults": "defaults",
    "validate_trainingjob": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
