"""DeepFloyd IF: pixel-space cascaded diffusion with a T5 encoder (``IFPipeline``, ``IFSuperResolutionPipeline``).

* Pixel space: no VAE (``uses_vae = False``); the latent cache stores the training pixels ``[-1, 1]``.
* Text: T5's last hidden state ``[B, L, d]`` for ``L = --tokenizer_max_length`` (77 by default, IF's own
  length; longer only with ``--i_know_what_i_am_doing``), encoded as ``IFPipeline.encode_prompt`` does
  (attention mask given to T5, no caption cleaning).
* Objective: the UNet predicts ε and a learned variance (``out_channels`` = 2·3); training uses the ε half
  with the DDPM ε objective, as SimpleTuner does (the variance half gets no gradient).
* Stage II (``ii-*`` flavours, or a local ``IFSuperResolutionPipeline`` folder): the super-resolution UNet
  takes 6 input channels and a class label. Training feeds the noisy image twice and the timesteps as class
  labels, as SimpleTuner (and diffusers' IF DreamBooth example) train it; validation upscales a flat
  quarter-size image through ``IFSuperResolutionPipeline``.

Flavours and hub ids are SimpleTuner 3.1.6's. SimpleTuner refuses to start without a flavour; kubetuner
falls back to ``i-xlarge-4.3b`` (stage I) when neither a flavour nor a model path is given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import UNET_ATTENTION_LORA_TARGETS, ModelFamily

#: T5 tokens per prompt when ``--tokenizer_max_length`` is unset (IFPipeline's length, SimpleTuner's limit)
T5_MAX_LENGTH = 77
FLAVOURS = {
    "i-medium-400m": "DeepFloyd/IF-I-M-v1.0",
    "i-large-900m": "DeepFloyd/IF-I-L-v1.0",
    "i-xlarge-4.3b": "DeepFloyd/IF-I-XL-v1.0",
    "ii-medium-450m": "DeepFloyd/IF-II-M-v1.0",
    "ii-large-1.2b": "DeepFloyd/IF-II-L-v1.0",
}
STAGE_II_PIPELINE = "IFSuperResolutionPipeline"
#: --slider_lora_target: the attention projections, input/output convs and the time embedding
IF_SLIDER_LORA_TARGETS = UNET_ATTENTION_LORA_TARGETS + ("conv_in", "conv_out", "time_embedding.linear_1",
                                                        "time_embedding.linear_2")


def t5_length(cfg: Any) -> int:
    """``--tokenizer_max_length`` or :data:`T5_MAX_LENGTH`."""
    return int(getattr(cfg, "tokenizer_max_length", None) or T5_MAX_LENGTH)


def _is_stage_ii_folder(location: str | None) -> bool:
    """A local pipeline folder saved from an IF super-resolution stage."""
    if not location:
        return False
    try:
        index = json.loads((Path(location).expanduser() / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == STAGE_II_PIPELINE


class DeepFloydFamily(ModelFamily):
    family = "deepfloyd"
    pipeline_class = "IFPipeline"
    flavours = FLAVOURS
    default_flavour = "i-xlarge-4.3b"
    uses_vae = False
    qkv_fusion = False  # its UNet's added key/value projections cannot be fused in diffusers
    prediction_types = ("epsilon",)
    default_lora_targets = UNET_ATTENTION_LORA_TARGETS  # SimpleTuner's DeepFloyd targets
    slider_lora_targets = IF_SLIDER_LORA_TARGETS
    modelspec_architecture = "deepfloyd-if-i"

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        """Stage II for an ``ii-*`` flavour or, no flavour named, a local super-resolution folder."""
        if (flavour or "").startswith("ii-") or (not flavour and _is_stage_ii_folder(location)):
            return DeepFloydStageIIFamily
        return cls

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_deepfloyd

        return build_tiny_deepfloyd(folder, stage=1, seed=seed)

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import T5EncoderModel

        return (T5EncoderModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import T5TokenizerFast

        return (T5TokenizerFast,)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        """``--train_text_encoder`` trains T5 with ``model_type=full`` (the saved pipeline carries it); a T5 LoRA is
        refused: IFPipeline's loader converts only CLIP-named text-encoder LoRA layers (``q_proj``…), so T5's
        ``q``/``k``/``v``/``o`` LoRA fails to load ("Could not automatically infer state dict type")."""
        problems = []
        if cfg.train_text_encoder and cfg.model_type == "lora":
            problems.append(Problem("train_text_encoder", True, "a LoRA on DeepFloyd's T5 encoder cannot be loaded: "
                                    "IFPipeline.load_lora_weights converts text-encoder LoRAs of CLIP layers only; "
                                    "train the UNet LoRA only, or use model_type=full"))
        if cfg.model_type == "lora" and cfg.lora_format == "comfyui":
            problems.append(Problem("lora_format", "comfyui", "ComfyUI has no DeepFloyd IF model, hence no LoRA "
                                                              "loader for it; use diffusers"))
        length = getattr(cfg, "tokenizer_max_length", None)
        if length and length > T5_MAX_LENGTH and not getattr(cfg, "i_know_what_i_am_doing", False):
            problems.append(Problem("tokenizer_max_length", length,
                                    f"DeepFloyd IF was trained on {T5_MAX_LENGTH} T5 tokens; use {T5_MAX_LENGTH} or "
                                    "less, or set i_know_what_i_am_doing to go beyond"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        from ...options import get_registry

        vae = cfg.pretrained_vae_model_name_or_path
        if vae and not get_registry().get("pretrained_vae_model_name_or_path").is_inert(vae):
            return [Problem("pretrained_vae_model_name_or_path", vae, "has no effect: DeepFloyd IF has no VAE")]
        return []

    def text_cache_identity(self) -> dict[str, Any]:
        return {"t5_length": t5_length(self.cfg)}

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """Prompts → ``prompt_embeds [B, L, d_t5]`` (T5's last hidden state, attention-masked)."""
        inputs = self.tokenizers[0](list(prompts), padding="max_length", max_length=t5_length(self.cfg),
                                    truncation=True, add_special_tokens=True, return_tensors="pt")
        encoder = (text_encoders or self.text_encoders)[0]
        embeds = encoder(inputs.input_ids.to(self.device), attention_mask=inputs.attention_mask.to(self.device))[0]
        return {"prompt_embeds": embeds}

    def unet_inputs(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The UNet's sample and extra arguments for noisy pixels (stage I: as they are)."""
        return noisy, {}

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """The ε half of the UNet's output ``[B, 6, H, W]`` (the other half is the learned variance)."""
        sample, extra = self.unet_inputs(noisy_latents, timesteps)
        out = denoiser(sample, timesteps, encoder_hidden_states=text["prompt_embeds"].to(noisy_latents.dtype),
                       return_dict=False, **extra)[0]
        return out[:, :noisy_latents.shape[1]]

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "watermarker": None,
                "requires_safety_checker": False}

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """IFPipeline's arguments: prompts as trained (no caption cleaning); it has no ``guidance_rescale``."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        kwargs["clean_caption"] = False
        return kwargs


class DeepFloydStageIIFamily(DeepFloydFamily):
    """IF stage II (super-resolution): 6-channel UNet input and a class label (see module)."""

    pipeline_class = STAGE_II_PIPELINE
    modelspec_architecture = "deepfloyd-if-ii"

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        return cls

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_deepfloyd

        return build_tiny_deepfloyd(folder, stage=2, seed=seed)

    @classmethod
    def load(cls, cfg: Any, *, device: torch.device | str = "cpu",
             weight_dtype: torch.dtype = torch.float32) -> ModelFamily:
        """The stage I components plus the ``image_noising_scheduler`` the super-resolution pipeline needs."""
        from ..loading import MODEL_OPTION, PIPELINE_LAYOUT, load_part

        family = super().load(cfg, device=device, weight_dtype=weight_dtype)
        src = family.components.source
        family.components.extra["image_noising_scheduler"] = load_part(
            cls.scheduler_class(), src.model, src, subfolder="image_noising_scheduler", option=MODEL_OPTION,
            what=PIPELINE_LAYOUT, use_variant=False)
        return family

    def unet_inputs(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.cat([noisy, noisy], dim=1), {"class_labels": timesteps}

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {**super().extra_pipeline_components(),
                "image_noising_scheduler": self.components.extra["image_noising_scheduler"]}

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Upscale a flat grey image of a quarter of the validation size (IF stage II's 4× step)."""
        from PIL import Image

        kwargs = super().pipeline_call_kwargs(kwargs)
        width, height = int(kwargs["width"]), int(kwargs["height"])
        kwargs["image"] = Image.new("RGB", (max(1, width // 4), max(1, height // 4)), (128, 128, 128))
        return kwargs


FAMILY = DeepFloydFamily
