"""``--ramtorch``: frozen ``nn.Linear`` layers become RamTorch layers whose weights stay in CPU memory and
stream to the GPU per call (the ``ramtorch`` package; it needs CUDA streams and pinned memory).

Only frozen layers are converted (LoRA's own layers and fully trained weights stay regular layers),
restricted to ``--ramtorch_target_modules`` glob patterns matched against the qualified module name
or the class name when set. ``--ramtorch_text_encoder`` converts the text encoders' layers too,
``--ramtorch_vae`` the Linear layers of the VAE's mid block.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch

#: why RamTorch cannot run on a machine without CUDA (its layers need CUDA streams and pinned memory)
REQUIREMENT = "a CUDA or ROCm GPU (RamTorch streams weights with CUDA streams from pinned memory)"


def parse_patterns(value: Any) -> list[str]:
    """``--ramtorch_target_modules`` as a list of glob patterns (empty: every Linear layer)."""
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [item.strip() for item in items if str(item).strip()]


def target_linear_layers(module: torch.nn.Module, patterns: list[str]) -> list[tuple[torch.nn.Module, str, str]]:
    """The frozen ``nn.Linear`` layers to convert: (parent module, attribute name, qualified name)."""
    found = []
    for qualified, parent in module.named_modules():
        for name, child in parent.named_children():
            if type(child) is not torch.nn.Linear or child.weight.requires_grad:
                continue
            full = f"{qualified}.{name}" if qualified else name
            if patterns and not any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(type(child).__name__, p)
                                    for p in patterns):
                continue
            found.append((parent, name, full))
    return found


def convert_linear_layers(module: torch.nn.Module, device: torch.device, patterns: list[str]) -> int:
    """Replace the target layers of ``module`` with ``ramtorch.Linear`` computing on ``device``; returns how many."""
    from ramtorch import Linear

    layers = target_linear_layers(module, patterns)
    for parent, name, _ in layers:
        child = getattr(parent, name)
        layer = Linear(child.in_features, child.out_features, bias=child.bias is not None, device=device,
                       dtype=child.weight.dtype, skip_init=True)
        with torch.no_grad():
            layer.weight.data = child.weight.data.to("cpu").pin_memory()
            layer.weight.is_ramtorch = True
            if child.bias is not None:
                layer.bias.data = child.bias.data.to("cpu").pin_memory()
                layer.bias.is_ramtorch = True
        layer.requires_grad_(False)
        setattr(parent, name, layer)
    return len(layers)


def is_ramtorch(param: torch.Tensor) -> bool:
    return bool(getattr(param, "is_ramtorch", False))
