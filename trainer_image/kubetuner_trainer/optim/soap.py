"""SOAP: Adam run in the eigenbasis of a Shampoo preconditioner (Vyas et al., 2024).

For each dimension of a weight (up to ``max_precond_dim`` long) SOAP keeps an exponential
average of the gradient's Gram matrix along that dimension and an orthogonal basis Q
that approximately diagonalises it. Gradients are rotated into that basis, Adam's second
moment is tracked there, and the normalised step is rotated back. The first moment stays
in the original coordinates. Bases are computed with ``eigh`` on the first step (which
only gathers statistics and does not move the weights) and refreshed every
``precondition_frequency`` steps by one QR power iteration; the second moment is
re-ordered to follow the eigenvalue order so it stays attached to its direction.

Dimensions that are not preconditioned (1-D parameters unless ``precondition_1d``,
dimensions longer than ``max_precond_dim``) use the identity, so a weight with no
preconditioned dimension is updated exactly like Adam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .state_precision import restore_state_dtypes


class SOAP(torch.optim.Optimizer):
    """Shampoo-preconditioned Adam. State is fp32 whatever the parameter dtype."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition_1d: bool = False,
        correct_bias: bool = True,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("soap: lr, eps and weight_decay must be >= 0")
        if precondition_frequency < 1:
            raise ValueError(f"soap: precondition_frequency must be >= 1, got {precondition_frequency}")
        defaults = {
            "lr": lr, "betas": tuple(betas), "shampoo_beta": shampoo_beta, "eps": eps,
            "weight_decay": weight_decay, "precondition_frequency": precondition_frequency,
            "max_precond_dim": max_precond_dim, "precondition_1d": precondition_1d,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)

    @staticmethod
    def _preconditioned(shape: torch.Size, group: dict[str, Any]) -> list[bool]:
        if len(shape) == 1 and not group["precondition_1d"]:
            return [False]
        return [0 < size <= group["max_precond_dim"] for size in shape]

    @staticmethod
    def _rotate(x: torch.Tensor, state: dict[str, Any], back: bool = False) -> torch.Tensor:
        """Multiply every preconditioned dim by Q^T (into the basis) or Q (``back``).

        Each tensordot contracts the leading dim and appends the result as the last dim,
        so after visiting every dim the original order is restored.
        """
        for dim in range(x.dim()):
            basis = state.get(f"Q{dim}")
            if basis is None:
                x = x.movedim(0, -1)
            else:
                x = torch.tensordot(x, basis, dims=([0], [1 if back else 0]))
        return x

    @staticmethod
    def _gram(grad: torch.Tensor, dim: int) -> torch.Tensor:
        flat = grad.movedim(dim, 0).reshape(grad.shape[dim], -1)
        return flat @ flat.T

    def _init_state(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], beta: float) -> None:
        state = self.state[param]
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        for dim, used in enumerate(self._preconditioned(grad.shape, group)):
            if used:
                state[f"GG{dim}"] = torch.zeros(grad.shape[dim], grad.shape[dim], dtype=torch.float32, device=grad.device)
        self._accumulate(grad, state, beta)
        for dim in range(grad.dim()):
            gram = state.get(f"GG{dim}")
            if gram is not None:
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                _, vectors = torch.linalg.eigh(gram + 1e-30 * eye)
                state[f"Q{dim}"] = torch.flip(vectors, dims=[1])  # largest eigenvalue first

    def _accumulate(self, grad: torch.Tensor, state: dict[str, Any], beta: float) -> None:
        for dim in range(grad.dim()):
            gram = state.get(f"GG{dim}")
            if gram is not None:
                gram.lerp_(self._gram(grad, dim), 1.0 - beta)

    @staticmethod
    def _refresh_bases(state: dict[str, Any]) -> None:
        exp_avg_sq = state["exp_avg_sq"]
        for dim in range(exp_avg_sq.dim()):
            basis = state.get(f"Q{dim}")
            if basis is None:
                continue
            gram = state[f"GG{dim}"]
            estimated = torch.diagonal(basis.T @ gram @ basis)
            order = torch.argsort(estimated, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(dim, order)
            basis, _ = torch.linalg.qr(gram @ basis[:, order])
            state[f"Q{dim}"] = basis
        state["exp_avg_sq"] = exp_avg_sq

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if "step" not in state:
                    self._init_state(param, grad, group, shampoo_beta)
                    continue
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                rotated_grad = self._rotate(grad, state)
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(rotated_grad, rotated_grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                update = self._rotate(self._rotate(exp_avg, state) / denom, state, back=True)

                work = param if param.dtype == torch.float32 else param.float()
                work.add_(update, alpha=-step_size)
                if group["weight_decay"]:
                    work.add_(work, alpha=-group["lr"] * group["weight_decay"])
                if work is not param:
                    param.copy_(work)

                self._accumulate(grad, state, shampoo_beta)
                if step % group["precondition_frequency"] == 0:
                    self._refresh_bases(state)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
