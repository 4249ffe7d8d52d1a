"""Options written at SimpleTuner's own defaults (or at an "off" value) are accepted.

SimpleTuner's web UI and ``configure`` write every default out explicitly, so a config written
for SimpleTuner names many options kubetuner has not built, at values that ask for nothing.
Each option's ``upstream`` record (options/model.py) says what those values are.
"""

from __future__ import annotations

import pytest

from kubetuner_trainer.config import ConfigError, TrainerConfig
from kubetuner_trainer.options import get_registry

BASE = {
    "model_family": "sdxl",
    "model_type": "lora",
    "optimizer": "adamw_bf16",
    "output_dir": "/tmp/out",
    "data_backend_config": "/tmp/multidatabackend.json",
    "max_train_steps": 10,
}
OPTIONS = list(get_registry())


def _problems_about(values: dict, name: str) -> list[str]:
    try:
        TrainerConfig.from_mapping(values)
    except ConfigError as error:
        return [str(p) for p in error.problems if p.option == name]
    return []


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.simpletuner_default is not None], ids=lambda o: o.name)
def test_simpletuner_default_is_accepted(option):
    """Every option set explicitly to SimpleTuner's default loads (rule 1 of issue 9)."""
    values = {**BASE, option.name: option.simpletuner_default}
    assert _problems_about(values, option.name) == []


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.upstream.off], ids=lambda o: o.name)
def test_off_values_are_accepted(option):
    for value in option.upstream.off:
        assert _problems_about({**BASE, option.name: value}, option.name) == [], value


def test_every_default_written_out_at_once_loads():
    """A config as SimpleTuner's web UI writes it: every option it knows, at its default."""
    everything = {o.name: o.simpletuner_default for o in OPTIONS if o.simpletuner_default is not None}
    cfg = TrainerConfig.from_mapping({**everything, **BASE})
    assert cfg.lora_type == "standard" and cfg.is_set("lora_type")


@pytest.mark.parametrize(
    ("name", "value"),
    [("crepa_enabled", True), ("scheduled_sampling_max_step_offset", 10), ("validation_preview", True),
     ("text_encoder_limit", 8)],
)
def test_other_values_of_unbuilt_options_are_still_refused_by_name(name, value):
    problems = _problems_about({**BASE, name: value}, name)
    assert len(problems) == 1 and "not implement" in problems[0], problems


def test_refusal_names_simpletuner_default():
    (problem,) = _problems_about({**BASE, "text_encoder_limit": 8}, "text_encoder_limit")
    assert "set it to 100" in problem


@pytest.mark.parametrize("raw", [False, "false", "", "False"])
def test_false_or_empty_text_leaves_a_choice_option_unset(raw):
    """SimpleTuner's JSON loader drops ``false`` and an empty text (issue 9, item 2)."""
    cfg = TrainerConfig.from_mapping({**BASE, "skip_file_discovery": raw, "dynamo_mode": raw})
    assert cfg.skip_file_discovery is None and cfg.dynamo_mode is None


def test_false_is_still_a_value_for_booleans_and_not_for_numbers():
    cfg = TrainerConfig.from_mapping({**BASE, "gradient_checkpointing": "false", "validation_seed": ""})
    assert cfg.gradient_checkpointing is False and cfg.validation_seed is None
    with pytest.raises(ConfigError, match="train_batch_size"):
        TrainerConfig.from_mapping({**BASE, "train_batch_size": "four"})
