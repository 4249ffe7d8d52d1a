"""Activation (gradient) checkpointing with ``--gradient_checkpointing_interval``."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


class IntervalCheckpointing:
    """A diffusers ``gradient_checkpointing_func`` that recomputes only every ``interval``-th block.

    diffusers models call the function once per checkpointable block, in forward order; a
    forward pre-hook on the model resets the count, so block ``0, interval, 2·interval, …`` of every
    forward pass is checkpointed and the others keep their activations (less recomputation, more
    memory). ``interval`` 1 checkpoints every block.
    """

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"gradient_checkpointing_interval must be at least 1, got {interval}")
        self.interval = interval
        self.calls = 0
        self.checkpointed = 0

    def reset(self, *_: Any) -> None:
        self.calls = 0

    def __call__(self, block: torch.nn.Module, *args: Any) -> Any:
        index = self.calls
        self.calls += 1
        if index % self.interval:
            return block(*args)
        self.checkpointed += 1
        return checkpoint(block.__call__, *args, use_reentrant=False)


def enable_gradient_checkpointing(model: torch.nn.Module, interval: int | None = None) -> IntervalCheckpointing:
    """Turn on checkpointing in a diffusers model (UNet or transformer), every ``interval``-th block."""
    policy = IntervalCheckpointing(int(interval or 1))
    model.enable_gradient_checkpointing(gradient_checkpointing_func=policy)
    model.register_forward_pre_hook(policy.reset)
    return policy
