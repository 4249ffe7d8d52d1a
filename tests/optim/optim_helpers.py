"""Shared helpers for the optim tests: configs and a tiny real regression problem."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import Any

import torch

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.options import Registry, get_registry


def make_cfg(**values: Any) -> TrainerConfig:
    """A config through the real registry: refused if an option/choice is not marked implemented."""
    return TrainerConfig.from_mapping(values, require=False)


@cache
def _permissive_registry() -> Registry:
    return Registry(replace(o, implemented=True, implemented_choices=None) for o in get_registry())


def make_any_cfg(**values: Any) -> TrainerConfig:
    """A config with every option treated as implemented (to reach the optimizer's own checks)."""
    return TrainerConfig.from_mapping(values, require=False, registry=_permissive_registry())


def optimizer_choices() -> tuple[str, ...]:
    return tuple(get_registry().get("optimizer").choices)


def implemented_optimizers() -> frozenset[str]:
    return frozenset(get_registry().get("optimizer").implemented_choices or ())


# A learning rate that suits each kind of optimizer on the toy problem.
LEARNING_RATES = {"prodigy": 1.0, "optimi-lion": 2e-3, "optimi-sgd": 0.05, "optimi-adan": 1e-2, "optimi-ranger": 3e-2,
                  "sdnq-adafactor": 0.1}
EXTRA_CONFIG = {"optimi-sgd": "momentum=0.9"}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An MLP with one 64x64 weight (large enough for torchao's quantised state)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    return model.to(dtype)


def regression_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(64, 8, generator=generator)
    teacher = torch.randn(8, 1, generator=generator)
    targets = torch.sin(inputs @ teacher)
    return inputs, targets


def loss_of(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = data
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(inputs.to(dtype)).float(), targets)


def train_steps(model, optimizer, data, steps: int, scheduler=None) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = loss_of(model, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses
