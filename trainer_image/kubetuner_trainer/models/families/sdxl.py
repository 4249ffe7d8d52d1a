"""Stable Diffusion XL: two CLIP encoders, pooled embeddings and size/crop micro-conditioning.

The refiner flavours (``refiner-1.0``/``refiner-0.9``, or a local model folder whose
``model_index.json`` sets ``requires_aesthetics_score``) load :class:`SDXLRefinerFamily`: only the
OpenCLIP-bigG encoder (``text_encoder_2``), time ids (original h, w, crop top, left, aesthetic score)
with ``--data_aesthetic_score`` in the place of the target size, validation through
``StableDiffusionXLImg2ImgPipeline``, and — as SimpleTuner sets ``refiner_training`` when it finds a
refiner — timesteps restricted to the refiner's range (``--refiner_training_strength``,
``--refiner_training_invert_schedule``) unless ``--sdxl_refiner_uses_full_range``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import ModelFamily
from .sd1x import clip_token_ids

#: SimpleTuner 3.1.6's SDXL flavours (the refiners have their own layout: :class:`SDXLRefinerFamily`)
SDXL_FLAVOURS = {
    "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
    "refiner-0.9": "stabilityai/stable-diffusion-xl-refiner-0.9",
}
REFINER_FLAVOURS = ("refiner-1.0", "refiner-0.9")


def _pairs(values: Any, count: int, fallback: tuple[int, int]) -> list[tuple[int, int]]:
    if values is None:
        return [fallback] * count
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    pairs = [tuple(int(x) for x in v) for v in values]
    if len(pairs) != count:
        raise ValueError(f"batch carries {len(pairs)} size entries for {count} samples")
    return pairs  # type: ignore[return-value]


def add_time_ids(batch: Any, latents: torch.Tensor, downscale: int) -> torch.Tensor:
    """``[B, 6]`` rows of (original h, w, crop top, left, target h, w) in pixels."""
    count = latents.shape[0]
    pixel_size = (latents.shape[-2] * downscale, latents.shape[-1] * downscale)
    originals = _pairs(getattr(batch, "original_sizes", None), count, pixel_size)
    crops = _pairs(getattr(batch, "crop_coords", None), count, (0, 0))
    targets = _pairs(getattr(batch, "target_sizes", None), count, pixel_size)
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(originals, crops, targets, strict=True)]
    return torch.tensor(rows, dtype=latents.dtype, device=latents.device)


def refiner_time_ids(batch: Any, latents: torch.Tensor, downscale: int, aesthetic_score: float) -> torch.Tensor:
    """``[B, 5]`` rows of (original h, w, crop top, left, aesthetic score): the SDXL refiner's time ids."""
    count = latents.shape[0]
    pixel_size = (latents.shape[-2] * downscale, latents.shape[-1] * downscale)
    originals = _pairs(getattr(batch, "original_sizes", None), count, pixel_size)
    crops = _pairs(getattr(batch, "crop_coords", None), count, (0, 0))
    rows = [list(o) + list(c) + [aesthetic_score] for o, c in zip(originals, crops, strict=True)]
    return torch.tensor(rows, dtype=latents.dtype, device=latents.device)


def _is_refiner_folder(location: str | None) -> bool:
    """A local pipeline folder saved from a refiner (its ``model_index.json`` asks for aesthetic scores)."""
    if not location:
        return False
    index = Path(location).expanduser() / "model_index.json"
    try:
        return bool(json.loads(index.read_text()).get("requires_aesthetics_score"))
    except (OSError, ValueError):
        return False


class MicroConditionedFamily(ModelFamily):
    """Shared by SDXL-style UNets: ``text_embeds`` + ``time_ids`` as added conditioning."""

    def time_ids(self, batch: Any, noisy_latents: torch.Tensor) -> torch.Tensor:
        """The UNet's ``time_ids`` for a batch (``[B, 6]``: sizes and crops, :func:`add_time_ids`)."""
        return add_time_ids(batch, noisy_latents, self.latent_downscale)

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        dtype = noisy_latents.dtype
        added = {
            "text_embeds": text["pooled_prompt_embeds"].to(dtype),
            "time_ids": self.time_ids(batch, noisy_latents),
        }
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=text["prompt_embeds"].to(dtype),
                    added_cond_kwargs=added, return_dict=False)[0]


class SDXLFamily(MicroConditionedFamily):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    img2img_pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    flavours = SDXL_FLAVOURS
    default_flavour = "base-1.0"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    controlnet_class_name = "ControlNetModel"
    controlnet_pipeline_class = "StableDiffusionXLControlNetPipeline"

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_sdxl

        return build_tiny_sdxl(folder, seed=seed)

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        """The refiner class for a refiner flavour, or (no flavour named) a local refiner folder."""
        if flavour in REFINER_FLAVOURS or (not flavour and _is_refiner_folder(location)):
            return SDXLRefinerFamily
        return cls

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        """The refiner-only options, set for an SDXL base model (accepted and ignored, as SimpleTuner does)."""
        from ...options import get_registry

        if cls.for_flavour(cfg.model_flavour, cfg.pretrained_model_name_or_path) is not cls:
            return []
        registry = get_registry()
        return [Problem(option, getattr(cfg, option), "has no effect: only the SDXL refiner flavours read it")
                for option in ("sdxl_refiner_uses_full_range", "data_aesthetic_score")
                if not registry.get(option).is_inert(getattr(cfg, option))]

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return (CLIPTextModel, CLIPTextModelWithProjection)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTokenizer

        return (CLIPTokenizer, CLIPTokenizer)

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        hidden = []
        pooled = None
        for tok, te in zip(self.tokenizers, text_encoders or self.text_encoders, strict=True):
            out = te(clip_token_ids(tok, prompts, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the last encoder
        assert pooled is not None
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


class SDXLRefinerFamily(SDXLFamily):
    """The SDXL refiner: OpenCLIP-bigG alone, aesthetic-score time ids, img2img validation (see module)."""

    pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    text_encoder_names = ("text_encoder_2",)
    tokenizer_names = ("tokenizer_2",)
    modelspec_architecture = "stable-diffusion-xl-v1-refiner"
    controlnet_class_name = None  # diffusers has no refiner ControlNet pipeline
    controlnet_pipeline_class = None

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        return cls

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_sdxl_refiner

        return build_tiny_sdxl_refiner(folder, seed=seed)

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModelWithProjection

        return (CLIPTextModelWithProjection,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTokenizer

        return (CLIPTokenizer,)

    def make_objective(self) -> Any:
        """DDPM on the refiner's timesteps (all of them with ``--sdxl_refiner_uses_full_range``)."""
        from ...training.objectives import DDPMObjective

        refiner = None if self.cfg.sdxl_refiner_uses_full_range else True
        return DDPMObjective(self.cfg, self.noise_scheduler, self.prediction_type, refiner=refiner)

    def time_ids(self, batch: Any, noisy_latents: torch.Tensor) -> torch.Tensor:
        return refiner_time_ids(batch, noisy_latents, self.latent_downscale, float(self.cfg.data_aesthetic_score))

    def extra_pipeline_components(self) -> dict[str, Any]:
        # the refiner's published pipeline settings (its model_index.json)
        return {"text_encoder": None, "tokenizer": None, "requires_aesthetics_score": True,
                "force_zeros_for_empty_prompt": False}

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Img2img from a flat grey image at strength 1 (a full render from noise, as SimpleTuner's text-to-image
        validation of a refiner), conditioned on ``--data_aesthetic_score``; the size comes from the image."""
        from PIL import Image

        kwargs = dict(kwargs)
        width, height = kwargs.pop("width"), kwargs.pop("height")
        kwargs.update(image=Image.new("RGB", (int(width), int(height)), (128, 128, 128)), strength=1.0,
                      aesthetic_score=float(self.cfg.data_aesthetic_score))
        return kwargs


FAMILY = SDXLFamily
