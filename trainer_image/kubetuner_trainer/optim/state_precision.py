"""Keep full-precision optimizer state across ``load_state_dict``.

``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
parameter's dtype. Optimizers here keep fp32 state (moments, master weights) for bf16
parameters on purpose, so that cast would make a resumed run differ from a straight one.
"""

from __future__ import annotations

from typing import Any

import torch


def restore_state_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """After ``super().load_state_dict(state_dict)``: put back the saved dtypes of floating state."""
    saved_state = state_dict["state"]
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        for saved_id, param in zip(saved_group["params"], group["params"], strict=True):
            saved = saved_state.get(saved_id)
            if not saved:
                continue
            state = optimizer.state[param]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and state[key].dtype != value.dtype:
                    state[key] = value.to(device=param.device, copy=True)
