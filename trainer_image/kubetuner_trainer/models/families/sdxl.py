"""Stable Diffusion XL: two CLIP encoders, pooled embeddings and size/crop micro-conditioning."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..family import ModelFamily
from .sd1x import clip_token_ids


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


class MicroConditionedFamily(ModelFamily):
    """Shared by SDXL-style UNets: ``text_embeds`` + ``time_ids`` as added conditioning."""

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        dtype = noisy_latents.dtype
        added = {
            "text_embeds": text["pooled_prompt_embeds"].to(dtype),
            "time_ids": add_time_ids(batch, noisy_latents, self.latent_downscale),
        }
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=text["prompt_embeds"].to(dtype),
                    added_cond_kwargs=added, return_dict=False)[0]


class SDXLFamily(MicroConditionedFamily):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    # the refiner (text_encoder_2 only, aesthetic-score conditioning) is a different layout: not offered
    flavours = {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0"}
    default_flavour = "base-1.0"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    modelspec_architecture = "stable-diffusion-xl-v1-base"

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_sdxl

        return build_tiny_sdxl(folder, seed=seed)

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


FAMILY = SDXLFamily
