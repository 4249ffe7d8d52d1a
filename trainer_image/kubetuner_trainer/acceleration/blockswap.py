"""Block swap: the frozen weights of the last N transformer blocks live off the accelerator.

Each swapped block keeps its frozen parameters (the base weights; LoRA and other trained
parameters stay put) on ``swap_device``. A forward pre-hook puts fresh copies of them on the
compute device into the block, a forward hook puts the masters back, so between blocks only the
running block's weights occupy the accelerator. Autograd keeps the copies a backward pass needs
alive until it is done with them; with gradient checkpointing (the default) nothing is kept and
the checkpoint's recomputation in the backward pass copies the block in again. This is the
Musubi-tuner idea ("blocks_to_swap") built on module hooks instead of edits to the model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SwappedBlock:
    """One block's frozen parameters: (owning module, attribute name, master parameter on the swap device)."""

    block: torch.nn.Module
    frozen: list[tuple[torch.nn.Module, str, torch.nn.Parameter]]
    handles: list[Any] = field(default_factory=list)
    loads: int = 0


class BlockSwap:
    """Swap the frozen weights of ``blocks`` between ``swap_device`` and ``compute_device`` per forward call.

    ``blocks`` are the blocks to swap (e.g. the last N of the family's transformer block lists).
    The masters are moved to ``swap_device`` at once (pinned when it is the CPU and the compute device
    is CUDA, so the copies are asynchronous). ``loads`` of each :class:`SwappedBlock` counts its copies in.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], *, compute_device: torch.device | str,
                 swap_device: torch.device | str = "cpu"):
        self.compute_device = torch.device(compute_device)
        self.swap_device = torch.device(swap_device)
        self.blocks = [self._attach(block) for block in blocks]

    @property
    def swapped_parameters(self) -> int:
        """How many parameter elements live on the swap device."""
        return sum(p.numel() for b in self.blocks for _, _, p in b.frozen)

    def _attach(self, block: torch.nn.Module) -> SwappedBlock:
        frozen = [(module, name, param) for module in block.modules()
                  for name, param in module._parameters.items() if param is not None and not param.requires_grad]
        entry = SwappedBlock(block, frozen)
        self.offload(entry)
        entry.handles = [block.register_forward_pre_hook(lambda *_: self._load(entry)),
                         # always_call: a checkpoint's recomputation may stop inside the block (early stop)
                         block.register_forward_hook(lambda *_: self._restore(entry), always_call=True)]
        return entry

    def offload(self, entry: SwappedBlock | None = None) -> None:
        """(Re)place the masters on the swap device (every block when ``entry`` is None)."""
        pin = self.swap_device.type == "cpu" and self.compute_device.type == "cuda"
        for item in [entry] if entry is not None else self.blocks:
            for _, _, param in item.frozen:
                data = param.data.to(self.swap_device)
                param.data = data.pin_memory() if pin and not data.is_pinned() else data

    def _load(self, entry: SwappedBlock) -> None:
        entry.loads += 1
        for module, name, param in entry.frozen:
            # a plain tensor in ``_parameters`` is what the block's forward reads; the master stays intact
            module._parameters[name] = param.detach().to(self.compute_device, non_blocking=True, copy=True)

    @staticmethod
    def _restore(entry: SwappedBlock) -> None:
        for module, name, param in entry.frozen:
            module._parameters[name] = param

    def remove(self) -> None:
        """Detach the hooks; the masters stay where they are."""
        for entry in self.blocks:
            for handle in entry.handles:
                handle.remove()
            self._restore(entry)
