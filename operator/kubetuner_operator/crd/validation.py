"""Validate a TrainingJob the way the API server does with the generated CRD.

Order as in the API server: ``null`` in non-nullable fields dropped and ``default``s applied,
unknown fields reported (``kubectl apply``'s default strict field validation) or pruned, then the
OpenAPI value checks (type, enum, bounds, lengths, pattern, required, list types) and the
``x-kubernetes-validations`` CEL rules, evaluated with cel-python. Messages follow the API
server's shape: ``<field path>: <what is wrong>``.
"""

from __future__ import annotations

import json
import math
import re
from functools import cache
from typing import Any

from kubetuner_trainer.options import get_registry

from .cel import RuleError, evaluate
from .defaults import apply_defaults

Schema = dict[str, Any]

_ABSENT = object()  # no old value at this position (a create, or a new list item / field)
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


@cache
def _crd_schema() -> Schema:
    from .schema import trainingjob_openapi_schema

    return trainingjob_openapi_schema()


def validate_trainingjob(obj: Any, *, old: dict[str, Any] | None = None, strict: bool = True) -> list[str]:
    """Every problem of a TrainingJob object, as the API server would report them ([] = accepted).

    ``old`` is the stored object when ``obj`` updates it: transition rules (those using ``oldSelf``,
    e.g. an immutable ``spec.model``) run only then, like on the API server. ``strict`` reports unknown
    fields (``kubectl apply --validate=strict``, kubectl's default); otherwise they are pruned silently
    like a plain API request without field validation.
    """
    from .schema import GROUP, KIND, VERSION

    if not isinstance(obj, dict):
        return [f"<root>: Invalid value: must be an object, got {_kind_of(obj)}"]
    problems = []
    expected = f"{GROUP}/{VERSION}"
    if obj.get("apiVersion") != expected:
        problems.append(f"apiVersion: Unsupported value: {_show(obj.get('apiVersion'))}: supported values: "
                        f"\"{expected}\"")
    if obj.get("kind") != KIND:
        problems.append(f"kind: Unsupported value: {_show(obj.get('kind'))}: supported values: \"{KIND}\"")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not (meta.get("name") or meta.get("generateName")):
        problems.append("metadata.name: Required value: name or generateName is required")
    schema = _crd_schema()
    checker = _Checker(strict)
    previous = apply_defaults(old, schema) if isinstance(old, dict) else _ABSENT
    checker.check(apply_defaults(obj, schema), schema, "", previous)
    return problems + checker.problems


def validate_value(value: Any, schema: Schema, path: str = "", *, strict: bool = True) -> list[str]:
    """Validate (after defaulting) any value against a schema node; used for defaults and tests."""
    checker = _Checker(strict)
    checker.check(apply_defaults(value, schema), schema, path)
    return checker.problems


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return True


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _closest(word: str, candidates: Any) -> str | None:
    """The candidate a typo most likely meant (``difflib``'s ratio >= 0.6), for "did you mean" hints."""
    import difflib

    names = [str(c) for c in candidates if isinstance(c, str)]
    found = difflib.get_close_matches(word, names, n=1) or difflib.get_close_matches(word.lower(), names, n=1)
    return found[0] if found else None


def _unknown_field_hint(path: str, key: str, properties: Any = ()) -> str:
    if path != "spec.config":
        suggestion = _closest(key, properties)
        return f" (did you mean {suggestion}?)" if suggestion else ""
    registry = get_registry()
    canonical = registry.canonical(key)
    if canonical and canonical != key:
        return f" ({key} is an alias: write {canonical})"
    suggestion = registry.suggest(key)
    return f" (did you mean {suggestion}?)" if suggestion else " (not a trainer option)"


class _Checker:
    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[str] = []

    def report(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '<root>'}: {message}")

    def check(self, value: Any, schema: Schema, path: str, old: Any = _ABSENT) -> None:
        """Check one node; CEL rules run only when the node itself has the right shape."""
        if value is None:
            if not schema.get("nullable"):
                self.report(path, "Invalid value: null: must not be null")
            return
        if schema.get("x-kubernetes-int-or-string"):
            if not (isinstance(value, str) or _type_ok(value, "integer")):
                self.report(path, f"Invalid value: {_show(value)}: must be of type integer or string, "
                                  f"got {_kind_of(value)}")
                return
        elif "type" in schema and not _type_ok(value, schema["type"]):
            self.report(path, f"Invalid value: {_show(value)}: must be of type {schema['type']}, "
                              f"got {_kind_of(value)}")
            return
        before = len(self.problems)
        self._values(value, schema, path)
        if isinstance(value, dict) and (schema.get("type") == "object"):
            self._object(value, schema, path, old)
        elif isinstance(value, list) and schema.get("type") == "array":
            self._array(value, schema, path, old)
        if len(self.problems) == before:
            self._rules(value, schema, path, old)

    def _values(self, value: Any, schema: Schema, path: str) -> None:
        if "enum" in schema and value not in schema["enum"]:
            allowed = ", ".join(_show(v) for v in schema["enum"])
            suggestion = _closest(value, schema["enum"]) if isinstance(value, str) else None
            hint = f" (did you mean {_show(suggestion)}?)" if suggestion else ""
            self.report(path, f"Unsupported value: {_show(value)}{hint}: supported values: {allowed}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = schema.get("minimum"), schema.get("maximum")
            if low is not None:
                if schema.get("exclusiveMinimum") and value <= low:
                    self.report(path, f"Invalid value: {_show(value)}: should be greater than {low:g}")
                elif value < low:
                    self.report(path, f"Invalid value: {_show(value)}: should be greater than or equal to {low:g}")
            if high is not None:
                if schema.get("exclusiveMaximum") and value >= high:
                    self.report(path, f"Invalid value: {_show(value)}: should be less than {high:g}")
                elif value > high:
                    self.report(path, f"Invalid value: {_show(value)}: should be less than or equal to {high:g}")
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                self.report(path, f"Invalid value: {_show(value)}: should be at least {schema['minLength']} "
                                  f"chars long")
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                self.report(path, f"Too long: may not be more than {schema['maxLength']} bytes")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                self.report(path, f"Invalid value: {_show(value)}: should match '{schema['pattern']}'")
            if schema.get("format") == "date-time" and not _RFC3339.match(value):
                self.report(path, f"Invalid value: {_show(value)}: must be an RFC 3339 date-time")

    def _object(self, value: dict, schema: Schema, path: str, old: Any) -> None:
        properties: dict[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                self.report(_join(path, key), "Required value")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            self.report(path, f"Too many: {len(value)}: must have at most {schema['maxProperties']} items")
        if path == "metadata":  # ObjectMeta is validated by the API server itself, not the CRD schema
            for key in ("name", "generateName"):
                if key in value and key in properties:
                    self.check(value[key], properties[key], _join(path, key))
            return
        olds = old if isinstance(old, dict) else {}
        for key in list(value):
            child = _join(path, key)
            if key in properties:
                self.check(value[key], properties[key], child, olds.get(key, _ABSENT))
            elif isinstance(extra, dict):
                self.check(value[key], extra, child, olds.get(key, _ABSENT))
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            elif self.strict:
                self.report(child, f"unknown field \"{child}\"{_unknown_field_hint(path, key, properties)}")
            else:
                del value[key]

    def _array(self, value: list, schema: Schema, path: str, old: Any) -> None:
        if "minItems" in schema and len(value) < schema["minItems"]:
            self.report(path, f"Invalid value: {len(value)}: must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            self.report(path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items")
        items = schema.get("items", {})
        list_type = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        # Only items of a list-type map correlate with old items (by key), as on the API server.
        old_items = {}
        if list_type == "map" and isinstance(old, list):
            old_items = {_show({k: o.get(k) for k in keys}): o for o in old if isinstance(o, dict)}
        for index, item in enumerate(value):
            key = _show({k: item.get(k) for k in keys}) if isinstance(item, dict) else None
            self.check(item, items, f"{path}[{index}]", old_items.get(key, _ABSENT))
        seen: set[str] = set()
        for index, item in enumerate(value):
            if list_type == "set":
                key = _show(item)
            elif list_type == "map" and isinstance(item, dict):
                key = _show({k: item.get(k) for k in keys})
            else:
                continue
            if key in seen:
                self.report(f"{path}[{index}]", f"Duplicate value: {key}")
            seen.add(key)

    def _rules(self, value: Any, schema: Schema, path: str, old: Any) -> None:
        for entry in schema.get("x-kubernetes-validations", []):
            transition = "oldSelf" in entry["rule"]
            if transition and old is _ABSENT:
                continue  # transition rules need a stored value at this position
            try:
                passed = evaluate(entry["rule"], value, schema, old=old if transition else None)
            except RuleError as error:
                self.report(path, f"Invalid value: {_kind_of(value)}: {error}")
                continue
            if not bool(passed):
                where = _join(path, entry["fieldPath"].lstrip(".")) if entry.get("fieldPath") else path
                self.report(where, f"Invalid value: \"{_kind_of(value)}\": {self._message(entry, value, schema)}")

    @staticmethod
    def _message(entry: dict[str, str], value: Any, schema: Schema) -> str:
        """messageExpression when it evaluates to a string (as the API server does), else message."""
        if entry.get("messageExpression"):
            try:
                text = evaluate(entry["messageExpression"], value, schema)
            except RuleError:
                text = None
            if isinstance(text, str) and text.strip():
                return str(text)
        return entry.get("message") or f"failed rule: {entry['rule']}"
