"""Tiny real model folders (diffusers layout, ``save_pretrained``) for the adapter tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kubetuner_trainer.config import TrainerConfig


@pytest.fixture
def model_cfg(tmp_path, tiny_model) -> Callable[..., TrainerConfig]:
    def make(family: str, **overrides: Any) -> TrainerConfig:
        values = {"model_family": family, "pretrained_model_name_or_path": str(tiny_model(family)),
                  "output_dir": str(tmp_path / "out")}
        values.update(overrides)
        return TrainerConfig.from_mapping(values, require=False)

    return make


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""
