"""JSON Schema of the trainer options (the CRD's ``spec.config`` is generated from it)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .model import Option
from .registry import Registry, get_registry

_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}
# Longest value of a string option (characters): every string in a Kubernetes schema needs a bound,
# both for the API server's CEL cost estimate and to keep the rendered config well below object limits.
STRING_MAX_LENGTH = 4096


def option_json_schema(option: Option, *, defaults: bool = False) -> dict[str, Any]:
    """The schema of one option's value. JSON-valued options accept any value (object, list or path)."""
    description = option.help
    if option.default is not None:
        description += f" Default: {option.default}."
    if option.type == "json":
        schema: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
    else:
        schema = {"type": _JSON_TYPES[option.type]}
        if option.type == "str":
            schema["maxLength"] = STRING_MAX_LENGTH
    schema["description"] = description
    if option.choices is not None:
        if option.multiple:
            alternatives = "|".join(re.escape(str(c)) for c in option.choices)
            schema["pattern"] = f"^({alternatives})(,({alternatives}))*$"
        else:
            schema["enum"] = list(option.choices)
    if option.minimum is not None:
        schema["minimum"] = option.minimum
    if option.maximum is not None:
        schema["maximum"] = option.maximum
    if defaults and option.default is not None:
        schema["default"] = option.default
    return schema


def options_json_schema(
    registry: Registry | None = None,
    *,
    exclude: Iterable[str] = (),
    defaults: bool = False,
    closed: bool = True,
) -> dict[str, Any]:
    """An object schema with one property per option (canonical names), no extra keys allowed.

    ``exclude`` drops options (e.g. those the operator sets itself). ``defaults`` adds
    ``default:`` keywords; off by default so that a CRD does not copy every default into objects.
    ``closed=False`` leaves out ``additionalProperties: false``, which Kubernetes structural schemas
    forbid next to ``properties`` (the API server rejects unknown fields itself).
    """
    registry = registry or get_registry()
    skipped = set(exclude)
    options = [o for o in registry if o.name not in skipped]
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {o.name: option_json_schema(o, defaults=defaults) for o in options},
        "required": [o.name for o in options if o.required and o.default is None],
    }
    if closed:
        schema["additionalProperties"] = False
    return schema
