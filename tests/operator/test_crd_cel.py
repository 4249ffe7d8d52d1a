"""The CRD's CEL rules as kube-apiserver judges them at CRD creation: type-checked against the
structural schema (what a rule may select) and priced within the server's cost limits.

cel-python only parses; these tests use ``celcheck``, our model of the server's checker and cost
estimator, and first show that the model refuses what the server refuses.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetuner_operator.crd import trainingjob_openapi_schema
from kubetuner_operator.crd.celcheck import (
    PER_CALL_LIMIT,
    RUNTIME_CEL_COST_BUDGET,
    STATIC_ESTIMATED_COST_LIMIT,
    CelTypeError,
    check_expression,
    compile_problems,
    decl_type,
    escape,
    rule_reports,
)
from kubetuner_operator.owned_options import OWNED_OPTIONS


def _with_rule(properties: dict[str, Any], expression: str, **node: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"spec": {
        "type": "object", "properties": properties, **node,
        "x-kubernetes-validations": [{"rule": expression, "message": "m"}]}}}


STRING = {"type": "string", "maxLength": 64}
PRESERVED = {"x-kubernetes-preserve-unknown-fields": True}


@pytest.mark.parametrize(("properties", "expression", "expected"), [
    # The issue's finding: an untyped (preserve-unknown-only) property is not declared to CEL.
    ({"cache_dir": PRESERVED}, "!has(self.cache_dir)", "undefined field 'cache_dir'"),
    ({"cache_dir": PRESERVED}, "self.cache_dir == 'x'", "undefined field 'cache_dir'"),
    ({"a": STRING}, "has(self.b)", "undefined field 'b'"),
    # A typed object that preserves unknown fields declares only its properties.
    ({"o": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"x": STRING}}},
     "has(self.o.y)", "undefined field 'y'"),
    ({"n": {"type": "number"}}, "self.n == 1", "no matching overload"),
    ({"n": {"type": "integer"}}, "self.n + 1.0 > 2.0", "no matching overload"),
    ({"a": STRING}, "self.a && true", "needs bool"),
    ({"a": STRING}, "self.a.b == 'x'", "does not support field selection"),
    ({"l": {"type": "array", "maxItems": 4, "items": STRING}}, "self.l.all(x, x.size())", "needs bool"),
    ({"a": STRING}, "lookup(self.a)", "undeclared reference to 'lookup'"),
    ({"a": STRING}, "self.a.reverse() == ''", "undeclared reference"),
    ({"a": STRING}, "other.a == ''", "undeclared reference to 'other'"),
    ({"my-field": STRING}, "has(self.my-field)", ""),  # parses as a subtraction of an undeclared 'field'
])
def test_type_checker_refuses_what_the_api_server_refuses(properties, expression, expected):
    problems = compile_problems(_with_rule(properties, expression))
    assert problems and expected in problems[0], problems


@pytest.mark.parametrize(("properties", "expression"), [
    ({"a": STRING}, "has(self.a) && self.a.matches('^[a-z]+$')"),
    ({"my-field": STRING}, "has(self.my__dash__field)"),
    ({"q": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}},
     "type(self.q) == string || self.q > 0"),
    ({"n": {"type": "number"}, "i": {"type": "integer"}}, "self.n >= 1.0 && self.i < self.n"),
    ({"m": {"type": "object", "maxProperties": 8, "additionalProperties": STRING}},
     "self.m.all(k, !k.startsWith('x/') && self.m[k] != '')"),
    ({"l": {"type": "array", "maxItems": 8, "items": {"type": "object", "properties": {"id": STRING},
                                                      "required": ["id"]}}},
     "self.l.exists_one(e, e.id == 'a') || self.l.filter(e, e.id in ['a', 'b']).size() == 0"),
])
def test_type_checker_accepts_what_the_api_server_accepts(properties, expression):
    assert compile_problems(_with_rule(properties, expression)) == []


def test_resource_root_declares_type_meta_and_metadata_name():
    root = {"type": "object", "properties": {"spec": {"type": "object", "properties": {}}},
            "x-kubernetes-validations": [{"rule": "self.metadata.name.size() <= 52 && self.kind == 'TrainingJob'",
                                          "message": "m"}]}
    assert compile_problems(root) == []
    root["x-kubernetes-validations"][0]["rule"] = "has(self.metadata.labels)"
    assert "undefined field 'labels'" in compile_problems(root)[0]


def test_a_rule_on_an_untyped_node_has_no_type_information():
    schema = {"type": "object", "properties": {"free": {
        **PRESERVED, "x-kubernetes-validations": [{"rule": "true", "message": "m"}]}}}
    assert "type information" in compile_problems(schema)[0]


def test_property_names_are_escaped_like_the_api_server_does():
    assert escape("a-b") == "a__dash__b"
    assert escape("a.b/c") == "a__dot__b__slash__c"
    assert escape("x__y") == "x__underscores__y"
    assert escape("namespace") == "__namespace__"
    assert escape("bad key") is None


def test_string_costs_grow_with_max_length_and_regex_length():
    def cost(max_length: int, expression: str) -> int:
        return check_expression(expression, decl_type({"type": "string", "maxLength": max_length}))

    assert cost(1000, "self.matches('^a+$')") > cost(100, "self.matches('^a+$')") * 9
    assert cost(100, "self.matches('^(a|b|c|d|e|f)+$')") > cost(100, "self.matches('^a+$')")
    # startsWith is priced by the prefix, not the string.
    assert cost(1000, "self.startsWith('ab')") == cost(10, "self.startsWith('ab')")
    unbounded = check_expression("self.contains('x')", decl_type({"type": "string"}))
    assert unbounded > cost(64, "self.contains('x')") * 1000


def test_comprehension_costs_scale_with_max_items_and_nest():
    def cost(max_items: int, expression: str) -> int:
        return check_expression(expression, decl_type({"type": "array", "maxItems": max_items, "items": STRING}))

    assert cost(200, "self.all(x, x == 'a')") == pytest.approx(2 * cost(100, "self.all(x, x == 'a')"), rel=0.02)
    nested = cost(100, "self.all(x, self.exists(y, y == x))")
    assert nested > 100 * cost(100, "self.exists(y, y == 'a')") * 0.9


def test_unbounded_lists_are_refused_by_the_per_rule_limit():
    schema = _with_rule({"l": {"type": "array", "items": {"type": "string"}}},
                        "self.l.all(x, x.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))")
    assert any("StaticEstimatedCostLimit" in p for p in compile_problems(schema))
    schema["properties"]["spec"]["properties"]["l"].update(maxItems=16)
    schema["properties"]["spec"]["properties"]["l"]["items"].update(maxLength=63)
    assert compile_problems(schema) == []


def test_rules_inside_lists_count_once_per_possible_item():
    item = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4096}},
            "x-kubernetes-validations": [{"rule": "self.s.matches('^[a-z]+$')", "message": "m"}]}
    inner = {"type": "array", "maxItems": 100, "items": item}
    schema = {"type": "object", "properties": {"outer": {"type": "array", "maxItems": 100, "items": {
        "type": "object", "properties": {"inner": inner}}}}}
    (report,) = rule_reports(schema)
    assert report.cardinality == 100 * 100
    assert report.cost <= STATIC_ESTIMATED_COST_LIMIT < report.expression_cost
    assert any("StaticEstimatedCostLimit" in p for p in compile_problems(schema))


def test_message_expressions_on_values_without_a_schema_path_are_unbounded():
    expression = "'first: ' + self.l.filter(e, e.size() > 3)[0]"
    schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": {
        "l": {"type": "array", "maxItems": 4, "items": STRING}}, "x-kubernetes-validations": [
        {"rule": "true", "message": "m", "messageExpression": expression}]}}}
    assert any("messageExpression: estimated cost" in p for p in compile_problems(schema))
    with pytest.raises(CelTypeError):
        check_expression("'n: ' + self.size()", decl_type(STRING))


def test_every_rule_of_the_trainingjob_crd_compiles_under_the_api_servers_type_rules():
    schema = trainingjob_openapi_schema()
    reports = rule_reports(schema)
    assert len(reports) >= 60
    assert [f"{r.path}[{r.index}]: {r.error}" for r in reports if r.error] == []
    assert compile_problems(schema) == []


def test_owned_options_are_typed_so_their_rules_compile():
    config = trainingjob_openapi_schema()["properties"]["spec"]["properties"]["config"]
    for name in OWNED_OPTIONS:
        assert config["properties"][name].get("type") in ("string", "integer", "number", "boolean"), name
    declared = decl_type(config)
    assert set(OWNED_OPTIONS) <= set(declared.fields)


def test_trainingjob_rules_fit_the_runtime_budgets_too():
    # Static limits decide whether the CRD installs; the runtime ones whether a worst-case object can be
    # validated at all: each evaluation within PerCallLimit, one write's evaluations within the budget.
    reports = [r for r in rule_reports(trainingjob_openapi_schema()) if r.key == "rule"]
    assert max(r.cost for r in reports) <= PER_CALL_LIMIT
    assert sum(r.expression_cost for r in reports) <= RUNTIME_CEL_COST_BUDGET


def test_every_string_and_list_a_trainingjob_rule_touches_is_bounded():
    # Cardinality of every rule's node is bounded by maxItems/maxProperties (no fallback estimate).
    def walk(node: dict[str, Any], bounded: bool):
        if node.get("x-kubernetes-validations"):
            assert bounded
        for child in node.get("properties", {}).values():
            walk(child, bounded)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], bounded and "maxProperties" in node)
        if isinstance(node.get("items"), dict):
            walk(node["items"], bounded and "maxItems" in node)

    walk(trainingjob_openapi_schema(), True)


def test_every_string_list_and_map_of_the_trainingjob_is_bounded():
    # Sizes bound the API server's CEL cost estimates and keep objects and the rendered files small.
    # Only the JSON-valued trainer options are free-form (preserve-unknown); the size check of the pod
    # annotations carrying the rendered files covers them (admission.annotation_problems).
    unbounded, free = [], []

    def walk(node: dict[str, Any], path: str) -> None:
        kind = node.get("type")
        if kind == "string" and not ({"maxLength", "enum", "format"} & set(node)):
            unbounded.append(path)
        if kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        if isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
            unbounded.append(path)
        if kind is None and node.get("x-kubernetes-preserve-unknown-fields"):
            free.append(path)
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[*]")

    walk(trainingjob_openapi_schema(), "")
    assert unbounded == []
    from kubetuner_trainer.options import get_registry

    json_options = {f".spec.config.{o.name}" for o in get_registry() if o.type == "json"}
    assert set(free) <= json_options, set(free) - json_options
