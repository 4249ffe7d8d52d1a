"""Fixtures for the training tests: tiny real model folders and a config factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from training_helpers import LOOP_TEST_OPTIONS

from kubetuner_trainer.config import TrainerConfig


@pytest.fixture
def make_cfg(tmp_path, tiny_model) -> Callable[..., TrainerConfig]:
    """A validated config for a tiny model; keyword arguments override options."""

    def make(family: str = "sd1x", **overrides: Any) -> TrainerConfig:
        values: dict[str, Any] = {
            "model_family": family,
            "model_type": "lora",
            "pretrained_model_name_or_path": str(tiny_model(family)),
            "output_dir": str(tmp_path / "out"),
            "optimizer": "adamw_bf16",
            "learning_rate": 1e-3,
            "lora_rank": 4,
            "mixed_precision": "no",
            "max_train_steps": 4,
            "seed": 7,
            **LOOP_TEST_OPTIONS,
        }
        values.update(overrides)
        return TrainerConfig.from_mapping(values, require=False)

    return make


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""
