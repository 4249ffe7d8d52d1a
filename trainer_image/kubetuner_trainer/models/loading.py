"""Loading a family's components from a diffusers folder, a hub id or a single checkpoint file.

Where things come from:

* ``--pretrained_model_name_or_path`` (else the flavour's default hub id): a local folder in
  diffusers layout, a hub id (with ``--revision`` and ``--variant``), or a single
  ``.safetensors``/``.ckpt`` file (local path or URL) loaded with ``from_single_file``.
* ``--pretrained_unet_model_name_or_path`` (+ ``--pretrained_unet_subfolder``) and
  ``--pretrained_vae_model_name_or_path`` replace those two components.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import Components, ModelAdapter

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".sft")


@dataclass(frozen=True)
class ModelSource:
    """Where the components were loaded from (part of the cache identity)."""

    model: str
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    unet: str | None = None
    unet_subfolder: str | None = None
    single_file: bool = False


def is_single_file(location: str) -> bool:
    """A checkpoint file (local or URL) rather than a folder/hub id."""
    return location.lower().endswith(SINGLE_FILE_SUFFIXES)


def resolve_source(adapter_cls: type[ModelAdapter], cfg: Any) -> ModelSource:
    """Pick the model location from the config, defaulting to the flavour's hub id."""
    model = cfg.pretrained_model_name_or_path
    if not model:
        flavour = cfg.model_flavour or adapter_cls.default_flavour
        try:
            model = adapter_cls.flavours[flavour]
        except KeyError:
            allowed = ", ".join(sorted(adapter_cls.flavours))
            raise ValueError(
                f"model_flavour {flavour!r} is not known for model_family {adapter_cls.family}; "
                f"allowed: {allowed}"
            ) from None
    return ModelSource(
        model=str(model),
        revision=cfg.revision or None,
        variant=cfg.variant or None,
        vae=cfg.pretrained_vae_model_name_or_path or None,
        unet=cfg.pretrained_unet_model_name_or_path or None,
        unet_subfolder=cfg.pretrained_unet_subfolder or None,
        single_file=is_single_file(str(model)),
    )


def _pretrained_kwargs(src: ModelSource, *, subfolder: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if src.revision:
        kwargs["revision"] = src.revision
    if src.variant:
        kwargs["variant"] = src.variant
    return kwargs


def load_part(cls: Any, location: str, src: ModelSource, *, subfolder: str | None,
              torch_dtype: torch.dtype | None = None, use_variant: bool = True) -> Any:
    """``cls.from_pretrained`` with the configured revision/variant; clear error when missing."""
    kwargs = _pretrained_kwargs(src, subfolder=subfolder)
    if not use_variant:
        kwargs.pop("variant", None)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    local = Path(location)
    if local.exists() and subfolder and not (local / subfolder).is_dir():
        raise FileNotFoundError(
            f"{location} has no {subfolder}/ folder; expected a diffusers model folder "
            f"(model_index.json plus one subfolder per component)"
        )
    return cls.from_pretrained(location, **kwargs)


def load_components(adapter_cls: type[ModelAdapter], cfg: Any, *,
                    weight_dtype: torch.dtype = torch.float32) -> Components:
    """Load UNet, VAE, text encoders, tokenizers and the training noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from .base import Components

    src = resolve_source(adapter_cls, cfg)
    if src.single_file:
        comps = _from_single_file(adapter_cls, src, cfg, weight_dtype)
    else:
        model = src.model
        unet_loc = src.unet or model
        unet_sub = src.unet_subfolder if src.unet else (src.unet_subfolder or "unet")
        unet = load_part(UNet2DConditionModel, unet_loc, src, subfolder=unet_sub, torch_dtype=weight_dtype)
        vae = (load_part(AutoencoderKL, src.vae, src, subfolder=None, use_variant=False)
               if src.vae else load_part(AutoencoderKL, model, src, subfolder="vae"))
        text_encoders = [
            load_part(te_cls, model, src, subfolder=name, torch_dtype=weight_dtype)
            for te_cls, name in zip(adapter_cls.text_encoder_classes(), adapter_cls.text_encoder_names,
                                    strict=True)
        ]
        tokenizers = [
            load_part(tok_cls, model, src, subfolder=name, use_variant=False)
            for tok_cls, name in zip(adapter_cls.tokenizer_classes(), adapter_cls.tokenizer_names, strict=True)
        ]
        scheduler = load_part(DDPMScheduler, model, src, subfolder="scheduler", use_variant=False)
        comps = Components(unet, vae, text_encoders, tokenizers, scheduler, src)
    comps.noise_scheduler = training_scheduler(comps.noise_scheduler, cfg)
    comps.vae.requires_grad_(False)
    comps.vae.eval()
    comps.vae.to(dtype=vae_dtype(cfg))
    for te in comps.text_encoders:
        te.requires_grad_(False)
        te.eval()
    comps.unet.requires_grad_(False)
    return comps


def vae_dtype(cfg: Any) -> torch.dtype:
    """VAE weights stay in fp32 unless asked otherwise (SD VAEs overflow in fp16)."""
    choice = getattr(cfg, "vae_dtype", None) or "default"
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(choice, torch.float32)


def training_scheduler(scheduler: Any, cfg: Any) -> Any:
    """A DDPM scheduler carrying the model's betas, with the training-time overrides applied."""
    from diffusers import DDPMScheduler

    overrides: dict[str, Any] = {}
    if cfg.prediction_type:
        overrides["prediction_type"] = cfg.prediction_type
    if cfg.rescale_betas_zero_snr:
        overrides["rescale_betas_zero_snr"] = True
        overrides["timestep_spacing"] = "trailing"
    if cfg.training_scheduler_timestep_spacing:
        overrides["timestep_spacing"] = cfg.training_scheduler_timestep_spacing
    return DDPMScheduler.from_config(scheduler.config, **overrides)


def _from_single_file(adapter_cls: type[ModelAdapter], src: ModelSource, cfg: Any,
                      weight_dtype: torch.dtype) -> Components:
    """Load an original-format checkpoint through the family pipeline's ``from_single_file``."""
    import diffusers

    from .base import Components

    pipeline_cls = getattr(diffusers, adapter_cls.pipeline_class)
    if not hasattr(pipeline_cls, "from_single_file"):
        raise ValueError(
            f"model_family {adapter_cls.family} cannot load a single checkpoint file; "
            "point pretrained_model_name_or_path at a diffusers folder or hub id"
        )
    flavour = cfg.model_flavour or adapter_cls.default_flavour
    config_source = adapter_cls.flavours.get(flavour)
    kwargs: dict[str, Any] = {"torch_dtype": weight_dtype}
    if config_source:
        kwargs["config"] = config_source
    if src.revision:
        kwargs["revision"] = src.revision
    pipe = pipeline_cls.from_single_file(src.model, **kwargs)
    comps = Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=[getattr(pipe, n) for n in adapter_cls.text_encoder_names],
        tokenizers=[getattr(pipe, n) for n in adapter_cls.tokenizer_names],
        noise_scheduler=pipe.scheduler,
        source=src,
    )
    if src.vae:
        from diffusers import AutoencoderKL

        comps.vae = load_part(AutoencoderKL, src.vae, src, subfolder=None, use_variant=False)
    return comps
