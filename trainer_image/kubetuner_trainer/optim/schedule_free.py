"""Schedule-free AdamW (``schedulefree`` package) with fp32 master weights for bf16/fp16 params.

Schedule-free AdamW keeps two sequences per weight (the parameter itself, interpolated
between the fast iterate and the average, and the fast iterate ``z`` in its state).
Stored in bf16, both lose updates smaller than half a bf16 spacing. SimpleTuner guards
against that with a Kahan compensation buffer; here low-precision parameters get an fp32
master copy instead (kept in the optimizer state, so it is saved and resumed): during
``step``/``train``/``eval`` the parameter temporarily points at the fp32 master, the
package's update runs in full precision, and the result is rounded back into the
parameter's own dtype. ``master_weights=False`` (the ``+no_kahan`` variant) skips this.
fp32 parameters are untouched either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from schedulefree import AdamWScheduleFree

from .state_precision import restore_state_dtypes

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class ScheduleFreeAdamW(AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFree`` plus optional fp32 master weights (module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = True,
        master_weights: bool = True,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
            r=r, weight_lr_power=weight_lr_power, foreach=foreach,
        )
        self.master_weights = master_weights

    @contextmanager
    def _full_precision(self) -> Iterator[None]:
        swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        if self.master_weights:
            for group in self.param_groups:
                for param in group["params"]:
                    if param.dtype not in _LOW_PRECISION:
                        continue
                    state = self.state[param]
                    master = state.get("fp32_master")
                    if master is None:
                        master = param.detach().float()
                    storage, grad = param.data, param.grad
                    swapped.append((param, storage, grad))
                    param.grad = None
                    param.data = master
                    if grad is not None:
                        param.grad = grad.float()
        try:
            yield
        finally:
            for param, storage, grad in swapped:
                master = param.data
                self.state[param]["fp32_master"] = master
                param.grad = None
                storage.copy_(master)  # round into the original tensor: its storage stays the same
                param.data = storage
                param.grad = grad

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with self._full_precision():
            return super().step(closure)

    @torch.no_grad()
    def train(self) -> None:
        with self._full_precision():
            super().train()

    @torch.no_grad()
    def eval(self) -> None:
        with self._full_precision():
            super().eval()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_weights"] = self.master_weights
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.master_weights = bool(state_dict.pop("master_weights", self.master_weights))
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
