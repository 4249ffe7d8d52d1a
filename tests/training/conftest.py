"""Fixtures for the training tests: tiny real model folders and a config factory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.models.tiny import BUILDERS


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: these tests run in parallel (xdist) next to other suites on few cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model("sdxl")`` → a diffusers folder saved with ``save_pretrained`` (built once per session)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = BUILDERS[family](tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


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
        }
        values.update(overrides)
        return TrainerConfig.from_mapping(values, require=False)

    return make
