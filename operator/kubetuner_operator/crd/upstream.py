"""corev1 types in the CRD, taken from the upstream Kubernetes OpenAPI schemas.

``spec.podTemplate.affinity`` is a real ``corev1.Affinity``, not a free object, so typos such as
``nodeAfinity`` and bad values are refused at apply time instead of being dropped by the server.
The source is the JSON schema set that kubernetes-validate ships (a test dependency only): the
needed definitions are extracted, ``$ref``s inlined and made structural (no ``null`` types, no
``additionalProperties: false``, descriptions only at the top) into ``upstream_schemas.json``, which
the CRD generator reads. Regenerate with ``python -m kubetuner_operator.crd.upstream --write``; a test
compares the file with a fresh extraction.
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from pathlib import Path
from typing import Any

Schema = dict[str, Any]

GENERATED = Path(__file__).with_name("upstream_schemas.json")
# The definitions the CRD uses, by OpenAPI name.
TYPES = {"Affinity": "io.k8s.api.core.v1.Affinity"}
# Bounds added to every upstream list/string/map: the API server prices CEL and stores objects by size.
MAX_ITEMS, MAX_LENGTH, MAX_PROPERTIES = 64, 1024, 64
_KEEP = ("type", "properties", "items", "additionalProperties", "required", "format", "enum",
         "x-kubernetes-map-type", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
         "x-kubernetes-int-or-string")


def upstream(name: str) -> Schema:
    """The structural schema of corev1 type ``name`` (a key of TYPES), as checked in."""
    return json.loads(json.dumps(_generated()["types"][name]))


@cache
def _generated() -> dict[str, Any]:
    return json.loads(GENERATED.read_text(encoding="utf-8"))


def definitions_path(version: str) -> Path:
    """kubernetes-validate's ``_definitions.json`` of a Kubernetes version (e.g. ``1.35.0``)."""
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return root / f"v{version}-local" / "_definitions.json"


def extract(definitions: dict[str, Schema], name: str, description: str = "") -> Schema:
    """Inline and make structural the definition ``name`` of an OpenAPI ``$defs`` table."""
    node = _structural(definitions, definitions[name], ())
    if description:
        node["description"] = description
    return node


def _structural(definitions: dict[str, Schema], node: Schema, seen: tuple[str, ...]) -> Schema:
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        if ref in seen:
            raise ValueError(f"recursive definition {ref}")
        return _structural(definitions, definitions[ref], (*seen, ref))
    out: Schema = {}
    for key in _KEEP:
        if key not in node:
            continue
        value = node[key]
        if key == "type":
            kinds = [v for v in (value if isinstance(value, list) else [value]) if v != "null"]
            out["type"] = kinds[0]
        elif key == "properties":
            out["properties"] = {k: _structural(definitions, v, seen) for k, v in sorted(value.items())}
        elif key in ("items", "additionalProperties"):
            if isinstance(value, dict):
                out[key] = _structural(definitions, value, seen)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") or "oneOf" in node:
        out = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    kind = out.get("type")
    if kind == "array":
        out["maxItems"] = MAX_ITEMS
    elif kind == "string" and "enum" not in out and "format" not in out:
        out["maxLength"] = MAX_LENGTH
    elif kind == "object" and "additionalProperties" in out:
        out["maxProperties"] = MAX_PROPERTIES
    return out


def generate(version: str) -> dict[str, Any]:
    """The content of ``upstream_schemas.json`` from kubernetes-validate's schemas of ``version``."""
    definitions = json.loads(definitions_path(version).read_text(encoding="utf-8"))["$defs"]
    return {"source": f"kubernetes-validate v{version}-local",
            "types": {short: extract(definitions, full) for short, full in sorted(TYPES.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help="Kubernetes version of the source schemas (default: the checked-in one)")
    parser.add_argument("--write", action="store_true", help=f"write {GENERATED.name} instead of printing it")
    args = parser.parse_args(argv)
    version = args.version or _generated()["source"].split(" v", 1)[1].removesuffix("-local")
    text = json.dumps(generate(version), indent=1, sort_keys=True) + "\n"
    if args.write:
        GENERATED.write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
