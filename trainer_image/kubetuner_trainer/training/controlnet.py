"""What trains with ``--controlnet``: the ControlNet, fully or through a LoRA; the base model stays frozen.

* :class:`ControlNetFullTrainable` (``--model_type full``) — every ControlNet weight. Checkpoints and the
  final result hold ``controlnet/``, a diffusers model folder (``<ControlNet class>.from_pretrained``);
  with EMA the final folder holds the EMA weights and ``controlnet_non_ema/`` the training ones.
* :class:`ControlNetLoRATrainable` (``--model_type lora``) — PEFT LoRA layers on the ControlNet (the
  family's ControlNet targets, for Flux the ``--flux_lora_target`` ControlNet presets), as SimpleTuner's
  ``*.peft-controlnet-lora`` examples train. Checkpoints and the final result hold
  ``pytorch_lora_weights.safetensors`` with ``controlnet.``-prefixed keys
  (``controlnet.load_lora_adapter(file, prefix="controlnet")``); the final result also holds
  ``controlnet/``, the ControlNet with the LoRA merged, because part of a ControlNet built from a UNet
  (its conditioning embedding) is random and cannot be rebuilt from the base model alone.

Both validate through the family's ControlNet pipeline (``ModelFamily.controlnet_pipeline_class``).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch

from ..files import publish
from ..models.controlnet import CONTROLNET, ControlledDenoiser, cast_floats, control_input
from . import checkpoints as ckpt
from .lora import ADAPTER_NAME, _lora_params_fp32, _present, lora_adapter_metadata, lora_config
from .trainable import FullTrainable, LoRATrainable, stamp_metadata


class _ControlNetTrainable:
    """The parts both ControlNet trainables share (mixed in before the LoRA/full trainable)."""

    family: Any
    cfg: Any
    modules: dict[str, torch.nn.Module]

    @property
    def denoiser_name(self) -> str:
        return CONTROLNET

    def attach(self) -> dict[str, torch.nn.Module]:
        self.family.denoiser.requires_grad_(False)  # a quantized base comes back from quantization trainable
        modules = super().attach()  # type: ignore[misc]
        # its residuals reach the frozen base in the base's dtype, in training and in validation renders alike
        dtype = self.family.weight_dtype
        modules[CONTROLNET].register_forward_hook(lambda module, args, output: cast_floats(output, dtype))
        if self.cfg.gradient_checkpointing:  # the frozen base still stores activations for the backward pass
            self.family.enable_gradient_checkpointing(self.family.denoiser, self.cfg.gradient_checkpointing_interval)
        return modules

    def predict_module(self, modules: dict[str, torch.nn.Module], batch: Any) -> ControlledDenoiser:
        control = control_input(self.family, batch, self.family.device)
        return ControlledDenoiser(self.family, self.family.denoiser, modules[CONTROLNET], control)

    def validation_context(self) -> contextlib.AbstractContextManager[None]:
        """Renders under autocast to the base's dtype when it is not fp32: the ControlNet's trained weights stay
        fp32 (LoRA layers, full-training masters) next to half-precision frozen ones."""
        dtype = self.family.weight_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.family.device.type, dtype=dtype)

    def pipeline(self, modules: dict[str, torch.nn.Module], *, ema: Any = None,
                 device: torch.device | str | None = None) -> Any:
        controlnet = self.ema_denoiser(ema).to(device) if ema is not None else modules[CONTROLNET]  # type: ignore[attr-defined]
        return self.family.build_pipeline(controlnet=controlnet)

    def _controlnet(self) -> torch.nn.Module:
        controlnet = self.family.controlnet
        if controlnet is None:
            raise RuntimeError("controlnet=true but the model was loaded without a ControlNet")
        return controlnet


class ControlNetFullTrainable(_ControlNetTrainable, FullTrainable):
    """Every ControlNet weight (``--controlnet --model_type full``)."""

    def _attach(self) -> dict[str, torch.nn.Module]:
        controlnet = self._controlnet()
        controlnet.float().requires_grad_(True)  # fp32 masters, as full fine-tuning of a denoiser
        return {CONTROLNET: controlnet}

    def check_export(self, scratch: Path) -> None:
        self.metadata("export check")

    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """``controlnet/`` (EMA weights when EMA ran, the training ones then in ``controlnet_non_ema/``)."""
        controlnet = self.ema_denoiser(ema) if ema is not None else self.denoiser
        controlnet.save_pretrained(out / CONTROLNET, safe_serialization=True)
        if ema is not None:
            self.denoiser.save_pretrained(out / f"{CONTROLNET}_non_ema", safe_serialization=True)
        stamp_metadata(out, self.metadata(title))
        publish(out)


class ControlNetLoRATrainable(_ControlNetTrainable, LoRATrainable):
    """LoRA layers on the ControlNet (``--controlnet --model_type lora``)."""

    def _attach(self) -> dict[str, torch.nn.Module]:
        from .lora import _check_targets_exist, parse_target_modules

        controlnet = self._controlnet()
        cfg = self.cfg
        if cfg.peft_lora_target_modules in (None, "", []):
            wanted = self.family.controlnet_lora_target_list(cfg)
            targets = _present(controlnet, wanted)
            if not targets:
                raise ValueError(f"none of the ControlNet LoRA targets {list(wanted)} exists in this "
                                 f"{type(controlnet).__name__}")
        else:
            targets = parse_target_modules(cfg.peft_lora_target_modules, ())
            _check_targets_exist(controlnet, targets, type(controlnet).__name__)
        controlnet.add_adapter(lora_config(cfg, targets))
        modules = {CONTROLNET: controlnet}
        _lora_params_fp32(modules.values())
        if cfg.init_lora:
            self._load_file(Path(cfg.init_lora), modules)
        return modules

    def _write(self, folder: Path, title: str, lora_format: str, filename: str = ckpt.LORA_FILE) -> Path:
        """PEFT's own keys under ``controlnet.`` (SimpleTuner's ControlNet LoRA layout; diffusers' loader reads it)."""
        from peft.utils import get_peft_model_state_dict

        return ckpt.save_lora_file(folder, self.family, {CONTROLNET: get_peft_model_state_dict(self.denoiser)},
                                   lora_adapter_metadata(self.modules), lora_format=lora_format,
                                   metadata=self.metadata(title), filename=filename)

    def load(self, folder: Path) -> None:
        self._load_file(folder / ckpt.LORA_FILE, self.modules)

    @staticmethod
    def _load_file(path: Path, modules: dict[str, torch.nn.Module]) -> None:
        """Load a ControlNet LoRA file (``controlnet.``-prefixed diffusers or PEFT keys) into the attached adapter."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if path.is_dir():
            path = path / ckpt.LORA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no ControlNet LoRA weights at {path}")
        prefix = CONTROLNET + "."
        state = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path} holds no {prefix}* LoRA weights")
        result = set_peft_model_state_dict(modules[CONTROLNET], convert_unet_state_dict_to_peft(state),
                                           adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{path} has weights that do not fit the ControlNet: {unexpected[:5]}")

    def export(self, out: Path, *, title: str, ema: Any = None) -> None:
        """The LoRA file, then ``controlnet/``: a copy of the ControlNet with the LoRA (EMA weights when EMA
        ran) merged into its layers."""
        self.save(out, title=title)
        merged = self.ema_denoiser(ema) if ema is not None else copy.deepcopy(self.denoiser).to("cpu")
        merged.fuse_lora(adapter_names=[ADAPTER_NAME])
        merged.unload_lora()
        merged.save_pretrained(out / CONTROLNET, safe_serialization=True)
        stamp_metadata(out / CONTROLNET, self.metadata(title) | {"modelspec.architecture":
                                                                 self.family.modelspec_architecture})
        publish(out)
