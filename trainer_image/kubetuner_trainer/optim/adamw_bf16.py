"""AdamW for bf16 parameters: fp32 moments, fp32 update math, stochastic rounding back to bf16.

A bf16 weight near 1.0 has a spacing of 2**-7; Adam steps of ~1e-4 are far below half
of that, so plain round-to-nearest throws every one of them away and training stalls.
Here each update is computed in fp32 and rounded *stochastically*: up or down with
probabilities proportional to the distance, so the expected stored weight equals the fp32
result and small steps accumulate over time.

The rounding noise is derived from (seed, step, group, parameter index), never from a
running generator, so a run resumed from ``state_dict()`` rounds exactly like one that
never stopped. fp32 parameters get ordinary AdamW; fp16 parameters are rounded to nearest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .state_precision import restore_state_dtypes

_LOW_MASK = -(1 << 16)  # 0xFFFF0000 as int32: keeps the bf16 part of an fp32 bit pattern


def stochastic_round_to_bf16(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 ``values`` to bf16, up or down with probability given by the dropped bits."""
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(_LOW_MASK)
    return rounded.view(torch.float32).to(torch.bfloat16)


def _rounding_generator(device: torch.device, seed: int, step: int, group: int, index: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    # Distinct, reproducible stream per (seed, step, parameter); large odd multipliers spread them.
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + group * 0xC2B2AE3D + index * 0x27D4EB2F) % (2**63 - 1)
    generator.manual_seed(mixed)
    return generator


class AdamWBF16(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam that stays accurate on bf16 weights (see module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        stochastic_rounding: bool = True,
        seed: int = 0,
    ):
        if lr < 0:
            raise ValueError(f"adamw_bf16: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adamw_bf16: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError("adamw_bf16: eps and weight_decay must be >= 0")
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "stochastic_rounding": stochastic_rounding,
        }
        super().__init__(params, defaults)
        self.seed = int(seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("adamw_bf16 does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                step = state["step"]
                grad = param.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias1 = 1.0 - beta1**step
                bias2 = 1.0 - beta2**step
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)

                work = param if param.dtype == torch.float32 else param.float()
                if decay:
                    work.mul_(1.0 - lr * decay)
                work.addcdiv_(exp_avg, denom, value=-lr / bias1)
                if work is param:
                    continue
                if param.dtype == torch.bfloat16 and group["stochastic_rounding"]:
                    generator = _rounding_generator(param.device, self.seed, step, group_index, index)
                    param.copy_(stochastic_round_to_bf16(work, generator))
                else:
                    param.copy_(work)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rounding_seed"] = self.seed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.seed = int(state_dict.pop("rounding_seed", self.seed))
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
