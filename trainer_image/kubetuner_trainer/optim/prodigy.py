"""Prodigy (``prodigyopt``) with ``--prodigy_steps``: stop adapting the step size after N steps.

Prodigy estimates the distance to the solution (``d``) and scales every step by it.
Late in training that estimate can keep growing; ``prodigy_steps`` freezes ``d`` (and
``d_max``) once that many optimizer steps have been taken. The limit is stored in each
param group, so it travels with ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from prodigyopt import Prodigy


class ProdigyWithSteps(Prodigy):
    """``prodigyopt.Prodigy`` whose ``d`` stops changing after ``prodigy_steps`` steps (0 = never)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        slice_p: int = 1,
        prodigy_steps: int = 0,
    ):
        if prodigy_steps < 0:
            raise ValueError(f"prodigy_steps must be >= 0, got {prodigy_steps}")
        super().__init__(
            params, lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
            use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
            d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p,
        )
        for group in self.param_groups:
            group.setdefault("prodigy_steps", prodigy_steps)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        before = [(group["d"], group["d_max"]) for group in self.param_groups]
        loss = super().step(closure)
        for group, (d, d_max) in zip(self.param_groups, before, strict=True):
            limit = group.get("prodigy_steps", 0)
            if limit and group["k"] > limit:
                group["d"], group["d_max"] = d, d_max
        return loss
