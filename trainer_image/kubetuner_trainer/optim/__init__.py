"""Optimizers, learning-rate schedules and EMA for the training loop.

```python
opt = build_optimizer(cfg, [{"params": [...], "lr": 1e-4, "name": "unet"}, ...])
sched = build_lr_scheduler(cfg, opt, num_training_steps)
ema = EMAModel(params, cfg); ema.step(params)
optimizer_train_mode(opt)  # before training steps; optimizer_eval_mode(opt) before validation/saving
```

Schedule-free optimizers hold two weight sequences; ``optimizer_eval_mode`` puts the averaged
one (the weights to validate and save) into the model and ``optimizer_train_mode`` switches
back. The switch is not bit-exact reversible, so for an exact resume a loop must switch to
eval before writing a checkpoint and back to train after it, in every run alike (a resumed
run then calls ``optimizer_train_mode`` after loading). For other optimizers both are no-ops.
Optimizer, scheduler and EMA state all load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..config import MISSING, ConfigError, Problem
from ._settings import setting
from .ema import EMAModel
from .gradient_release import GradientRelease, releases_gradients
from .optimizer_config import OptimizerConfigError, parse_optimizer_config
from .optimizers import OPTIMIZERS, OptimizerSpec, optimizer_kwargs, optimizer_spec
from .preflight import optimizer_problems, preflight_problems, preflight_warnings, scheduler_problems
from .schedulers import SCHEDULERS, lr_scale_factor
from .schedulers import build_lr_scheduler as _build_lr_scheduler

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "EMAModel",
    "OptimizerConfigError",
    "OptimizerSpec",
    "build_lr_scheduler",
    "GradientRelease",
    "build_optimizer",
    "lr_scale_factor",
    "optimizer_eval_mode",
    "optimizer_spec",
    "optimizer_train_mode",
    "parse_optimizer_config",
    "releases_gradients",
    "preflight_problems",
    "preflight_warnings",
]


def _raise(problems: list[Problem]) -> None:
    if problems:
        raise ConfigError(problems)


def build_optimizer(cfg: Any, param_groups: Iterable[Mapping[str, Any]]) -> torch.optim.Optimizer:
    """The ``--optimizer`` for these param groups (each: ``params``, ``lr``, optional ``name``).

    Group learning rates are multiplied by ``lr_scale_factor(cfg)`` (``--lr_scale``). Extra
    group keys (``name``) are kept. Schedule-free optimizers come back in train mode. Raises
    ConfigError for the optimizer problems ``preflight_problems`` reports.
    """
    if setting(cfg, "optimizer") is None:
        _raise([Problem("optimizer", MISSING, f"is required; choose one of: {', '.join(OPTIMIZERS)}")])
    _raise(optimizer_problems(cfg))
    spec = optimizer_spec(setting(cfg, "optimizer"))
    scale = lr_scale_factor(cfg)
    groups = []
    dtypes = []
    for group in param_groups:
        params = list(group["params"])
        if not params:
            continue
        copied = dict(group, params=params)
        copied["lr"] = float(group.get("lr", setting(cfg, "learning_rate"))) * scale
        groups.append(copied)
        dtypes.extend(p.dtype for p in params)
    if not groups:
        raise ValueError("build_optimizer: no parameters to optimize (all groups empty)")
    kwargs = optimizer_kwargs(cfg, spec, dtypes)
    kwargs["lr"] = groups[0]["lr"]
    if spec.plain_groups:  # the class takes no keys of its own; the names come back after construction
        extras = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in groups]
        optimizer = spec.load()([{"params": g["params"], "lr": g["lr"]} for g in groups], **kwargs)
        owner = {id(p): extra for g, extra in zip(groups, extras, strict=True) for p in g["params"]}
        for group in optimizer.param_groups:  # by parameter: SDNQ's Muon splits each group in two
            if group["params"]:
                group.update(owner[id(group["params"][0])])
    else:
        optimizer = spec.load()(groups, **kwargs)
    if spec.schedule_free:
        optimizer_train_mode(optimizer)
    return optimizer


def build_lr_scheduler(
    cfg: Any, optimizer: torch.optim.Optimizer, num_training_steps: int, *, steps_per_update: int = 1
) -> Any:
    """The ``--lr_scheduler`` for ``optimizer`` over ``num_training_steps`` optimizer steps.

    Pass ``steps_per_update=accelerator.num_processes`` when accelerate steps the scheduler
    (see ``schedulers.build_lr_scheduler``). Raises ConfigError on bad settings.
    """
    _raise(scheduler_problems(cfg))
    return _build_lr_scheduler(cfg, optimizer, num_training_steps, steps_per_update=steps_per_update)


def optimizer_train_mode(optimizer: Any) -> None:
    """Before training steps: schedule-free optimizers switch the weights to their training point."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    if callable(getattr(inner, "train", None)):
        inner.train()


def optimizer_eval_mode(optimizer: Any) -> None:
    """Before validation, checkpoints or the final save: schedule-free optimizers switch the weights
    to the averaged point they want evaluated. No-op for other optimizers."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if callable(getattr(inner, "eval", None)):
        inner.eval()
