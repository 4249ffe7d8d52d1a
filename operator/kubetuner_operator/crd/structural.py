"""Check that a CRD schema is *structural*, with the API server's rules for apiextensions.k8s.io/v1.

The API server refuses a CRD whose schema breaks these rules; kubernetes-validate only checks the
shape of the CRD object, so the generator's tests run this too. Rules (from the Kubernetes docs on
structural schemas and the v1 CRD validation): every node typed unless int-or-string or
preserve-unknown-fields; no type/default/description/nullable/additionalProperties inside
allOf/anyOf/oneOf/not except the exact int-or-string pattern; properties and additionalProperties
are exclusive; metadata may only restrict name and generateName; v1-forbidden keywords absent;
list-map keys required or defaulted scalars; defaults valid; CEL rules compile, type-check against
the schema and stay within the cost limits (``celcheck``).
"""

from __future__ import annotations

from typing import Any

from .cel import RuleError, compile_rule

Schema = dict[str, Any]

_FORBIDDEN = ("$ref", "$schema", "definitions", "dependencies", "additionalItems", "patternProperties", "id",
              "uniqueItems")
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_JUNCTOR_FORBIDDEN = ("type", "default", "description", "nullable", "additionalProperties",
                      "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string")
_FORMATS = {"bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid", "uuid3", "uuid4",
            "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor", "rgbcolor", "byte", "password",
            "date", "duration", "datetime", "date-time", "int32", "int64", "float", "double"}
_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
_TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def structural_problems(schema: Schema) -> list[str]:
    """Every reason the API server would refuse ``schema`` as a v1 CRD ``openAPIV3Schema`` ([] = fine)."""
    problems: list[str] = []
    if schema.get("type") != "object":
        problems.append("<root>: type must be object")
    _node(schema, "", problems, root=True)
    if not problems:  # like the API server: CEL is type-checked and priced only on a valid schema
        from .celcheck import compile_problems

        problems.extend(compile_problems(schema))
    return problems


def _node(node: Schema, path: str, problems: list[str], *, root: bool = False, correlatable: bool = True) -> None:
    where = path or "<root>"
    for key in _FORBIDDEN:
        if key in node and not (key == "uniqueItems" and node[key] is False):
            problems.append(f"{where}: {key} is not allowed in apiextensions.k8s.io/v1")
    int_or_string = bool(node.get("x-kubernetes-int-or-string"))
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    kind = node.get("type")
    if kind is None and not (int_or_string or preserve):
        problems.append(f"{where}: must specify type (or x-kubernetes-int-or-string / preserve-unknown-fields)")
    if kind is not None and kind not in _TYPES:
        problems.append(f"{where}: unknown type {kind!r}")
    if int_or_string and kind is not None:
        problems.append(f"{where}: x-kubernetes-int-or-string nodes must not set type")
    if "format" in node and node["format"] not in _FORMATS:
        problems.append(f"{where}: unsupported format {node['format']!r}")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{where}: additionalProperties: false is not allowed (unknown fields are pruned)")
    if ("properties" in node or "additionalProperties" in node) and kind != "object":
        problems.append(f"{where}: properties need type object")
    if "items" in node:
        if kind != "array":
            problems.append(f"{where}: items needs type array")
        if not isinstance(node["items"], dict):
            problems.append(f"{where}: items must be a single schema")
    elif kind == "array":
        problems.append(f"{where}: an array must specify items")
    for junctor in _JUNCTORS:
        if junctor in node:
            _junctor(node, junctor, where, problems, int_or_string)
    if "enum" in node and kind is not None:
        bad = [v for v in node["enum"] if not _matches_type(v, kind)]
        if bad:
            problems.append(f"{where}: enum values {bad!r} are not of type {kind}")
    if "default" in node:
        if root:
            problems.append("<root>: a default is not allowed at the root")
        else:
            _check_default(node, where, problems)
    for index, entry in enumerate(node.get("x-kubernetes-validations", [])):
        for key in ("rule", "messageExpression"):
            if key not in entry:
                continue
            try:
                compile_rule(entry[key])
            except RuleError as error:
                problems.append(f"{where}: x-kubernetes-validations[{index}].{key}: {error}")
        if "oldSelf" in entry.get("rule", "") and not correlatable:
            problems.append(f"{where}: x-kubernetes-validations[{index}] uses oldSelf where old values cannot be "
                            "correlated (inside a list that is not a list-type map)")
        if not entry.get("message") and not entry.get("messageExpression"):
            problems.append(f"{where}: x-kubernetes-validations[{index}] needs a message")
    _list_type(node, where, problems)
    for name, child in node.get("properties", {}).items():
        child_path = f"{path}.{name}" if path else name
        if root and name == "metadata":
            _metadata(child, problems)
        _node(child, child_path, problems, correlatable=correlatable)
    if isinstance(node.get("additionalProperties"), dict):
        _node(node["additionalProperties"], f"{where}.*", problems, correlatable=correlatable)
    if isinstance(node.get("items"), dict):
        _node(node["items"], f"{where}[*]", problems,
              correlatable=correlatable and node.get("x-kubernetes-list-type") == "map")


def _junctor(node: Schema, junctor: str, where: str, problems: list[str], int_or_string: bool) -> None:
    branches = node[junctor] if isinstance(node[junctor], list) else [node[junctor]]
    if junctor == "anyOf" and int_or_string and branches == _INT_OR_STRING:
        return
    for index, branch in enumerate(branches):
        for key in _JUNCTOR_FORBIDDEN:
            if key in branch:
                problems.append(f"{where}: {junctor}[{index}] must not set {key} to be structural")
        for name in branch.get("properties", {}):
            if name not in node.get("properties", {}):
                problems.append(f"{where}: {junctor}[{index}] names field {name!r} that is not declared outside")


def _metadata(node: Schema, problems: list[str]) -> None:
    allowed = {"type", "properties"}
    extra = set(node) - allowed
    if extra:
        problems.append(f"metadata: only type and restrictions of name/generateName are allowed, not {sorted(extra)}")
    for name in node.get("properties", {}):
        if name not in ("name", "generateName"):
            problems.append(f"metadata.{name}: only name and generateName may be restricted")


def _list_type(node: Schema, where: str, problems: list[str]) -> None:
    list_type = node.get("x-kubernetes-list-type")
    if list_type is None:
        if "x-kubernetes-list-map-keys" in node:
            problems.append(f"{where}: x-kubernetes-list-map-keys needs x-kubernetes-list-type map")
        return
    if list_type not in ("atomic", "set", "map"):
        problems.append(f"{where}: x-kubernetes-list-type must be atomic, set or map")
    if node.get("type") != "array":
        problems.append(f"{where}: x-kubernetes-list-type needs type array")
        return
    items = node.get("items", {})
    if list_type == "set" and items.get("type") not in ("string", "integer", "number", "boolean"):
        problems.append(f"{where}: a set must hold scalars")
    if list_type == "map":
        keys = node.get("x-kubernetes-list-map-keys") or []
        if not keys:
            problems.append(f"{where}: a list of type map needs x-kubernetes-list-map-keys")
        if items.get("type") != "object":
            problems.append(f"{where}: a list of type map must hold objects")
        for key in keys:
            prop = items.get("properties", {}).get(key)
            if prop is None:
                problems.append(f"{where}: list map key {key!r} is not a property of the items")
                continue
            if prop.get("type") not in ("string", "integer", "number", "boolean"):
                problems.append(f"{where}: list map key {key!r} must be a scalar")
            if key not in items.get("required", []) and "default" not in prop:
                problems.append(f"{where}: list map key {key!r} must be required or have a default")


def _matches_type(value: Any, kind: str) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }
    return checks[kind](value)


def _check_default(node: Schema, where: str, problems: list[str]) -> None:
    from .validation import validate_value

    # A default must survive pruning unchanged and pass the node's own validation.
    for problem in validate_value(node["default"], node, where):
        problems.append(f"{where}: default is invalid: {problem}")
