"""Wan 2.x text-to-video: a UMT5-conditioned 3-D diffusion transformer trained with rectified flow.

* **Latents.** ``AutoencoderKLWan`` compresses 8× in space and 4× in time (a clip of ``1 + 4k`` frames
  becomes ``1 + k`` latent frames); latents are normalised per channel with the VAE's
  ``latents_mean``/``latents_std``: ``(z − mean) / std``, the inverse of what ``WanPipeline`` does before
  decoding. Images (image datasets, ``encode_images``) are 1-frame clips ``[B, C, 1, h, w]``.
* **Text.** UMT5's last hidden state over ``512`` tokens (SimpleTuner fixes Wan's length at 512 and
  ignores ``--tokenizer_max_length``); positions past each prompt's tokens are zeroed, as
  ``WanPipeline`` does; ``--t5_padding`` is therefore moot.
* **Denoiser.** ``WanTransformer3DModel`` on ``[B, C, F, h, w]`` with 1×2×2 patches, timesteps
  ``1000·σ``; the velocity target ``ε − x₀`` (``FlowMatchingObjective``).
* **Flavours.** SimpleTuner 3.1.6's Wan flavours and hub ids. The text-to-video ones train here; the
  image-to-video, first/last-frame, VACE and TI2V ones need conditioning inputs this trainer does not
  build yet and are refused by name.
* **ComfyUI.** ``--lora_format comfyui`` names layers ``diffusion_model.<path>`` in the original Wan
  checkpoint's names (``blocks.0.self_attn.q``), which ComfyUI's Wan model keeps.
* **Validation.** ``WanPipeline`` renders ``--validation_num_video_frames`` frames (at most 81, as in
  SimpleTuner; 81 when unset), written as MP4, GIF and a first-frame PNG at ``--framerate`` (16 fps by
  default, Wan's native rate).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import DIT_QUANTIZATION_EXCLUDE, DiffusersClass, ModelFamily, RoutedTokens

#: UMT5 tokens per prompt (SimpleTuner's fixed Wan length; WanPipeline's max_sequence_length default)
TEXT_LENGTH = 512
#: SimpleTuner's Wan LoRA targets: the attention projections of every block
WAN_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: frames per latent frame after the first (AutoencoderKLWan's temporal compression, 2.1 and 2.2)
TEMPORAL_COMPRESSION = 4
#: the most frames SimpleTuner renders in a Wan validation clip
MAX_VALIDATION_FRAMES = 81
#: flavours that train here (text-to-video); the rest need image/frame conditioning inputs
TEXT_TO_VIDEO_FLAVOURS = ("t2v-480p-1.3b-2.1", "t2v-480p-14b-2.1")
#: diffusers' WanTransformer3DModel layer names -> the original Wan checkpoint's (diffusers' conversion
#: script, read backwards), applied to every dotted path segment run in order
ORIGINAL_LAYER_NAMES = (
    (r"\.attn1\.to_([qkv])\b", r".self_attn.\1"), (r"\.attn1\.to_out\.0\b", ".self_attn.o"),
    (r"\.attn1\.norm_([qk])\b", r".self_attn.norm_\1"),
    (r"\.attn2\.to_([qkv])\b", r".cross_attn.\1"), (r"\.attn2\.to_out\.0\b", ".cross_attn.o"),
    (r"\.attn2\.add_([kv])_proj\b", r".cross_attn.\1_img"), (r"\.attn2\.norm_([qk])\b", r".cross_attn.norm_\1"),
    (r"\.ffn\.net\.0\.proj\b", ".ffn.0"), (r"\.ffn\.net\.2\b", ".ffn.2"), (r"\.norm2\b", ".norm3"),
    (r"^condition_embedder\.text_embedder\.linear_([12])$", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.time_embedder\.linear_([12])$", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"), (r"^proj_out$", "head.head"),
)


class WanFamily(ModelFamily):
    family = "wan"
    pipeline_class = "WanPipeline"
    # SimpleTuner 3.1.6's Wan flavours and hub ids; t2v-480p-1.3b-2.1 is its default
    flavours = {
        "t2v-480p-1.3b-2.1": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "t2v-480p-14b-2.1": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "i2v-14b-2.1": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        "i2v-14b-2.1-720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        "i2v-14b-2.2-high": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        "i2v-14b-2.2-low": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        "flf2v-14b-2.1": "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers",
        "vace-1.3b-2.1": "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
        "vace-14b-2.1": "Wan-AI/Wan2.1-VACE-14B-diffusers",
        "ti2v-5b-2.2": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    }
    default_flavour = "t2v-480p-1.3b-2.1"
    denoiser_name = "transformer"
    denoiser_class_name = "WanTransformer3DModel"
    transformer_block_lists = ("blocks",)
    routed_tokens = (RoutedTokens(),)  # each block takes and returns the video tokens [B, F·h·w, D]
    scheduler_class_name = "UniPCMultistepScheduler"
    vae_class = DiffusersClass("AutoencoderKLWan")
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    trainable_text_encoder_names = ()  # WanPipeline.load_lora_weights loads transformer LoRAs only
    prediction_types = ("flow_matching",)
    default_lora_targets = WAN_LORA_TARGETS
    slider_lora_targets = WAN_LORA_TARGETS
    modelspec_architecture = "wan-2.1-t2v"
    quantization_exclude = DIT_QUANTIZATION_EXCLUDE
    comfyui_prefixes = {"transformer": "diffusion_model"}
    swappable_validation_scheduler = False  # validation samples with the model's own flow scheduler
    is_video = True
    default_framerate = 16

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import UMT5EncoderModel

        return (UMT5EncoderModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import T5TokenizerFast

        return (T5TokenizerFast,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_wan(folder, seed=seed)

    @classmethod
    def video_frame_count(cls, num_frames: int) -> int:
        """The largest ``1 + 4k ≤ num_frames`` (AutoencoderKLWan drops frames past the last full group)."""
        return 1 + (max(1, num_frames) - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        flavour = cfg.model_flavour
        if flavour and flavour not in TEXT_TO_VIDEO_FLAVOURS:
            problems.append(Problem("model_flavour", flavour,
                                    "needs image/frame conditioning inputs (image-to-video, first/last frame, VACE, "
                                    "TI2V), which kubetuner does not build yet; allowed: "
                                    + ", ".join(TEXT_TO_VIDEO_FLAVOURS)))
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", True, "WanPipeline loads transformer LoRAs only; "
                                                                "train the transformer alone"))
        alignment = cfg.aspect_bucket_alignment
        if alignment and alignment % 16:
            problems.append(Problem("aspect_bucket_alignment", alignment,
                                    "must be a multiple of 16 for Wan (8x VAE, 2x2 patches); use 32 as SimpleTuner "
                                    "does, or 64"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = []
        if cfg.tokenizer_max_length:
            warnings.append(Problem("tokenizer_max_length", cfg.tokenizer_max_length,
                                    f"has no effect for Wan: prompts are always {TEXT_LENGTH} tokens (as in "
                                    "SimpleTuner)"))
        if cfg.validation_noise_scheduler:
            warnings.append(Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                                    "has no effect for Wan: validation uses the model's flow scheduler"))
        return warnings

    @classmethod
    def resolve_prediction_type(cls, cfg: Any, scheduler: Any) -> str:
        """Flow matching (the hub's UniPC scheduler says ``flow_prediction``, its inference name for it)."""
        return cfg.prediction_type or cls.prediction_types[0]

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler is kept for validation

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        return FlowMatchingObjective(self.cfg, self.noise_scheduler.config)

    # ----- latents -----------------------------------------------------------------------------
    @property
    def latent_downscale(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def _normalise(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return (latents - mean) / std

    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clips ``[B, 3, F, H, W]`` in ``[-1, 1]`` → normalised latents ``[B, C, 1 + (F−1)//4, H/8, W/8]``
        (the posterior mean, so cached latents do not depend on RNG state)."""
        vae = self.vae
        pixels = pixels.to(self.device, dtype=next(vae.parameters()).dtype)
        latents = vae.encode(pixels).latent_dist.mode().float()
        return self._normalise(latents)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` → 1-frame latents ``[B, C, 1, H/8, W/8]``."""
        return self.encode_videos(pixels.unsqueeze(2))

    # ----- text ----------------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        return {"text_length": TEXT_LENGTH, "padding": "zeroed"}

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """UMT5's last hidden state ``[B, 512, d]`` with positions past each prompt zeroed, and the token
        mask ``[B, 512]`` (as ``WanPipeline.encode_prompt``, including its prompt clean-up)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        (encoder,) = text_encoders or self.text_encoders
        inputs = self.tokenizers[0]([prompt_clean(p) for p in prompts], padding="max_length", max_length=TEXT_LENGTH,
                                    truncation=True, add_special_tokens=True, return_attention_mask=True,
                                    return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        embeds = encoder(inputs.input_ids.to(self.device), mask).last_hidden_state
        return {"prompt_embeds": embeds * mask.unsqueeze(-1).to(embeds.dtype), "attention_mask": mask}

    # ----- training ------------------------------------------------------------------------------
    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """``noisy_latents [B, C, F, h, w]`` → the velocity prediction of the same shape."""
        dtype = noisy_latents.dtype
        return denoiser(hidden_states=noisy_latents, timestep=timesteps,
                        encoder_hidden_states=text["prompt_embeds"].to(noisy_latents.device, dtype),
                        return_dict=False)[0]

    def route_block_inputs(self, block_list: str, arguments: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """The rotary embedding rows (``(cos, sin)``, each ``[1, S, 1, D]``) and, with per-token timesteps
        (``temb [B, S, 6, D]``, Wan 2.2), the modulation of the kept tokens."""
        rope = arguments.get("rotary_emb")
        if rope is not None:
            arguments["rotary_emb"] = tuple(r.index_select(1, keep.to(r.device)) for r in rope)
        temb = arguments.get("temb")
        if temb is not None and temb.dim() == 4:
            arguments["temb"] = temb.index_select(1, keep.to(temb.device))
        return arguments

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """``diffusion_model.<path>`` in the original Wan layer names (:data:`ORIGINAL_LAYER_NAMES`), e.g.
        ``blocks.0.attn1.to_q`` → ``diffusion_model.blocks.0.self_attn.q``."""
        for pattern, replacement in ORIGINAL_LAYER_NAMES:
            module_path = re.sub(pattern, replacement, module_path)
        return f"{cls.comfyui_prefixes[module_name]}.{module_path}"

    # ----- validation ----------------------------------------------------------------------------
    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"transformer_2": None}

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """WanPipeline's arguments: ``--validation_num_video_frames`` (≤ 81; 81 when unset), 512 text tokens,
        PIL frames; ``guidance_rescale`` does not exist for Wan and is left out."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        asked = getattr(self.cfg, "validation_num_video_frames", None)
        kwargs.update(num_frames=self.video_frame_count(min(MAX_VALIDATION_FRAMES, asked or MAX_VALIDATION_FRAMES)),
                      max_sequence_length=TEXT_LENGTH, output_type="pil")
        return kwargs


def tiny_wan_transformer_config() -> dict[str, Any]:
    """``WanTransformer3DModel`` config for tests: two blocks, 2 heads of 12 (rope splits 4/4/4)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_tiny_wan(folder: Path, *, seed: int = 0) -> Path:
    """A Wan-shaped pipeline folder: UMT5, a 2-block transformer, a 4-channel AutoencoderKLWan with Wan's
    real compression (8× space, 4× time), and the hub's UniPC flow scheduler settings."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from ..tiny import _add_index, _save, write_t5_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 2.0, 0.8, 1.2])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                               relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    folder = _save(folder, "WanPipeline", {
        "transformer": WanTransformer3DModel(**tiny_wan_transformer_config()), "vae": vae,
        "text_encoder": text_encoder, "scheduler": scheduler, "transformer_2": None,
    })
    write_t5_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "T5TokenizerFast")
    return folder


FAMILY = WanFamily
