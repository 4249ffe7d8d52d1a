"""Evaluate the CRD's ``x-kubernetes-validations`` rules with a real CEL implementation (cel-python).

Values are converted to CEL types the way the API server does it: by the schema, not by the
Python type, so a ``number`` field written as ``1`` is a CEL double like ``1.5`` next to it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import celpy
from celpy import celtypes

_ENV = celpy.Environment()


class RuleError(ValueError):
    """A rule does not compile (a bug in the CRD generator) or cannot be evaluated."""


@cache
def compile_rule(expression: str) -> celpy.Runner:
    """Compile a CEL expression once; RuleError when it does not parse."""
    try:
        return _ENV.program(_ENV.compile(expression))
    except celpy.CELParseError as error:
        raise RuleError(f"CEL rule does not compile: {expression!r}: {error}") from None


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """Convert a JSON value to CEL, typed by its (structural) schema node."""
    if value is None:
        return None
    if schema.get("x-kubernetes-preserve-unknown-fields") and "type" not in schema:
        return celpy.json_to_cel(value)
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.StringType(value) if isinstance(value, str) else celtypes.IntType(value)
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        converted = {}
        for key, item in value.items():
            item_schema = properties.get(key) or (extra if isinstance(extra, dict) else {})
            converted[celtypes.StringType(key)] = to_cel(item, item_schema) if item_schema else \
                celpy.json_to_cel(item)
        return celtypes.MapType(converted)
    if kind == "array":
        items = schema.get("items", {})
        return celtypes.ListType([to_cel(item, items) for item in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(int(value))
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "string":
        return celtypes.StringType(value)
    return celpy.json_to_cel(value)


def evaluate(expression: str, value: Any, schema: dict[str, Any], *, old: Any = None) -> Any:
    """Evaluate ``expression`` with ``self`` bound to ``value`` (and ``oldSelf`` to ``old`` for a
    transition rule); RuleError on evaluation errors."""
    program = compile_rule(expression)
    try:
        context = {"self": to_cel(value, schema)}
        if old is not None:
            context["oldSelf"] = to_cel(old, schema)
    except (ValueError, OverflowError, RecursionError) as error:  # e.g. an integer beyond int64
        raise RuleError(f"value cannot be given to rule {expression!r}: {error}") from None
    try:
        result = program.evaluate(context)
    except celpy.CELEvalError as error:
        raise RuleError(f"rule {expression!r} could not be evaluated: {error.args[0]}") from None
    if isinstance(result, celpy.CELEvalError):
        raise RuleError(f"rule {expression!r} could not be evaluated: {result.args[0]}")
    return result
