"""Qwen-Image: a Qwen2.5-VL text encoder, an MMDiT on packed 2×2 latents, the Qwen-Image (Wan-style) VAE.

Conditioning is what ``QwenImagePipeline.encode_prompt`` returns — the last hidden state of
Qwen2.5-VL over the pipeline's chat template, with the template's first tokens dropped (the
pipeline's own template and drop index are used, by calling the pipeline) — padded with zeros to
``--tokenizer_max_length`` tokens (512 when unset, the pipeline's ``max_sequence_length``) so
cached embeddings stack; the token mask ``[B, L]`` travels with them and hides the padding from
attention, which makes the padding length irrelevant to the result.

Latents: the VAE encodes single frames ``[B, 3, 1, H, W]``; the frame axis is dropped and each
channel normalised with the VAE's ``latents_mean``/``latents_std`` (the pipeline's decode inverts
exactly that). The transformer sees ``[B, H/2·W/2, 64]`` tokens (Flux's packing) with timesteps
``σ`` in ``[0, 1]`` and is trained with rectified flow (:class:`FlowMatchingObjective`) on the
model's own scheduler (dynamic, resolution-dependent shift).

Flavours and hub ids are SimpleTuner 3.1.6's. The edit flavours (Qwen-Image-Edit and -Edit-2509)
train on paired reference images, which needs conditioning datasets: they are refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import DiffusersClass, ModelFamily
from .flux import pack_latents, unpack_latents

#: text tokens per prompt when ``--tokenizer_max_length`` is unset (QwenImagePipeline's max_sequence_length)
QWEN_MAX_LENGTH = 512
#: the most the pipeline accepts (QwenImagePipeline.check_inputs)
QWEN_LIMIT = 1024
EDIT_FLAVOURS = ("edit-v1", "edit-v2")
ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
#: image-stream attention, patch embedding, output projection and timestep embedding (as SD3's sliders)
SLIDER_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_in", "proj_out",
                  "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")
#: latents must pack into 2×2 patches of an 8× VAE: pixel sizes are multiples of this
PIXEL_MULTIPLE = 16


def text_length(cfg: Any) -> int:
    """``--tokenizer_max_length`` or :data:`QWEN_MAX_LENGTH`."""
    return int(getattr(cfg, "tokenizer_max_length", None) or QWEN_MAX_LENGTH)


def pad_tokens(embeds: torch.Tensor, mask: torch.Tensor | None, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``embeds [B, n, D]`` (and its mask ``[B, n]``, all ones when None) to ``length`` tokens."""
    b, n, _ = embeds.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
    if n < length:
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, length - n))
        mask = torch.nn.functional.pad(mask, (0, length - n))
    return embeds, mask.long()


class QwenImageFamily(ModelFamily):
    family = "qwen_image"
    pipeline_class = "QwenImagePipeline"
    flavours = {
        "v1.0": "Qwen/Qwen-Image",
        "edit-v1": "Qwen/Qwen-Image-Edit",
        "edit-v2": "Qwen/Qwen-Image-Edit-2509",
    }
    default_flavour = "v1.0"
    denoiser_name = "transformer"
    denoiser_class_name = "QwenImageTransformer2DModel"
    transformer_block_lists = ("transformer_blocks",)
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    vae_class = DiffusersClass("AutoencoderKLQwenImage")
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    prediction_types = ("flow_matching",)
    default_lora_targets = ATTENTION
    slider_lora_targets = SLIDER_TARGETS
    modelspec_architecture = "qwen-image"
    swappable_validation_scheduler = False  # validation samples with the model's FlowMatchEulerDiscreteScheduler

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return (Qwen2_5_VLForConditionalGeneration,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import Qwen2Tokenizer

        return (Qwen2Tokenizer,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        """A Qwen-Image-shaped pipeline: a 2-layer Qwen2.5-VL (tiny vision tower), a 2-block transformer,
        a 4× Qwen-Image VAE, the model's scheduler settings, a local byte-level Qwen2 tokenizer."""
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImagePipeline,
            QwenImageTransformer2DModel,
        )
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

        from ..tiny_llm import write_qwen2_tokenizer

        template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
        ids = write_qwen2_tokenizer(folder / "tokenizer", [template])
        torch.manual_seed(seed)
        text = dict(vocab_size=len(Qwen2Tokenizer.from_pretrained(folder / "tokenizer")), hidden_size=32,
                    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
                    bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
        vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                      fullatt_block_indexes=[0])
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"]))
        pipe = QwenImagePipeline(
            transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                    attention_head_dim=16, num_attention_heads=2,
                                                    joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
            vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                       temperal_downsample=[False, True]),
            # Qwen-Image's scheduler settings (dynamic exponential shift, terminal 0.02)
            scheduler=FlowMatchEulerDiscreteScheduler(
                base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True),
            text_encoder=encoder, tokenizer=Qwen2Tokenizer.from_pretrained(folder / "tokenizer"),
        )
        pipe.save_pretrained(folder)
        return folder

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        if cfg.model_flavour in EDIT_FLAVOURS:
            problems.append(Problem("model_flavour", cfg.model_flavour,
                                    "trains on paired reference images (conditioning datasets), which kubetuner "
                                    "does not implement yet; allowed: v1.0"))
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", True, "Qwen-Image's text encoder cannot be trained "
                                    "(QwenImagePipeline.load_lora_weights loads transformer LoRAs only)"))
        length = getattr(cfg, "tokenizer_max_length", None)
        if length is not None and not 1 <= length <= QWEN_LIMIT:
            problems.append(Problem("tokenizer_max_length", length, f"must be between 1 and {QWEN_LIMIT} for "
                                                                    "Qwen-Image"))
        alignment = getattr(cfg, "aspect_bucket_alignment", None)
        if alignment and alignment % PIXEL_MULTIPLE and not getattr(cfg, "i_know_what_i_am_doing", False):
            problems.append(Problem("aspect_bucket_alignment", alignment,
                                    f"Qwen-Image packs 2×2 patches of 8× latents: use a multiple of "
                                    f"{PIXEL_MULTIPLE} (SimpleTuner uses 32)"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        if cfg.validation_noise_scheduler:
            return [Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                            "has no effect for Qwen-Image: validation uses FlowMatchEulerDiscreteScheduler")]
        return []

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler's shift settings feed the objective

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        return FlowMatchingObjective(self.cfg, self.noise_scheduler.config)

    # ----- latents -------------------------------------------------------------------------
    @property
    def latent_downscale(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)  # QwenImagePipeline.vae_scale_factor

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` in ``[-1,1]`` → normalised latents ``[B,16,H/8,W/8]`` (posterior mean)."""
        vae = self.vae
        pixels = pixels.to(self.device, dtype=next(vae.parameters()).dtype)
        latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0].float()
        mean, std = self._latent_stats(latents)
        return (latents - mean) / std

    # ----- text ----------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        return {"text_length": text_length(self.cfg)}

    def _text_pipeline(self, encoder: torch.nn.Module) -> Any:
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=self.tokenizers[0],
                                 transformer=None)

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, L, D]`` and ``attention_mask [B, L]`` (see the module docstring)."""
        encoder = (text_encoders or self.text_encoders)[0]
        length = text_length(self.cfg)
        embeds, mask = self._text_pipeline(encoder).encode_prompt(list(prompts), device=self.device,
                                                                  max_sequence_length=length)
        embeds, mask = pad_tokens(embeds, mask, length)
        return {"prompt_embeds": embeds, "attention_mask": mask}

    # ----- training ------------------------------------------------------------------------
    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        b, _, h, w = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        out = denoiser(
            hidden_states=pack_latents(noisy_latents), timestep=timesteps.to(dtype) / 1000.0,
            encoder_hidden_states=text["prompt_embeds"].to(device, dtype),
            encoder_hidden_states_mask=text["attention_mask"].to(device),
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # ----- validation ------------------------------------------------------------------------
    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """QwenImagePipeline's arguments: the trained text length; no distilled guidance (the model has
        none); real CFG (``true_cfg_scale``, the pipeline's 4.0 by default) against the negative prompt,
        ``--validation_guidance_real`` above 1 replacing it (SimpleTuner's mapping)."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        if not self.denoiser.config.guidance_embeds:
            kwargs.pop("guidance_scale", None)
        kwargs["max_sequence_length"] = text_length(self.cfg)
        real = self.cfg.validation_guidance_real
        if real is not None and real > 1.0:
            kwargs["true_cfg_scale"] = float(real)
        return kwargs

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """ComfyUI reads Qwen-Image LoRAs by their diffusers layer path under ``transformer.``
        (its ``model_lora_keys_unet`` for QwenImage), with kohya's ``lora_down``/``lora_up``/``alpha``."""
        return f"{module_name}.{module_path}"


FAMILY = QwenImageFamily
