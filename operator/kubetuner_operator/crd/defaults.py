"""Fill in the CRD schema's ``default`` values, as the API server does on every write and read.

The operator reads specs through this so that it sees the same values a real cluster would store,
also against API emulators that do not default.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

Schema = dict[str, Any]


@cache
def _schema() -> Schema:
    from .schema import trainingjob_openapi_schema

    return trainingjob_openapi_schema()


def apply_defaults(obj: dict[str, Any], schema: Schema | None = None) -> dict[str, Any]:
    """A copy of ``obj`` (a TrainingJob, or any value of ``schema``) with schema defaults filled in.

    Like the API server: ``null`` in a field that is not ``nullable`` counts as absent, a missing
    field with a ``default`` gets a copy of it, and defaults of fields inside a defaulted object
    apply too. Values of the wrong type are left alone (validation reports them).
    """
    return _fill(copy.deepcopy(obj), _schema() if schema is None else schema)


def _fill(value: Any, schema: Schema) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        properties: dict[str, Schema] = schema.get("properties", {})
        for key, child in properties.items():
            if key in value and value[key] is None and not child.get("nullable"):
                del value[key]
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = _fill(value[key], child)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in [k for k in value if k not in properties]:
                value[key] = _fill(value[key], extra)
        return value
    if isinstance(value, list) and schema.get("type") == "array":
        items = schema.get("items", {})
        return [_fill(item, items) for item in value]
    return value
