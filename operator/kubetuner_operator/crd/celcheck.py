"""Type-check and cost-estimate the CRD's CEL rules the way kube-apiserver does when the CRD is created.

cel-python (``crd/cel.py``) only parses and evaluates; it never type-checks, so a rule that selects a
field the server cannot see compiles here and fails ``kubectl apply`` of the CRD. This module models
the server's two static checks:

* Declarations (k8s.io/apiserver/pkg/cel/common/schemas.go ``SchemaDeclType``): each schema node
  becomes a CEL type. A node without ``type`` (``x-kubernetes-preserve-unknown-fields`` alone) has
  none, so its parent object does not declare it and ``self.field`` / ``has(self.field)`` fail with
  "undefined field"; an object's declared fields are its ``properties`` only (preserved unknown
  fields are never visible); ``x-kubernetes-int-or-string`` is ``dyn``; the resource root also
  declares ``apiVersion``, ``kind`` and ``metadata.name``/``generateName``. Property names are
  escaped (``__dash__``, ``__dot__``, ``__slash__``, ``__underscores__``, reserved words).
  Operators and functions are checked for operand types (no ``int == double``, ``&&`` on bools).
* Cost (github.com/google/cel-go/checker/cost.go with the apiserver's size estimator): identifiers
  and selections cost 1, presence tests 1, O(1) calls 1, ``&&``/``||``/``?:`` the sum (worst branch),
  string equality/ordering ``0.1 * min(size)``, ``startsWith``/``endsWith`` ``0.1 * size(arg)``,
  ``contains`` ``0.1*size(s) * 0.1*size(arg)``, ``matches`` ``0.1*(size(s)+1) * 0.25*size(regex)``,
  ``in`` a list ``size(list)``, string ``+`` ``0.1 * size(result)``, list literals 10, map literals
  30, comprehensions ``range + init + result + n * (condition + step)`` with the macro expansions of
  cel-go's parser (``all``, ``exists``, ``exists_one``, ``filter``, ``map``). Sizes come from the
  schema: ``maxLength * 4`` bytes for strings (enum: longest value; unbounded: 3 MiB request size),
  ``maxItems``/``maxProperties`` for lists and maps, else the request size divided by the smallest
  serialized element. A value computed by a comprehension keeps no schema path, so the sizes of its
  elements are unknown (2^64-1, saturating) — the conservative reading where cel-go versions differ.

The limits are the apiserver's (k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/validation
and k8s.io/apiserver/pkg/apis/cel/config.go): ``StaticEstimatedCostLimit`` per expression (cost times
the node's cardinality, i.e. the product of the ``maxItems``/``maxProperties`` above it),
``StaticEstimatedCRDCostLimit`` for the sum over the CRD (rules times cardinality plus
messageExpressions), ``PerCallLimit`` for one evaluation at runtime and ``RuntimeCELCostBudget`` for
all evaluations of one object write.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from celpy import celparser
from lark import Token, Tree

Schema = dict[str, Any]

STATIC_ESTIMATED_COST_LIMIT = 10_000_000
STATIC_ESTIMATED_CRD_COST_LIMIT = 100_000_000
PER_CALL_LIMIT = 1_000_000
RUNTIME_CEL_COST_BUDGET = 10_000_000
MAX_REQUEST_SIZE_BYTES = 3 * 1024 * 1024
UNKNOWN = 2**64 - 1

# Minimum serialized sizes (k8s.io/apiserver/pkg/cel/types.go).
_MIN_SIZE = {"integer": 1, "number": 1, "boolean": 4, "string": 2}
_FORMAT_SIZES = {"duration": 4 + 2 + 20, "date": 10 + 2, "date-time": 32 + 2}
_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
             "import", "let", "loop", "package", "namespace", "return", "var", "void", "while"}
_PROPERTY_NAME = re.compile(r"^[a-zA-Z_.\-/][a-zA-Z0-9_.\-/]*$")
_MACROS = {"all", "exists", "exists_one", "filter", "map"}


def _sat(value: float) -> int:
    return UNKNOWN if value >= UNKNOWN else int(value)


def _factor(size: int, factor: float) -> int:
    return _sat(math.ceil(size * factor)) if size < UNKNOWN else UNKNOWN


def _mul(a: int, b: int) -> int:
    return _sat(a * b)


def _add(*values: int) -> int:
    return _sat(sum(values))


@dataclass
class CelType:
    """A CEL type with the apiserver's size estimate (string bytes, list items, map entries; scalars 1)."""

    kind: str  # object, map, list, string, int, uint, double, bool, bytes, null, dyn, type
    max_size: int = 1
    min_serialized: int = 1
    fields: dict[str, CelType] = field(default_factory=dict)
    elem: CelType | None = None

    def unsized(self) -> CelType:
        """The same type with every size unknown (a computed value without a schema path)."""
        size = UNKNOWN if self.kind in ("string", "bytes", "list", "map", "object") else self.max_size
        return replace(self, max_size=size, fields={k: v.unsized() for k, v in self.fields.items()},
                       elem=self.elem.unsized() if self.elem else None)


DYN = CelType("dyn", UNKNOWN)
BOOL = CelType("bool")
INT = CelType("int")


def escape(name: str) -> str | None:
    """The CEL name of a property (apiserver ``Escape``); None when CEL cannot reach it."""
    if not _PROPERTY_NAME.match(name):
        return None
    if name in _RESERVED:
        return f"__{name}__"
    out = name.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__")
    return out.replace("/", "__slash__")


def decl_type(schema: Schema, root: bool = False) -> CelType | None:
    """The CEL type the apiserver declares for a schema node; None when it declares none."""
    if schema.get("x-kubernetes-int-or-string"):
        return CelType("dyn", MAX_REQUEST_SIZE_BYTES - 2, 1)
    if root:
        schema = _with_type_meta(schema)
    kind = schema.get("type")
    if kind == "array":
        items = decl_type(schema.get("items") or {}, bool(schema.get("items", {}).get("x-kubernetes-embedded-resource")))
        if items is None:
            return None
        count = schema.get("maxItems", (MAX_REQUEST_SIZE_BYTES - 2) // (items.min_serialized + 1))
        return CelType("list", count, 2, elem=items)
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            values = decl_type(extra, bool(extra.get("x-kubernetes-embedded-resource")))
            if values is None:
                return None
            count = schema.get("maxProperties", (MAX_REQUEST_SIZE_BYTES - 2) // (2 + 1 + values.min_serialized + 1))
            return CelType("map", count, 2, elem=values)
        fields, minimum, required = {}, 2, set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            child = decl_type(prop, bool(prop.get("x-kubernetes-embedded-resource")))
            escaped = escape(name)
            if child is None or escaped is None:
                continue
            fields[escaped] = child
            if name in required and "default" not in prop:
                minimum += len(name) + child.min_serialized + 4
        return CelType("object", len(fields), minimum, fields=fields)
    if kind == "string":
        if "maxLength" in schema:
            size = max(0, schema["maxLength"]) * 4
        elif schema.get("enum"):
            size = max(len(str(v)) for v in schema["enum"])
        else:
            size = _FORMAT_SIZES.get(schema.get("format", ""), MAX_REQUEST_SIZE_BYTES - 2)
        return CelType("string", size, _MIN_SIZE["string"])
    if kind in ("integer", "number", "boolean"):
        return CelType({"integer": "int", "number": "double", "boolean": "bool"}[kind], 1, _MIN_SIZE[kind])
    return None  # untyped (x-kubernetes-preserve-unknown-fields alone): not declared to CEL


def _with_type_meta(schema: Schema) -> Schema:
    properties = dict(schema.get("properties", {}))
    for name in ("apiVersion", "kind"):
        properties.setdefault(name, {"type": "string"})
    metadata = dict(properties.get("metadata") or {"type": "object"})
    meta_props = dict(metadata.get("properties", {}))
    for name in ("name", "generateName"):
        meta_props.setdefault(name, {"type": "string"})
    properties["metadata"] = {**metadata, "type": "object", "properties": meta_props}
    return {**schema, "properties": properties}


class CelTypeError(ValueError):
    """A rule that the apiserver's CEL type checker rejects."""


@dataclass
class _Val:
    type: CelType
    cost: int
    literal: Any = None


def _size(value: _Val) -> int:
    if value.literal is not None and isinstance(value.literal, str | list):
        return len(value.literal)
    return value.type.max_size


def _compatible(a: CelType, b: CelType) -> bool:
    if "dyn" in (a.kind, b.kind) or "null" in (a.kind, b.kind):
        return True
    if a.kind != b.kind:
        return False
    if a.kind in ("list", "map") and a.elem and b.elem:
        return _compatible(a.elem, b.elem)
    return True


class _Checker:
    def __init__(self, self_type: CelType):
        type_names = ("int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type")
        self.scopes: list[dict[str, CelType]] = [{name: CelType("type") for name in type_names},
                                                 {"self": self_type, "oldSelf": self_type}]

    def lookup(self, name: str) -> CelType:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise CelTypeError(f"undeclared reference to '{name}'")

    def expr(self, tree: Tree | Token) -> _Val:
        method = getattr(self, f"_{tree.data}", None) if isinstance(tree, Tree) else None
        if method is None:
            raise CelTypeError(f"unsupported syntax: {getattr(tree, 'data', tree)}")
        return method(tree)

    # --- structure -----------------------------------------------------------------------------
    def _expr(self, tree: Tree) -> _Val:
        if len(tree.children) == 1 or tree.children[1] is None:
            return self.expr(tree.children[0])
        cond, yes, no = (self.expr(c) for c in tree.children)
        self._want(cond.type, "bool", "?:")
        if not _compatible(yes.type, no.type):
            raise CelTypeError(f"?: branches have different types ({yes.type.kind}, {no.type.kind})")
        result = yes.type if yes.type.kind != "dyn" else no.type
        result = replace(result, max_size=max(_size(yes), _size(no)))
        return _Val(result, _add(cond.cost, max(yes.cost, no.cost)))

    def _logical(self, tree: Tree, op: str) -> _Val:
        if len(tree.children) == 1 or tree.children[0] is None:
            return self.expr(tree.children[-1])
        left, right = self.expr(tree.children[0]), self.expr(tree.children[1])
        self._want(left.type, "bool", op)
        self._want(right.type, "bool", op)
        return _Val(BOOL, _add(left.cost, right.cost))

    def _conditionalor(self, tree: Tree) -> _Val:
        return self._logical(tree, "||")

    def _conditionaland(self, tree: Tree) -> _Val:
        return self._logical(tree, "&&")

    def _relation(self, tree: Tree) -> _Val:
        if len(tree.children) == 1 or tree.children[0] is None:
            return self.expr(tree.children[-1])
        op_tree, right_tree = tree.children
        op = op_tree.data
        left, right = self.expr(op_tree.children[0]), self.expr(right_tree)
        args = _add(left.cost, right.cost)
        if op == "relation_in":
            container = right.type
            if container.kind == "list":
                if container.elem and not _compatible(left.type, container.elem):
                    raise CelTypeError(f"'in' of {left.type.kind} in list of {container.elem.kind}")
                return _Val(BOOL, _add(container.max_size if right.literal is None else len(right.literal), args))
            if container.kind == "map":
                self._want(left.type, "string", "in")
                return _Val(BOOL, _add(1, args))
            if container.kind == "dyn":
                return _Val(BOOL, _add(1, args))
            raise CelTypeError(f"'in' needs a list or map, got {container.kind}")
        if op in ("relation_eq", "relation_ne"):
            if not _compatible(left.type, right.type):
                raise CelTypeError(f"found no matching overload for '{op[-2:]}' applied to "
                                   f"({left.type.kind}, {right.type.kind})")
        else:
            numeric = {"int", "uint", "double"}
            kinds = {left.type.kind, right.type.kind}
            if not (kinds <= numeric | {"dyn"} or _compatible(left.type, right.type)) or \
                    kinds & {"list", "map", "object", "null"}:
                raise CelTypeError(f"no ordering for ({left.type.kind}, {right.type.kind})")
        smallest = min(_size(left), _size(right))
        return _Val(BOOL, _add(_factor(smallest, 0.1), args))

    def _addition(self, tree: Tree) -> _Val:
        if len(tree.children) == 1 or tree.children[0] is None:
            return self.expr(tree.children[-1])
        op_tree, right_tree = tree.children
        left, right = self.expr(op_tree.children[0]), self.expr(right_tree)
        return self._arith(op_tree.data, left, right)

    def _multiplication(self, tree: Tree) -> _Val:
        return self._addition(tree)

    def _arith(self, op: str, left: _Val, right: _Val) -> _Val:
        if not _compatible(left.type, right.type):
            raise CelTypeError(f"found no matching overload for {op} applied to ({left.type.kind}, {right.type.kind})")
        kind = left.type if left.type.kind != "dyn" else right.type
        args = _add(left.cost, right.cost)
        if op == "addition_add" and kind.kind in ("string", "bytes", "list"):
            size = _add(_size(left), _size(right))
            cost = 1 if kind.kind == "list" else _factor(size, 0.1)
            return _Val(replace(kind, max_size=size), _add(cost, args))
        if kind.kind not in ("int", "uint", "double", "dyn"):
            raise CelTypeError(f"{op} is not defined on {kind.kind}")
        return _Val(kind, _add(1, args))

    def _unary(self, tree: Tree) -> _Val:
        if len(tree.children) == 1:
            return self.expr(tree.children[0])
        op, operand = tree.children
        value = self.expr(operand)
        if op.data == "unary_not":
            self._want(value.type, "bool", "!")
        elif value.type.kind not in ("int", "double", "dyn"):
            raise CelTypeError(f"unary - on {value.type.kind}")
        return _Val(value.type, _add(1, value.cost))

    def _member(self, tree: Tree) -> _Val:
        return self.expr(tree.children[0])

    def _primary(self, tree: Tree) -> _Val:
        return self.expr(tree.children[0])

    def _paren_expr(self, tree: Tree) -> _Val:
        return self.expr(tree.children[0])

    def _ident(self, tree: Tree) -> _Val:
        return _Val(self.lookup(str(tree.children[0])), 1)

    def _literal(self, tree: Tree) -> _Val:
        token: Token = tree.children[0]
        kinds = {"INT_LIT": "int", "UINT_LIT": "uint", "FLOAT_LIT": "double", "BOOL_LIT": "bool",
                 "NULL_LIT": "null", "BYTES_LIT": "bytes"}
        if token.type in ("STRING_LIT", "MLSTRING_LIT"):
            text = str(token)
            raw = text[:1] in "rR"
            body = text[1:] if raw else text
            quote = 3 if body[:3] in ('"""', "'''") else 1
            value = body[quote:-quote] if raw else ast.literal_eval(body)
            return _Val(CelType("string", len(value)), 0, value)
        return _Val(CelType(kinds[token.type]), 0)

    def _list_lit(self, tree: Tree) -> _Val:
        items = [self.expr(c) for c in (tree.children[0].children if tree.children and tree.children[0] else [])]
        elem = items[0].type if items else DYN
        for item in items[1:]:
            if not _compatible(elem, item.type):
                elem = DYN
        literal = [i.literal for i in items] if all(i.literal is not None for i in items) else [None] * len(items)
        return _Val(CelType("list", len(items), 2, elem=replace(elem, max_size=max([_size(i) for i in items] or [0]))),
                    _add(10, *(i.cost for i in items)), literal)

    def _map_lit(self, tree: Tree) -> _Val:
        parts = [self.expr(c) for c in (tree.children[0].children if tree.children and tree.children[0] else [])]
        values = parts[1::2]
        return _Val(CelType("map", len(values), 2, elem=values[0].type if values else DYN),
                    _add(30, *(p.cost for p in parts)))

    # --- selection, index, calls -------------------------------------------------------------------
    def _select(self, operand: _Val, name: str) -> CelType:
        target = operand.type
        if target.kind == "object":
            if name not in target.fields:
                raise CelTypeError(f"undefined field '{name}'")
            return target.fields[name]
        if target.kind == "map":
            return target.elem or DYN
        if target.kind == "dyn":
            return DYN
        raise CelTypeError(f"type '{target.kind}' does not support field selection ('{name}')")

    def _member_dot(self, tree: Tree) -> _Val:
        operand = self.expr(tree.children[0])
        result = self._select(operand, str(tree.children[1]))
        extra = 1 if operand.type.kind in ("object", "map") else 0
        return _Val(result, _add(operand.cost, extra))

    def _member_index(self, tree: Tree) -> _Val:
        operand, index = self.expr(tree.children[0]), self.expr(tree.children[1])
        kind = operand.type.kind
        if kind == "list":
            self._want(index.type, "int", "[]")
        elif kind == "map":
            self._want(index.type, "string", "[]")
        elif kind != "dyn":
            raise CelTypeError(f"type '{kind}' cannot be indexed")
        return _Val(operand.type.elem or DYN, _add(1, operand.cost, index.cost))

    def _ident_arg(self, tree: Tree) -> _Val:
        name = str(tree.children[0])
        args = tree.children[1].children if len(tree.children) > 1 and tree.children[1] else []
        if name == "has":
            return self._has(args)
        values = [self.expr(a) for a in args]
        cost = _add(*(v.cost for v in values))
        if name == "size" and len(values) == 1:
            self._sized(values[0].type, "size")
            return _Val(INT, _add(1, cost))
        conversions = {"int": INT, "uint": CelType("uint"), "double": CelType("double"), "bool": BOOL,
                       "string": CelType("string", UNKNOWN), "dyn": DYN, "type": CelType("type")}
        if name in conversions and len(values) == 1:
            return _Val(conversions[name], _add(1, cost))
        raise CelTypeError(f"undeclared reference to '{name}' (in container '')")

    def _has(self, args: list) -> _Val:
        if len(args) != 1:
            raise CelTypeError("has() takes one field selection")
        inner = _unwrap(args[0])
        if not (isinstance(inner, Tree) and inner.data == "member_dot"):
            raise CelTypeError("invalid argument to has() macro")
        operand = self.expr(inner.children[0])
        self._select(operand, str(inner.children[1]))
        return _Val(BOOL, _add(1, operand.cost))

    def _member_dot_arg(self, tree: Tree) -> _Val:
        name = str(tree.children[1])
        args = tree.children[2].children if len(tree.children) > 2 and tree.children[2] else []
        if name in _MACROS:
            return self._macro(tree.children[0], name, args)
        target = self.expr(tree.children[0])
        values = [self.expr(a) for a in args]
        cost = _add(target.cost, *(v.cost for v in values))
        kind = target.type.kind
        if name == "size" and not values:
            self._sized(target.type, "size")
            return _Val(INT, _add(1, cost))
        if kind not in ("string", "dyn"):
            raise CelTypeError(f"found no matching overload for '{name}' applied to '{kind}'")
        for value in values:
            self._want(value.type, "string", name)
        if name == "matches" and len(values) == 1:
            text = _factor(_add(_size(target), 1), 0.1)
            regex = _factor(_size(values[0]), 0.25)
            return _Val(BOOL, _add(_mul(text, regex), cost))
        if name in ("startsWith", "endsWith") and len(values) == 1:
            return _Val(BOOL, _add(_factor(_size(values[0]), 0.1), cost))
        if name == "contains" and len(values) == 1:
            return _Val(BOOL, _add(_mul(_factor(_size(target), 0.1), _factor(_size(values[0]), 0.1)), cost))
        if name in ("lowerAscii", "upperAscii", "trim") and not values:
            return _Val(replace(target.type), _add(_factor(_size(target), 0.1), cost))
        raise CelTypeError(f"undeclared reference to '{name}'")

    def _macro(self, target_tree: Tree, name: str, args: list) -> _Val:
        target = self.expr(target_tree)
        kind = target.type.kind
        if kind not in ("list", "map", "dyn"):
            raise CelTypeError(f"expression of type '{kind}' cannot be the range of a comprehension")
        if not args or not isinstance(_unwrap(args[0]), Tree) or _unwrap(args[0]).data != "ident":
            raise CelTypeError(f"{name}() needs an identifier as its first argument")
        variable = str(_unwrap(args[0]).children[0])
        element = (target.type.elem if kind == "list" else CelType("string", UNKNOWN if kind == "dyn" else
                                                                   target.type.max_size)) or DYN
        if kind == "map":
            element = CelType("string", MAX_REQUEST_SIZE_BYTES - 2)
        self.scopes.append({variable: element})
        try:
            bodies = [self.expr(a) for a in args[1:]]
        finally:
            self.scopes.pop()
        count = _size(target) if kind != "dyn" else UNKNOWN
        if name in ("all", "exists", "exists_one", "filter") or (name == "map" and len(bodies) == 2):
            if len(bodies) not in (1, 2) or (name != "map" and len(bodies) != 1):
                raise CelTypeError(f"{name}() takes a variable and a predicate")
            self._want(bodies[0].type, "bool", name)
        elif len(bodies) != 1:
            raise CelTypeError("map() takes a variable and a transform (and optionally a filter)")
        pred = bodies[0].cost
        if name == "all":
            per, fixed, result = 3 + pred, 1, BOOL
        elif name == "exists":
            per, fixed, result = 4 + pred, 1, BOOL
        elif name == "exists_one":
            per, fixed, result = 2 + pred, 2, BOOL
        elif name == "filter":
            per, fixed, result = 13 + pred, 11, CelType("list", count, 2, elem=element.unsized())
        elif len(bodies) == 1:
            per, fixed, result = 12 + pred, 11, CelType("list", count, 2, elem=bodies[0].type.unsized())
        else:
            per, fixed = _add(pred, 12, bodies[1].cost), 11
            result = CelType("list", count, 2, elem=bodies[1].type.unsized())
        return _Val(result, _add(target.cost, fixed, _mul(count, per)))

    def _want(self, value: CelType, kind: str, op: str) -> None:
        if value.kind not in (kind, "dyn"):
            raise CelTypeError(f"{op} needs {kind}, got {value.kind}")

    def _sized(self, value: CelType, op: str) -> None:
        if value.kind not in ("string", "bytes", "list", "map", "dyn"):
            raise CelTypeError(f"found no matching overload for '{op}' applied to '{value.kind}'")


def _unwrap(tree: Tree | Token) -> Tree | Token:
    """The innermost node of a chain of single-child wrappers (expr → ... → primary → ident)."""
    while isinstance(tree, Tree) and tree.data in ("expr", "conditionalor", "conditionaland", "relation", "addition",
                                                   "multiplication", "unary", "member", "primary") \
            and len([c for c in tree.children if c is not None]) == 1:
        tree = next(c for c in tree.children if c is not None)
    return tree


_PARSER = celparser.CELParser()


def check_expression(expression: str, self_type: CelType) -> int:
    """Type-check ``expression`` with ``self`` (and ``oldSelf``) of ``self_type``; its estimated max cost.

    Raises CelTypeError with the type checker's reason when the apiserver would not compile it.
    """
    try:
        tree = _PARSER.parse(expression)
    except celparser.CELParseError as error:
        raise CelTypeError(f"does not parse: {error}") from None
    return _Checker(self_type).expr(tree).cost


@dataclass
class RuleReport:
    """One rule (or messageExpression) of the schema, as the apiserver would judge it."""

    path: str
    index: int
    key: str  # rule or messageExpression
    expression: str
    cost: int = 0
    cardinality: int = 1
    error: str | None = None

    @property
    def expression_cost(self) -> int:
        """What counts against the limits: rules times cardinality, messageExpressions alone."""
        return _mul(self.cost, self.cardinality) if self.key == "rule" else self.cost


def rule_reports(schema: Schema) -> list[RuleReport]:
    """Type-check and price every ``x-kubernetes-validations`` entry of a CRD's openAPIV3Schema."""
    reports: list[RuleReport] = []
    _walk(schema, "", 1, True, reports)
    return reports


def _walk(node: Schema, path: str, cardinality: int, root: bool, reports: list[RuleReport]) -> None:
    declared = decl_type(node, root)
    for index, entry in enumerate(node.get("x-kubernetes-validations", [])):
        for key in ("rule", "messageExpression"):
            if key not in entry:
                continue
            report = RuleReport(path or "<root>", index, key, entry[key], cardinality=cardinality)
            if declared is None:
                report.error = "failed to retrieve type information (the node has no type)"
            else:
                try:
                    report.cost = check_expression(entry[key], declared)
                except CelTypeError as error:
                    report.error = str(error)
            reports.append(report)
    for name, child in node.get("properties", {}).items():
        _walk(child, f"{path}.{name}" if path else name, cardinality, False, reports)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        bound = node.get("maxProperties")
        values = decl_type(extra)
        if bound is None and values is not None:
            bound = (MAX_REQUEST_SIZE_BYTES - 2) // (2 + 1 + values.min_serialized + 1)
        _walk(extra, f"{path}.*", _mul(cardinality, bound or UNKNOWN), False, reports)
    items = node.get("items")
    if isinstance(items, dict):
        bound = node.get("maxItems")
        element = decl_type(items)
        if bound is None and element is not None:
            bound = (MAX_REQUEST_SIZE_BYTES - 2) // (element.min_serialized + 1)
        _walk(items, f"{path}[*]", _mul(cardinality, bound or UNKNOWN), False, reports)


def cost_problems(reports: list[RuleReport]) -> list[str]:
    """The apiserver's static cost refusals for these rules ([] = the CRD installs)."""
    problems = [f"{r.path}: x-kubernetes-validations[{r.index}].{r.key}: estimated cost {r.expression_cost} "
                f"exceeds StaticEstimatedCostLimit {STATIC_ESTIMATED_COST_LIMIT}"
                for r in reports if r.error is None and r.expression_cost > STATIC_ESTIMATED_COST_LIMIT]
    total = _add(*(r.expression_cost for r in reports if r.error is None))
    if total > STATIC_ESTIMATED_CRD_COST_LIMIT:
        problems.append(f"estimated rule cost total {total} exceeds StaticEstimatedCRDCostLimit "
                        f"{STATIC_ESTIMATED_CRD_COST_LIMIT}")
    return problems


def compile_problems(schema: Schema) -> list[str]:
    """Every reason the apiserver would refuse the schema's CEL rules at CRD creation ([] = fine)."""
    reports = rule_reports(schema)
    problems = [f"{r.path}: x-kubernetes-validations[{r.index}].{r.key}: {r.error}: {r.expression!r}"
                for r in reports if r.error]
    return problems + cost_problems(reports)
