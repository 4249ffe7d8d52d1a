"""Kolors: a ChatGLM text encoder feeding an SDXL-style UNet (penultimate states + last-token pool)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from .sdxl import MicroConditionedFamily

CHATGLM_MAX_LENGTH = 256


class KolorsFamily(MicroConditionedFamily):
    family = "kolors"
    pipeline_class = "KolorsPipeline"
    img2img_pipeline_class = "KolorsImg2ImgPipeline"
    flavours = {"1.0": "Kwai-Kolors/Kolors-diffusers"}
    default_flavour = "1.0"
    text_encoder_lora_targets = ("query_key_value", "dense")
    modelspec_architecture = "kolors"

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_kolors

        return build_tiny_kolors(folder, seed=seed)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        if cfg.model_type == "lora" and cfg.train_text_encoder:
            return [Problem("train_text_encoder", True,
                            "a LoRA on Kolors' ChatGLM text encoder cannot be loaded by diffusers' "
                            "KolorsPipeline; train the UNet LoRA only, or use model_type=full")]
        return []

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from diffusers.pipelines.kolors.text_encoder import ChatGLMModel

        return (ChatGLMModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

        return (ChatGLMTokenizer,)

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        tok, te = self.tokenizers[0], (text_encoders or self.text_encoders)[0]
        inputs = tok(list(prompts), padding="max_length", max_length=CHATGLM_MAX_LENGTH, truncation=True,
                     return_tensors="pt").to(self.device)
        out = te(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 position_ids=inputs["position_ids"], output_hidden_states=True)
        # ChatGLM returns [seq, batch, hidden]
        return {"prompt_embeds": out.hidden_states[-2].permute(1, 0, 2).clone(),
                "pooled_prompt_embeds": out.hidden_states[-1][-1, :, :].clone()}

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": False}


FAMILY = KolorsFamily
