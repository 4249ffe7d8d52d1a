"""SingLoRA (``--peft_lora_mode singlora``) through the ``peft-singlora`` package.

One square low-rank matrix A per layer instead of LoRA's pair: ΔW = u(t) · (alpha / r) · A Aᵀ
(truncated to the layer's shape), where the ramp u(t) = min(t / T, 1) grows over
``--singlora_ramp_up_steps`` T optimizer steps (SimpleTuner's default 100 when unset or 0).
The layers keep the step t as a buffer; it is set after every optimizer step and saved with the
weights, so a resumed run continues the ramp exactly.

Files hold the PEFT state dict of each trained module under its pipeline name
(``unet.<module path>.lora_A``, ``….training_step_default``); ``peft_lora_mode`` in the header
says how to load them (``peft_singlora`` layers, not diffusers' ``load_lora_weights``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..files import save_safetensors
from . import checkpoints as ckpt
from .lora import ADAPTER_NAME
from .trainable import LoRATrainable, Trainable

#: SimpleTuner's ramp length when --singlora_ramp_up_steps is unset or 0
DEFAULT_RAMP_UP_STEPS = 100
#: lora_init_type values SingLoRA layers can start from (peft_singlora's reset_lora_parameters)
INIT_WEIGHTS = {"default": True, "gaussian": "gaussian"}


def singlora_problems(cfg: Any) -> list[tuple[str, Any, str]]:
    """(option, value, message) for options SingLoRA cannot honour."""
    if cfg.peft_lora_mode != "singlora" or cfg.model_type != "lora":
        return []
    problems: list[tuple[str, Any, str]] = []
    if cfg.lora_type == "lycoris":
        problems.append(("peft_lora_mode", "singlora", "applies to --lora_type=standard only"))
    init = cfg.lora_init_type or "default"
    if init not in INIT_WEIGHTS:
        problems.append(("lora_init_type", init, f"SingLoRA layers start from {' or '.join(INIT_WEIGHTS)} only"))
    for option in ("use_dora", "init_lora"):
        if getattr(cfg, option, None):
            problems.append((option, getattr(cfg, option), "is not supported with --peft_lora_mode=singlora"))
    if cfg.lora_format == "comfyui":
        problems.append(("lora_format", "comfyui", "SingLoRA files have no ComfyUI layout; leave lora_format unset"))
    return problems


def singlora_config(cfg: Any, target_modules: Sequence[str]) -> Any:
    """A ``peft_singlora.SingLoRAConfig`` from the LoRA options and ``--singlora_ramp_up_steps``."""
    from peft_singlora import SingLoRAConfig

    rank = cfg.lora_rank
    return SingLoRAConfig(
        r=rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else rank,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(target_modules),
        ramp_up_steps=cfg.singlora_ramp_up_steps or DEFAULT_RAMP_UP_STEPS,
        init_lora_weights=INIT_WEIGHTS[cfg.lora_init_type or "default"],
    )


def set_singlora_step(modules: dict[str, torch.nn.Module], global_step: int) -> None:
    """Tell every SingLoRA layer the optimizer step count (drives the ramp-up)."""
    from peft_singlora import update_singlora_global_step

    for module in modules.values():
        update_singlora_global_step(module, global_step)


def set_ramp_up_steps(modules: dict[str, torch.nn.Module], steps: int) -> int:
    """Give every SingLoRA layer the ramp length; returns how many layers there are.

    peft-singlora 0.2.0 keeps ``ramp_up_steps`` on its config but PEFT builds the layers without it,
    so they would ramp over the layer default (1000 steps) whatever the option says.
    """
    from peft_singlora import SingLoRALayer

    layers = [m for module in modules.values() for m in module.modules() if isinstance(m, SingLoRALayer)]
    for layer in layers:
        layer.ramp_up_steps = steps
    return len(layers)


class SingLoRATrainable(LoRATrainable):
    """PEFT LoRA layers replaced by SingLoRA layers (``--peft_lora_mode singlora``)."""

    def _attach(self) -> dict[str, torch.nn.Module]:
        modules = super()._attach()
        if not set_ramp_up_steps(modules, self.cfg.singlora_ramp_up_steps or DEFAULT_RAMP_UP_STEPS):
            raise ValueError("peft_lora_mode=singlora: no SingLoRA layer was created (the targets hold no "
                             "Linear layer)")
        return modules

    def after_step(self, global_step: int) -> None:
        set_singlora_step(self.modules, global_step)

    def save(self, folder: Path, *, title: str, ema: Any = None) -> None:
        from peft.utils import get_peft_model_state_dict
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
                   for name, module in self.modules.items()
                   for key, value in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items()}
        config = {name: module.peft_config[ADAPTER_NAME].to_dict() for name, module in self.modules.items()}
        header = {"format": "pt", **self.metadata(title), "peft_lora_mode": "singlora",
                  "lora_adapter_metadata": json.dumps(config, sort_keys=True, default=str)}
        save_safetensors(tensors, folder / ckpt.LORA_FILE, header)

    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """The SingLoRA file (its own key layout whatever ``--lora_format`` says)."""
        self.save(out, title=title)

    check_export = Trainable.check_export  # its own layout: a real export into a scratch folder

    def load(self, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(folder / ckpt.LORA_FILE))
        for name, module in self.modules.items():
            prefix = name + "."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None) or not part:
                raise ValueError(f"{folder / ckpt.LORA_FILE} does not fit the SingLoRA layers of the {name}")
