"""Stable Diffusion 1.x: one CLIP text encoder, the last hidden state as cross-attention context."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..family import ModelFamily


def clip_token_ids(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Pad/truncate to the tokenizer's full context length, as the SD pipelines do."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


class SD1xFamily(ModelFamily):
    family = "sd1x"
    pipeline_class = "StableDiffusionPipeline"
    img2img_pipeline_class = "StableDiffusionImg2ImgPipeline"
    flavours = {"1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5", "1.4": "CompVis/stable-diffusion-v1-4"}
    default_flavour = "1.5"
    modelspec_architecture = "stable-diffusion-v1"
    controlnet_class_name = "ControlNetModel"
    controlnet_pipeline_class = "StableDiffusionControlNetPipeline"

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_sd

        return build_tiny_sd(folder, seed=seed)

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        te = (text_encoders or self.text_encoders)[0]
        ids = clip_token_ids(self.tokenizers[0], prompts, self.device)
        return {"prompt_embeds": te(ids)[0]}

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        embeds = text["prompt_embeds"].to(noisy_latents.dtype)
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


FAMILY = SD1xFamily
