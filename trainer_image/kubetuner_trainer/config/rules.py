"""Cross-option rules: combinations the per-option types cannot express.

Each rule reads the resolved values (every option present, unset ones ``None``) and
returns the problems it finds. Rules only look at options that exist in the catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .errors import Problem

Values = Mapping[str, Any]
Rule = Callable[[Values], list[Problem]]

RULES: list[Rule] = []
# Rules about a run being complete enough to start; skipped for partial configs (require=False).
COMPLETENESS_RULES: list[Rule] = []

PIPELINE_ONLY_PRESETS = frozenset({"nf4-bnb"})
UNQUANTIZED = (None, "no_change")
#: the quantization preset options: the base model's, then one per text encoder in pipeline order
PRECISION_OPTIONS = ("base_model_precision", *(f"text_encoder_{i}_precision" for i in range(1, 5)))


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def completeness_rule(fn: Rule) -> Rule:
    COMPLETENESS_RULES.append(fn)
    return fn


def check_rules(values: Values, *, complete: bool = True) -> list[Problem]:
    """All problems found by every rule (completeness rules only when ``complete``)."""
    problems: list[Problem] = []
    for fn in RULES + (COMPLETENESS_RULES if complete else []):
        problems.extend(fn(values))
    return problems


def _on(values: Values, name: str) -> bool:
    return bool(values.get(name))


@rule
def offload_modes_are_exclusive(values: Values) -> list[Problem]:
    chosen = [n for n in ("enable_group_offload", "enable_model_cpu_offload", "ramtorch") if _on(values, n)]
    if len(chosen) > 1:
        return [
            Problem(
                chosen[1],
                True,
                f"cannot be combined with --{chosen[0]}; pick one of --enable_group_offload, "
                "--enable_model_cpu_offload, --ramtorch",
            )
        ]
    return []


@rule
def validation_adapter_path_or_config(values: Values) -> list[Problem]:
    if values.get("validation_adapter_path") and values.get("validation_adapter_config"):
        return [
            Problem(
                "validation_adapter_config",
                "<set>",
                "cannot be used together with --validation_adapter_path; give one adapter path or a config of runs",
            )
        ]
    return []


@rule
def crepa_needs_block_index(values: Values) -> list[Problem]:
    if _on(values, "crepa_enabled") and values.get("crepa_block_index") is None:
        return [Problem("crepa_block_index", None, "is required when --crepa_enabled is set (a transformer block index)")]
    return []


@rule
def layersync_needs_student_and_weight(values: Values) -> list[Problem]:
    if not _on(values, "layersync_enabled"):
        return []
    problems = []
    if values.get("layersync_student_block") is None:
        problems.append(
            Problem("layersync_student_block", None, "is required when --layersync_enabled is set (a block index)")
        )
    weight = values.get("layersync_lambda")  # unset means the documented 0.2 when enabled
    if weight is not None and weight <= 0:
        problems.append(Problem("layersync_lambda", weight, "must be greater than 0 when --layersync_enabled is set"))
    return problems


@rule
def diff2flow_loss_needs_bridge(values: Values) -> list[Problem]:
    if _on(values, "diff2flow_loss") and not _on(values, "diff2flow_enabled"):
        return [Problem("diff2flow_loss", True, "needs --diff2flow_enabled")]
    return []


@rule
def gradient_checkpointing_interval_positive(values: Values) -> list[Problem]:
    interval = values.get("gradient_checkpointing_interval")
    if interval is not None and interval <= 0:
        return [Problem("gradient_checkpointing_interval", interval, "must be greater than 0 (1 = every block)")]
    return []


@rule
def upscale_threshold_is_fraction(values: Values) -> list[Problem]:
    threshold = values.get("max_upscale_threshold")
    if threshold is not None and not 0 <= threshold <= 1:
        return [Problem("max_upscale_threshold", threshold, "must be between 0 and 1 inclusive")]
    return []


@completeness_rule
def epochs_or_steps(values: Values) -> list[Problem]:
    epochs, steps = values.get("num_train_epochs"), values.get("max_train_steps")
    if not epochs and not steps:
        return [
            Problem(
                "max_train_steps",
                steps,
                "and --num_train_epochs are both 0 or unset; set at least one of them above 0",
            )
        ]
    return []


@rule
def external_validation_needs_script(values: Values) -> list[Problem]:
    if values.get("validation_method") == "external-script" and not values.get("validation_external_script"):
        return [
            Problem(
                "validation_external_script",
                None,
                "is required when --validation_method=external-script (the command to run)",
            )
        ]
    return []


@rule
def quantization_presets_are_exclusive(values: Values) -> list[Problem]:
    problems: list[Problem] = []
    via = values.get("quantize_via")
    qconfig = values.get("quantization_config")
    if qconfig is not None and via is not None and via != "pipeline":
        problems.append(
            Problem("quantization_config", "<set>", f"only applies with --quantize_via=pipeline (got {via!r})")
        )
    precision_options = PRECISION_OPTIONS
    for name in precision_options:
        preset = values.get(name)
        if preset in PIPELINE_ONLY_PRESETS and via is not None and via != "pipeline":
            problems.append(
                Problem(name, preset, f"is a pipeline-only preset; it needs --quantize_via=pipeline (got {via!r})")
            )
    if isinstance(qconfig, dict):
        model_keys = {"unet", "transformer", "default"} & set(qconfig)
        if model_keys and values.get("base_model_precision") not in UNQUANTIZED:
            problems.append(
                Problem(
                    "base_model_precision",
                    values.get("base_model_precision"),
                    f"conflicts with --quantization_config entry {sorted(model_keys)[0]!r}; "
                    "quantize the model with one or the other",
                )
            )
        if any(key.startswith("text_encoder") for key in qconfig):
            for name in precision_options[1:]:
                if values.get(name) not in UNQUANTIZED:
                    problems.append(
                        Problem(
                            name,
                            values.get(name),
                            "conflicts with a text_encoder entry of --quantization_config; use one or the other",
                        )
                    )
    return problems
