"""The schema of ``spec.config``: trainer options, generated from the option registry.

The option types, choices and bounds come from ``options_json_schema`` (one source of truth
for the CLI, config files and the CRD). Options the operator owns stay in the schema, typed like the
option, so that a CEL rule can reject them with a message naming the spec field to use instead; as
unknown fields they would only be pruned or reported as "unknown field". They must be typed: the API
server declares only typed properties to CEL, and a rule selecting an untyped one does not compile.
"""

from __future__ import annotations

from kubetuner_trainer.options import get_registry
from kubetuner_trainer.options.schema import option_json_schema, options_json_schema

from ..owned_options import OWNED_OPTIONS
from .dataset_rules import config_rules
from .fields import Schema, rule

# Where each operator-owned option comes from; used in the rejection message.
OWNED_BY: dict[str, str] = {
    "model_family": "spec.model.family",
    "model_flavour": "spec.model.flavour",
    "model_type": "spec.model.type",
    "pretrained_model_name_or_path": "spec.model.source",
    "revision": "spec.model.source.hub.revision",
    "variant": "spec.model.source.hub.variant",
    "output_dir": "spec.output",
    "logging_dir": "spec.output",
    "data_backend_config": "spec.datasets",
    "resume_from_checkpoint": "its restart handling (it resumes from the latest checkpoint)",
    "num_processes": "spec.resources.gpus and spec.nodes",
    "metrics_port": "spec.metricsPort",
    "cache_dir": "spec.caches.latents",
    "cache_dir_vae": "spec.caches.latents",
    "cache_dir_text": "spec.caches.latents",
}


def config_schema() -> Schema:
    """``spec.config``: every trainer option by its canonical name, typed; owned options rejected."""
    # closed=False: a structural schema may not combine properties with additionalProperties: false;
    # the API server reports unknown fields itself (kubectl's default strict field validation).
    options = options_json_schema(exclude=OWNED_OPTIONS, closed=False)
    properties: dict[str, Schema] = dict(options["properties"])
    rules = []
    registry = get_registry()
    for name in sorted(OWNED_OPTIONS):
        where = OWNED_BY.get(name, "the TrainingJob spec")
        placeholder = {key: value for key, value in option_json_schema(registry.get(name)).items()
                       if key in ("type", "maxLength", "x-kubernetes-preserve-unknown-fields")}
        properties[name] = {**placeholder, "description": f"Not allowed here: the operator sets it from {where}."}
        rules.append(rule(f"!has(self.{name})",
                          f"{name} is set by the operator from {where}; remove it from spec.config",
                          fieldPath=f".{name}", reason="FieldValueForbidden"))
    node: Schema = {
        "type": "object",
        "description": "Trainer options by SimpleTuner's names (without the leading --). Unknown names are "
                       "rejected; options the operator derives from other spec fields are not allowed.",
        "properties": dict(sorted(properties.items())),
        "x-kubernetes-validations": rules + config_rules(),
    }
    if options.get("required"):
        node["required"] = sorted(options["required"])
    return node
