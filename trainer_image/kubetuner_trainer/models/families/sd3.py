"""Stable Diffusion 3 / 3.5: an MMDiT trained with rectified flow on two CLIP encoders plus T5.

Conditioning (as ``StableDiffusion3Pipeline.encode_prompt`` builds it):

* CLIP-L and CLIP-G each give their penultimate hidden states ``[B, 77, d_l]``/``[B, 77, d_g]``
  and their projected pooled output; the hidden states are concatenated on the feature axis and
  zero-padded up to the T5 width, the pooled outputs concatenated into ``pooled_prompt_embeds``
  ``[B, d_l + d_g]``.
* T5 gives ``[B, L, d_t5]`` for ``L = --tokenizer_max_length`` (default 154, SimpleTuner's SD3
  limit); ``--t5_padding zero`` multiplies the padding positions by their attention mask (0).
* ``prompt_embeds = cat(clip, t5)`` on the sequence axis: ``[B, 77 + L, d_t5]``.

The unconditional (empty) caption — what caption dropout trains — is encoded from ``""`` or, with
``--sd3_clip_uncond_behaviour zero`` / ``--sd3_t5_uncond_behaviour zero``, replaced by zeros in the
CLIP part (sequence and pooled) / the T5 part. The T5 behaviour follows the CLIP one when unset
(SimpleTuner's rule). SD3's transformer takes no attention mask, so none is cached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import DIT_QUANTIZATION_EXCLUDE, ModelFamily, RoutedTokens
from .sd1x import clip_token_ids

log = logging.getLogger(__name__)

#: SD3ControlNetModel's LoRA layers (SimpleTuner's SD3 ControlNet targets): every attention and feed-forward
#: projection, the patch and text embedders, the time/text embedding and the zero-initialised output blocks
CONTROLNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "pos_embed.proj", "pos_embed_input.proj",
    "context_embedder", "timestep_embedder.linear_1", "timestep_embedder.linear_2", "text_embedder.linear_1",
    "text_embedder.linear_2", *(f"controlnet_blocks.{i}" for i in range(64)),
)
#: T5 tokens per prompt when ``--tokenizer_max_length`` is unset (SimpleTuner's SD3 default and limit)
T5_MAX_LENGTH = 154
UNCOND_BEHAVIOURS = ("empty_string", "zero")
#: SimpleTuner's SD3 LoRA targets (the attention projections of every joint block)
SD3_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: --slider_lora_target: the image stream's joint attention, patch embedding, output projection and
#: timestep embedding (the UNet preset's counterparts in the MMDiT)
SD3_SLIDER_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "pos_embed.proj", "proj_out",
                           "time_text_embed.timestep_embedder.linear_1",
                           "time_text_embed.timestep_embedder.linear_2")


def t5_length(cfg: Any) -> int:
    """``--tokenizer_max_length`` or :data:`T5_MAX_LENGTH`."""
    return int(getattr(cfg, "tokenizer_max_length", None) or T5_MAX_LENGTH)


def uncond_behaviours(cfg: Any) -> tuple[str, str]:
    """(CLIP, T5) behaviour for empty captions; T5 follows CLIP when unset."""
    clip = getattr(cfg, "sd3_clip_uncond_behaviour", None) or "empty_string"
    return clip, getattr(cfg, "sd3_t5_uncond_behaviour", None) or clip


def skip_layers(cfg: Any) -> list[int]:
    """``--validation_guidance_skip_layers`` as a list of block indices (JSON text or a list); ``[]`` when unset.

    Raises ``ValueError`` when it is not a list of non-negative integers.
    """
    value = getattr(cfg, "validation_guidance_skip_layers", None)
    if value in (None, ""):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("must be a JSON list of transformer block numbers, e.g. [7, 8, 9]") from None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ValueError("must be a list of transformer block numbers, e.g. [7, 8, 9]")
    return list(value)


class SD3Family(ModelFamily):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    img2img_pipeline_class = "StableDiffusion3Img2ImgPipeline"
    # SimpleTuner 3.1.6's SD3 flavours (both SD 3.5); medium is its default
    flavours = {"medium": "stabilityai/stable-diffusion-3.5-medium",
                "large": "stabilityai/stable-diffusion-3.5-large"}
    default_flavour = "medium"
    denoiser_name = "transformer"
    transformer_block_lists = ("transformer_blocks",)
    qkv_fusion = False  # diffusers' fused joint processor fails on SD3's blocks without a context stream
    #: joint blocks return ``(encoder_hidden_states, hidden_states)``; no per-token side inputs (positions are
    #: added to the tokens before the blocks)
    routed_tokens = (RoutedTokens(output=1),)
    denoiser_class_name = "SD3Transformer2DModel"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_location_options = {"pretrained_t5_model_name_or_path": "text_encoder_3"}
    # diffusers' SD3 LoRA loader reads transformer and CLIP LoRAs only: T5 stays frozen (as in SimpleTuner)
    trainable_text_encoder_names = ("text_encoder", "text_encoder_2")
    prediction_types = ("flow_matching",)
    default_lora_targets = SD3_LORA_TARGETS
    slider_lora_targets = SD3_SLIDER_LORA_TARGETS
    modelspec_architecture = "stable-diffusion-3"
    quantization_exclude = DIT_QUANTIZATION_EXCLUDE
    controlnet_class_name = "SD3ControlNetModel"
    controlnet_pipeline_class = "StableDiffusion3ControlNetPipeline"
    controlnet_constructor = "from_transformer"
    controlnet_input = "latents"
    controlnet_image_argument = "control_image"
    controlnet_lora_targets = CONTROLNET_LORA_TARGETS
    # ComfyUI's SD3 LoRA names: OneTrainer's lora_transformer_*, kohya's lora_te1/te2 for CLIP-L/G, lora_te3 for T5
    comfyui_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te1",
                        "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_sd3

        return build_tiny_sd3(folder, seed=seed)

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTokenizer, T5TokenizerFast

        return (CLIPTokenizer, CLIPTokenizer, T5TokenizerFast)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        try:
            skip_layers(cfg)
        except ValueError as exc:
            problems.append(Problem("validation_guidance_skip_layers", cfg.validation_guidance_skip_layers, str(exc)))
        length = getattr(cfg, "tokenizer_max_length", None)
        if length and length > T5_MAX_LENGTH and not getattr(cfg, "i_know_what_i_am_doing", False):
            problems.append(Problem("tokenizer_max_length", length,
                                    f"SD3 was trained on at most {T5_MAX_LENGTH} T5 tokens; use {T5_MAX_LENGTH} or "
                                    "less, or set i_know_what_i_am_doing to go beyond"))
        return problems

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        """The model's own ``FlowMatchEulerDiscreteScheduler`` (the objective reads its shift line)."""
        return scheduler

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        return FlowMatchingObjective(self.cfg, self.noise_scheduler.config)

    def text_cache_identity(self) -> dict[str, Any]:
        return {"t5_length": t5_length(self.cfg), "t5_padding": self.cfg.t5_padding or "unmodified",
                "uncond": list(uncond_behaviours(self.cfg))}

    # ----- conditioning ------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """Prompts → ``prompt_embeds [B, 77 + L, d_t5]`` and ``pooled_prompt_embeds [B, d_l + d_g]`` (see module)."""
        prompts = list(prompts)
        encoders = list(text_encoders or self.text_encoders)
        hidden, pooled = [], []
        for tok, te in zip(self.tokenizers[:2], encoders[:2], strict=True):
            out = te(clip_token_ids(tok, prompts, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        pooled_embeds = torch.cat(pooled, dim=-1)
        t5 = self._t5_embeds(prompts, encoders[2])
        clip_behaviour, t5_behaviour = uncond_behaviours(self.cfg)
        empty = torch.tensor([p == "" for p in prompts], device=clip.device).view(-1, 1, 1)
        if clip_behaviour == "zero":
            clip = clip.masked_fill(empty, 0.0)
            pooled_embeds = pooled_embeds.masked_fill(empty.view(-1, 1), 0.0)
        if t5_behaviour == "zero":
            t5 = t5.masked_fill(empty, 0.0)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_prompt_embeds": pooled_embeds}

    def _t5_embeds(self, prompts: list[str], encoder: torch.nn.Module) -> torch.Tensor:
        """T5 last hidden states ``[B, L, d_t5]``; padding zeroed with ``--t5_padding zero``."""
        inputs = self.tokenizers[2](prompts, padding="max_length", max_length=t5_length(self.cfg), truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
        embeds = encoder(inputs.input_ids.to(self.device))[0]
        if (self.cfg.t5_padding or "unmodified") == "zero":
            embeds = embeds * inputs.attention_mask.to(embeds.device, embeds.dtype).unsqueeze(-1)
        return embeds

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        dtype = noisy_latents.dtype
        return denoiser(hidden_states=noisy_latents, timestep=timesteps,
                        encoder_hidden_states=text["prompt_embeds"].to(dtype),
                        pooled_projections=text["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]

    # ----- ControlNet ---------------------------------------------------------------------------
    @classmethod
    def controlnet_init_kwargs(cls, components: Any) -> dict[str, Any]:
        """No extra conditioning channel: the control image's 16 latent channels only (SimpleTuner's choice); 12
        blocks (diffusers' default), at most those before the transformer's last (which has no context output)."""
        return {"num_extra_conditioning_channels": 0, "num_layers": min(12, components.denoiser.config.num_layers - 1)}

    def controlnet_residuals(self, controlnet, control, args, kwargs):
        """SD3ControlNetModel's per-block residuals. As StableDiffusion3ControlNetPipeline, a ControlNet whose config
        sets ``force_zeros_for_pooled_projection`` (InstantX's layout, also what ``from_transformer`` builds) reads
        zero pooled projections and control latents without the VAE's shift."""
        config = controlnet.config
        pooled = kwargs["pooled_projections"]
        if config.force_zeros_for_pooled_projection:
            pooled = torch.zeros_like(pooled)
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            control = control + shift * self.vae.config.scaling_factor
        hidden = kwargs["hidden_states"]
        samples = controlnet(hidden_states=hidden, controlnet_cond=control.to(hidden.dtype),
                             encoder_hidden_states=kwargs["encoder_hidden_states"], pooled_projections=pooled,
                             timestep=kwargs["timestep"], return_dict=False)[0]
        return {"block_controlnet_hidden_states": samples}

    # ----- validation ----------------------------------------------------------------------------
    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The T5 length trained with and skip-layer guidance (``--validation_guidance_skip_*``);
        ``guidance_rescale`` does not exist for SD3 and is left out."""
        kwargs = dict(kwargs)
        if kwargs.pop("guidance_rescale", None):
            log.warning("validation_guidance_rescale has no effect on StableDiffusion3Pipeline")
        kwargs["max_sequence_length"] = t5_length(self.cfg)
        layers = skip_layers(self.cfg)
        if layers:
            cfg = self.cfg
            kwargs.update(skip_guidance_layers=layers,
                          skip_layer_guidance_start=float(cfg.validation_guidance_skip_layers_start),
                          skip_layer_guidance_stop=float(cfg.validation_guidance_skip_layers_stop),
                          skip_layer_guidance_scale=float(cfg.validation_guidance_skip_scale))
        return kwargs


FAMILY = SD3Family
