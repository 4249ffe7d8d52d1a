"""Cross-option rules: each has a failing and a passing case."""

from __future__ import annotations

import pytest

from kubetuner_trainer.config.rules import COMPLETENESS_RULES, RULES, check_rules


def problems_for(values: dict) -> list[str]:
    """Problems of a complete config: a run length is given unless the case sets its own."""
    return [f"{p.option}: {p.message}" for p in check_rules({"max_train_steps": 10, **values})]


CASES = [
    # (name, bad values, the option the error must name, good values)
    (
        "offload modes",
        {"enable_group_offload": True, "enable_model_cpu_offload": True},
        "enable_model_cpu_offload",
        {"enable_group_offload": True, "enable_model_cpu_offload": False},
    ),
    ("ramtorch vs group offload", {"enable_group_offload": True, "ramtorch": True}, "ramtorch", {"ramtorch": True}),
    (
        "validation adapter",
        {"validation_adapter_path": "org/repo", "validation_adapter_config": [{"path": "a"}]},
        "validation_adapter_config",
        {"validation_adapter_path": "org/repo"},
    ),
    ("crepa block", {"crepa_enabled": True}, "crepa_block_index", {"crepa_enabled": True, "crepa_block_index": 8}),
    (
        "layersync student",
        {"layersync_enabled": True, "layersync_lambda": 0.2},
        "layersync_student_block",
        {"layersync_enabled": True, "layersync_lambda": 0.2, "layersync_student_block": 4},
    ),
    (
        "layersync weight",
        {"layersync_enabled": True, "layersync_lambda": 0.0, "layersync_student_block": 4},
        "layersync_lambda",
        {"layersync_enabled": False, "layersync_lambda": 0.0},
    ),
    ("diff2flow", {"diff2flow_loss": True}, "diff2flow_loss", {"diff2flow_loss": True, "diff2flow_enabled": True}),
    (
        "checkpointing interval",
        {"gradient_checkpointing_interval": 0},
        "gradient_checkpointing_interval",
        {"gradient_checkpointing_interval": 2},
    ),
    ("upscale threshold", {"max_upscale_threshold": 1.5}, "max_upscale_threshold", {"max_upscale_threshold": 0.2}),
    (
        "epochs and steps",
        {"num_train_epochs": 0, "max_train_steps": 0},
        "max_train_steps",
        {"num_train_epochs": 0, "max_train_steps": 10},
    ),
    (
        "external validation",
        {"validation_method": "external-script"},
        "validation_external_script",
        {"validation_method": "external-script", "validation_external_script": "/bin/v {global_step}"},
    ),
    (
        "quantization config needs pipeline",
        {"quantize_via": "cpu", "quantization_config": {"unet": {"load_in_4bit": True}}},
        "quantization_config",
        {"quantize_via": "pipeline", "quantization_config": {"unet": {"load_in_4bit": True}}},
    ),
    (
        "pipeline-only preset",
        {"quantize_via": "cpu", "base_model_precision": "nf4-bnb"},
        "base_model_precision",
        {"quantize_via": "pipeline", "base_model_precision": "nf4-bnb"},
    ),
    (
        "preset and quantization_config for the model",
        {"quantize_via": "pipeline", "base_model_precision": "int8-quanto", "quantization_config": {"unet": {}}},
        "base_model_precision",
        {"quantize_via": "pipeline", "base_model_precision": "no_change", "quantization_config": {"unet": {}}},
    ),
    (
        "text encoder preset and quantization_config",
        {"quantize_via": "pipeline", "text_encoder_1_precision": "int8-quanto", "quantization_config": {"text_encoder": {}}},
        "text_encoder_1_precision",
        {"quantize_via": "pipeline", "text_encoder_1_precision": "int8-quanto", "quantization_config": {"unet": {}}},
    ),
]


@pytest.mark.parametrize(("name", "bad", "option", "good"), CASES, ids=[c[0] for c in CASES])
def test_rule_fails_then_passes(name, bad, option, good):
    found = problems_for(bad)
    assert any(line.startswith(f"{option}:") for line in found), found
    assert problems_for(good) == []


def test_every_rule_has_a_case():
    # Each rule must be exercised: count the rules a bad case triggers.
    triggered = set()
    for _name, bad, _option, _good in CASES:
        for rule in RULES + COMPLETENESS_RULES:
            if rule(bad):
                triggered.add(rule.__name__)
    assert triggered == {rule.__name__ for rule in RULES + COMPLETENESS_RULES}


def test_completeness_rules_skip_partial_configs():
    assert check_rules({"num_train_epochs": None, "max_train_steps": None})
    assert check_rules({"num_train_epochs": None, "max_train_steps": None}, complete=False) == []


def test_rules_through_the_loader_name_the_option():
    from dataclasses import replace

    from kubetuner_trainer.config import ConfigError, TrainerConfig
    from kubetuner_trainer.options import Registry, get_registry

    registry = Registry(replace(o, implemented=True, implemented_choices=None) for o in get_registry())
    if "max_upscale_threshold" not in registry:
        pytest.skip("catalog lacks max_upscale_threshold")
    with pytest.raises(ConfigError, match="max_upscale_threshold"):
        TrainerConfig.from_mapping({"max_upscale_threshold": 2.0}, registry=registry, require=False)
