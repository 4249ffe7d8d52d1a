"""Tiny real model folders (diffusers layout, ``save_pretrained``) for the adapter tests."""

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
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = BUILDERS[family](tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture
def model_cfg(tmp_path, tiny_model) -> Callable[..., TrainerConfig]:
    def make(family: str, **overrides: Any) -> TrainerConfig:
        values = {"model_family": family, "pretrained_model_name_or_path": str(tiny_model(family)),
                  "output_dir": str(tmp_path / "out")}
        values.update(overrides)
        return TrainerConfig.from_mapping(values, require=False)

    return make
