"""Every ``--lr_scheduler`` value as a multiplier of each param group's starting learning rate.

With ``t`` the number of ``scheduler.step()`` calls so far, ``W`` = ``--lr_warmup_steps``,
``T`` = the run's optimizer steps and ``p = (t - W) / (T - W)`` the progress after warmup:

- every schedule except ``constant`` and ``sine`` first rises linearly, ``t / W``, for ``W`` steps;
- ``constant``: 1 (no warmup); ``constant_with_warmup``: 1 after warmup;
- ``linear``: ``1 - p``, reaching 0 at ``T``;
- ``cosine``: half a cosine, ``(1 + cos(pi p)) / 2``, reaching 0 at ``T``;
- ``cosine_with_restarts``: ``--lr_num_cycles`` cosine decays, each restarting from 1;
- ``polynomial``: ``(1 - e) (1 - p) ** --lr_power + e`` with ``e = --lr_end / learning rate``,
  so the main group ends exactly at ``--lr_end`` (other groups at the same fraction of theirs);
- ``sine``: a wave between half and the full rate, ``(1 + sin(pi (t mod P) / P)) / 2`` with period
  ``P = --lr_warmup_steps`` (the whole run when that is 0) — SimpleTuner's "sine" shape.

Schedule-free optimizers bring their own warmup and must not be decayed: with them the
schedule is always ``constant``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ._settings import setting
from .optimizers import OPTIMIZERS

SCHEDULERS = ("linear", "sine", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
_WARMUP_SCHEDULES = frozenset(SCHEDULERS) - {"constant", "sine"}


@dataclass(frozen=True)
class ScheduleShape:
    """The parameters of one schedule; ``factor(t)`` is the multiplier at step ``t``."""

    name: str
    warmup: int
    total: int
    cycles: int = 1
    power: float = 1.0
    end_ratio: float = 0.0

    def factor(self, t: int) -> float:
        if self.name not in SCHEDULERS:
            raise ValueError(f"lr_scheduler {self.name!r} is unknown; choose one of: {', '.join(SCHEDULERS)}")
        if self.name == "constant":
            return 1.0
        if self.name == "sine":
            period = self.warmup if self.warmup > 0 else max(1, self.total)
            return (1.0 + math.sin(math.pi * (t % period) / period)) / 2.0
        if t < self.warmup:
            return t / self.warmup
        if self.name == "constant_with_warmup":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = (t - self.warmup) / span
        if self.name == "linear":
            return max(0.0, 1.0 - progress)
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
        if self.name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0)))
        # polynomial
        if progress >= 1.0:
            return self.end_ratio
        return (1.0 - self.end_ratio) * (1.0 - progress) ** self.power + self.end_ratio


class _Multiplier:
    """A LambdaLR callable. LambdaLR saves a callable object's attributes in its state_dict;
    keeping them plain values keeps that state loadable with ``torch.load(weights_only=True)``."""

    def __init__(self, shape: ScheduleShape):
        self.schedule = asdict(shape)

    def __call__(self, step: int) -> float:
        return ScheduleShape(**self.schedule).factor(step)


def lr_scale_factor(cfg: Any) -> float:
    """``--lr_scale``: train_batch_size × gradient_accumulation_steps × num_processes (sqrt with
    ``--lr_scale_sqrt``); 1 when ``--lr_scale`` is off."""
    if not setting(cfg, "lr_scale"):
        return 1.0
    effective = (
        int(setting(cfg, "train_batch_size"))
        * int(setting(cfg, "gradient_accumulation_steps"))
        * int(setting(cfg, "num_processes"))
    )
    return math.sqrt(effective) if setting(cfg, "lr_scale_sqrt") else float(effective)


def effective_scheduler_name(cfg: Any) -> str:
    """The schedule actually used: ``constant`` for schedule-free optimizers."""
    spec = OPTIMIZERS.get(setting(cfg, "optimizer") or "")
    if spec is not None and spec.schedule_free:
        return "constant"
    return setting(cfg, "lr_scheduler")


def schedule_shape(cfg: Any, num_training_steps: int, main_lr: float, steps_per_update: int = 1) -> ScheduleShape:
    """The schedule for ``cfg`` over ``num_training_steps`` optimizer steps, counted in
    scheduler steps (``steps_per_update`` scheduler steps per optimizer step)."""
    name = effective_scheduler_name(cfg)
    if name not in SCHEDULERS:
        raise ValueError(f"lr_scheduler {name!r} is unknown; choose one of: {', '.join(SCHEDULERS)}")
    warmup = int(setting(cfg, "lr_warmup_steps")) if name in _WARMUP_SCHEDULES or name == "sine" else 0
    warmup *= steps_per_update
    end_ratio = 0.0
    if name == "polynomial":
        lr_end = float(setting(cfg, "lr_end"))
        if main_lr <= 0 or lr_end > main_lr:
            raise ValueError(
                f"lr_end ({lr_end:g}) must not exceed the learning rate ({main_lr:g}) for the polynomial schedule"
            )
        end_ratio = lr_end / main_lr
    cycles = int(setting(cfg, "lr_num_cycles"))
    if cycles < 1:
        raise ValueError(f"lr_num_cycles must be >= 1, got {cycles}")
    return ScheduleShape(
        name=name, warmup=warmup, total=int(num_training_steps) * steps_per_update, cycles=cycles,
        power=float(setting(cfg, "lr_power")), end_ratio=end_ratio,
    )


def build_lr_scheduler(
    cfg: Any, optimizer: torch.optim.Optimizer, num_training_steps: int, *, steps_per_update: int = 1
) -> LambdaLR:
    """A ``LambdaLR`` for ``--lr_scheduler``, stepped ``steps_per_update`` times per optimizer step.

    ``num_training_steps`` and ``--lr_warmup_steps`` count optimizer steps. Stepping it
    yourself once per optimizer step needs the default of 1; a scheduler handed to
    ``accelerator.prepare`` (without ``split_batches``) is stepped once per process on every
    optimizer step, so pass ``steps_per_update=accelerator.num_processes`` then.
    Must be built right after ``build_optimizer`` (it reads each group's starting ``lr``;
    the first group is the main one for ``--lr_end``). ``state_dict()`` round-trips exactly.
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if steps_per_update < 1:
        raise ValueError(f"steps_per_update must be >= 1, got {steps_per_update}")
    main_lr = float(optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"]))
    shape = schedule_shape(cfg, num_training_steps, main_lr, steps_per_update)
    multipliers: list[Callable[[int], float]] = [_Multiplier(shape) for _ in optimizer.param_groups]
    return LambdaLR(optimizer, multipliers)
