"""Exponential moving average of the trained weights (``--use_ema`` and every ``--ema_*`` option).

Each update moves the shadow copy toward the live weights: ``shadow = decay * shadow +
(1 - decay) * weight``, with ``decay = --ema_decay`` (0.995 when unset) applied as given —
the spec describes no warm-up ramp. ``--ema_update_interval N`` updates on every N-th call
to ``step`` (one call per optimizer step) with the same decay, trading smoothness for
less work. Shadows of bf16/fp16 weights are fp32, so small moves toward the weights are
not rounded away; other dtypes keep their own.

Placement: ``--ema_device=accelerator`` keeps shadows next to the weights.
``--ema_device=cpu`` keeps them in host memory; each update then copies the shadows to
the weights' device, updates there and copies them back, unless ``--ema_cpu_only`` is set,
in which case the weights are copied to the host and the update runs on the CPU.
``--ema_foreach_disable`` uses one ``lerp_`` per tensor instead of ``torch._foreach_lerp_``.

For ``--ema_validation``: ``store`` + ``copy_to`` (or the ``applied`` context manager)
put the averaged weights into the model and ``restore`` brings the trained ones back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._settings import setting

EMA_DEVICES = ("accelerator", "cpu")


def _as_list(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list(parameters)


def _like(params: list[torch.Tensor], shadows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters in their shadows' dtypes (lerp needs matching dtypes)."""
    return [p if p.dtype == s.dtype else p.to(s.dtype) for p, s in zip(params, shadows, strict=True)]


class EMAModel:
    """Shadow weights for a fixed list of parameters (see module docstring)."""

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        cfg: Any = None,
        *,
        decay: float | None = None,
        update_interval: int | None = None,
        device: str | None = None,
        cpu_only: bool | None = None,
        foreach: bool | None = None,
    ):
        params = _as_list(parameters)
        if not params:
            raise ValueError("EMAModel needs at least one parameter")
        self.decay = float(decay if decay is not None else setting(cfg, "ema_decay"))
        self.update_interval = int(update_interval if update_interval is not None else setting(cfg, "ema_update_interval"))
        self.device = device if device is not None else setting(cfg, "ema_device")
        self.cpu_only = bool(cpu_only if cpu_only is not None else setting(cfg, "ema_cpu_only"))
        self.foreach = bool(foreach if foreach is not None else not setting(cfg, "ema_foreach_disable"))
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.decay}")
        if self.update_interval < 1:
            raise ValueError(f"ema_update_interval must be >= 1, got {self.update_interval}")
        if self.device not in EMA_DEVICES:
            raise ValueError(f"ema_device {self.device!r} is not one of: {', '.join(EMA_DEVICES)}")
        self.shadow_params = [self._new_shadow(p) for p in params]
        self.optimization_step = 0  # step() calls so far
        self.num_updates = 0  # averaging updates actually applied
        self._stored: list[torch.Tensor] | None = None

    def _home(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else param.device

    def _new_shadow(self, param: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype
        return param.detach().to(device=self._home(param), dtype=dtype, copy=True)

    def _check(self, params: list[torch.Tensor]) -> None:
        if len(params) != len(self.shadow_params):
            raise ValueError(f"EMAModel tracks {len(self.shadow_params)} parameters, got {len(params)}")

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> bool:
        """Count one optimizer step; average on every ``update_interval``-th. Returns whether it did."""
        params = _as_list(parameters)
        self._check(params)
        self.optimization_step += 1
        if self.optimization_step % self.update_interval:
            return False
        weight = 1.0 - self.decay
        floating = [i for i, p in enumerate(params) if p.is_floating_point()]
        for i, param in enumerate(params):
            if not param.is_floating_point():
                self.shadow_params[i].copy_(param.detach())
        if floating:
            self._lerp([self.shadow_params[i] for i in floating], [params[i].detach() for i in floating], weight)
        self.num_updates += 1
        return True

    def _lerp(self, shadows: list[torch.Tensor], params: list[torch.Tensor], weight: float) -> None:
        by_device: dict[tuple[torch.device, torch.device], list[int]] = {}
        for i, (shadow, param) in enumerate(zip(shadows, params, strict=True)):
            by_device.setdefault((shadow.device, param.device), []).append(i)
        for (shadow_device, param_device), indices in by_device.items():
            group_shadows = [shadows[i] for i in indices]
            group_params = [params[i] for i in indices]
            if shadow_device == param_device:
                self._lerp_same_device(group_shadows, _like(group_params, group_shadows), weight)
            elif self.cpu_only:
                host = [p.to(shadow_device) for p in group_params]
                self._lerp_same_device(group_shadows, _like(host, group_shadows), weight)
            else:
                moved = [s.to(param_device) for s in group_shadows]
                self._lerp_same_device(moved, _like(group_params, moved), weight)
                for shadow, updated in zip(group_shadows, moved, strict=True):
                    shadow.copy_(updated)

    def _lerp_same_device(self, shadows: list[torch.Tensor], targets: list[torch.Tensor], weight: float) -> None:
        if self.foreach:
            torch._foreach_lerp_(shadows, targets, weight)
        else:
            for shadow, target in zip(shadows, targets, strict=True):
                shadow.lerp_(target, weight)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the averaged weights into ``parameters`` (cast to their dtype and device)."""
        params = _as_list(parameters)
        self._check(params)
        for shadow, param in zip(self.shadow_params, params, strict=True):
            param.copy_(shadow.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Remember the current weights so ``restore`` can put them back after EMA validation."""
        params = _as_list(parameters)
        self._check(params)
        self._stored = [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the weights saved by ``store``."""
        if self._stored is None:
            raise RuntimeError("EMAModel.restore called without a matching store")
        params = _as_list(parameters)
        self._check(params)
        for saved, param in zip(self._stored, params, strict=True):
            param.copy_(saved)
        self._stored = None

    @contextmanager
    def applied(self, parameters: Iterable[torch.Tensor]) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; afterwards the trained ones."""
        params = _as_list(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def state_dict(self) -> dict[str, Any]:
        """Counters, settings and shadow tensors; loading it continues bit for bit."""
        return {
            "decay": self.decay,
            "update_interval": self.update_interval,
            "optimization_step": self.optimization_step,
            "num_updates": self.num_updates,
            "shadow_params": [s.detach().clone() for s in self.shadow_params],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters and shadows. ``decay``/``update_interval`` stay as configured now."""
        shadows = state["shadow_params"]
        if len(shadows) != len(self.shadow_params):
            raise ValueError(
                f"EMA state holds {len(shadows)} tensor(s) but this model tracks {len(self.shadow_params)}"
            )
        for index, (current, saved) in enumerate(zip(self.shadow_params, shadows, strict=True)):
            if current.shape != saved.shape:
                raise ValueError(f"EMA state tensor {index} has shape {tuple(saved.shape)}, expected {tuple(current.shape)}")
            current.copy_(saved.to(device=current.device, dtype=current.dtype))
        self.optimization_step = int(state["optimization_step"])
        self.num_updates = int(state.get("num_updates", 0))
