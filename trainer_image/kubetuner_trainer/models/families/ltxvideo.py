"""LTX-Video (ltxvideo): a rectified-flow video transformer on 128-channel latents of the LTX video VAE.

Latents and tokens (as ``LTXPipeline`` builds them, diffusers 0.42.1):

* ``AutoencoderKLLTXVideo`` turns pixels ``[B, 3, F, H, W]`` in ``[-1, 1]`` into ``[B, C, f, h, w]`` with
  ``f = (F − 1)/t + 1``, ``h = H/s``, ``w = W/s`` (``t``/``s``: the VAE's temporal/spatial compression,
  8 and 32 for the released VAEs). Latents are normalised per channel with the VAE's ``latents_mean``
  and ``latents_std`` buffers: ``(z − mean)·scaling_factor/std``. An image ``[B, 3, H, W]`` is a
  one-frame clip (``f = 1``), so image datasets train too.
* The transformer sees ``f·h·w`` tokens of ``C`` features (patch sizes 1), frame-major, with rotary
  positions scaled by ``(t/frame_rate, s, s)``; ``--framerate`` (25 when unset, SimpleTuner's value) is
  the frame rate.
* Prompts: T5 last hidden states ``[B, 128, D]`` and their token mask ``[B, 128]``, which the
  transformer uses as cross-attention mask (128 tokens: ``LTXPipeline``'s ``max_sequence_length``,
  through which SimpleTuner encodes; ``--tokenizer_max_length`` is ignored, as there).

Noise levels: flow-matching sigmas from the ``--flow_*`` options; ``--flow_schedule_auto_shift`` picks
the shift from the clip's token count ``f·h·w`` on the scheduler's line, as ``LTXPipeline`` computes
``mu`` for sampling.

Image-to-video training (first-frame conditioning, the way ``LTXImageToVideoPipeline`` samples: the
first latent frame is the condition, its tokens carry their own timestep, and only the other frames are
denoised): a sample of a dataset trained as i2v (``--ltx_train_mode i2v``, SimpleTuner's default) with
more than one latent frame is conditioned

* always with ``--ltx_protect_first_frame``: its first frame stays clean (noise level 0);
* otherwise with probability ``--ltx_i2v_prob``: its first frame gets a small share of the clip's noise
  level, ``σ₀ = u·--ltx_partial_noise_fraction·σ`` with ``u ~ U(0, 1)``.

A conditioned frame is input, not target: it is left out of the loss. Timesteps of a batch with a
conditioned sample are per frame, ``[B, f]``; a frame below its clip's level is a condition frame.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ...training.losses import element_loss, resize_mask
from ...training.objectives import FLOW_TIMESTEP_SCALE, FlowMatchingObjective
from ..family import DIT_QUANTIZATION_EXCLUDE, DiffusersClass, ModelFamily

log = logging.getLogger(__name__)

#: T5 tokens per prompt: LTXPipeline's ``max_sequence_length`` default, which SimpleTuner's encoding uses
T5_MAX_LENGTH = 128
#: validation clip length: ``--validation_num_video_frames`` capped here, as SimpleTuner does for LTX
MAX_VALIDATION_FRAMES = 125
#: pixel frames per latent frame after the first in the released LTX VAEs
TEMPORAL_COMPRESSION = 8
#: LTXPipeline refuses sizes that are not multiples of this (its ``check_inputs``)
PIPELINE_SIZE_MULTIPLE = 32
#: diffusers name → original LTX-Video checkpoint name of the transformer's top-level layers that differ
#: (the reverse of diffusers' ``convert_ltx_transformer_checkpoint_to_diffusers`` renames)
ORIGINAL_LAYER_NAMES = {"proj_in": "patchify_proj", "time_embed": "adaln_single"}


def pack_latents(latents: torch.Tensor, patch_size: int = 1, patch_size_t: int = 1) -> torch.Tensor:
    """``[B, C, F, H, W]`` → ``[B, F/pt·H/p·W/p, C·pt·p·p]`` tokens, frame-major (``LTXPipeline._pack_latents``)."""
    b, c, f, h, w = latents.shape
    patches = latents.reshape(b, c, f // patch_size_t, patch_size_t, h // patch_size, patch_size,
                              w // patch_size, patch_size)
    return patches.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_latents(tokens: torch.Tensor, num_frames: int, height: int, width: int, patch_size: int = 1,
                   patch_size_t: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; ``num_frames``/``height``/``width`` count patches, not latent pixels."""
    b = tokens.shape[0]
    grid = tokens.reshape(b, num_frames, height, width, -1, patch_size_t, patch_size, patch_size)
    return grid.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def frame_sigmas(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Model timesteps ``[B]`` or per frame ``[B, F]`` → sigmas broadcastable against ``like`` ``[B, C, F, …]``."""
    sigmas = (timesteps.float() / FLOW_TIMESTEP_SCALE).to(like.device)
    if sigmas.dim() == 2:
        return sigmas.view(sigmas.shape[0], 1, sigmas.shape[1], *([1] * (like.dim() - 3)))
    return sigmas.view(-1, *([1] * (like.dim() - 1)))


def condition_frames(timesteps: torch.Tensor) -> torch.Tensor:
    """``[B, F]`` bool: the frames held below their clip's noise level (condition frames); ``[B, 0]`` for ``[B]``."""
    if timesteps.dim() < 2:
        return torch.zeros(timesteps.shape[0], 0, dtype=torch.bool, device=timesteps.device)
    return timesteps < timesteps.amax(dim=1, keepdim=True)


def condition_first_frame(timesteps: torch.Tensor, num_frames: int, eligible: Sequence[bool], *, protect: bool,
                          probability: float, partial_fraction: float,
                          generator: torch.Generator | None) -> torch.Tensor:
    """Per-frame timesteps ``[B, F]`` with the first frame of the chosen samples as condition (module docstring).

    ``timesteps``: the clips' levels ``[B]``; ``eligible``: which samples may be conditioned (i2v data).
    Returns ``timesteps`` unchanged when no sample is conditioned (or the clips have one frame). Draws two
    numbers per sample from ``generator`` whatever the outcome, so the random stream stays aligned.
    """
    draw = torch.rand(timesteps.shape[0], generator=generator)
    strength = torch.rand(timesteps.shape[0], generator=generator)
    chosen = torch.tensor(list(eligible), dtype=torch.bool) & (torch.full_like(draw, protect, dtype=torch.bool)
                                                                | (draw < probability))
    if num_frames < 2 or not bool(chosen.any()):
        return timesteps
    first = torch.zeros_like(timesteps) if protect else timesteps * strength * partial_fraction
    per_frame = timesteps[:, None].repeat(1, num_frames)
    per_frame[:, 0] = torch.where(chosen, first, timesteps)
    return per_frame


class LTXVideoObjective(FlowMatchingObjective):
    """Flow matching on 5-D video latents with per-frame noise levels and the clip-length shift."""

    def __init__(self, cfg: Any, scheduler_config: Any, *, patch_size: int = 1, patch_size_t: int = 1):
        super().__init__(cfg, scheduler_config)
        self.patch_size, self.patch_size_t = patch_size, patch_size_t

    def sequence_length(self, latents: torch.Tensor) -> int:
        """Transformer tokens of one clip ``[B, C, F, H, W]`` (LTXPipeline's ``video_sequence_length``)."""
        f, h, w = latents.shape[-3:]
        return (f // self.patch_size_t) * (h // self.patch_size) * (w // self.patch_size)

    def sample_timesteps(self, latents, generator):
        sigmas = self.schedule.sample(latents.shape[0], generator, tuple(latents.shape[-2:]),
                                      seq_len=self.sequence_length(latents))
        return sigmas * FLOW_TIMESTEP_SCALE

    @staticmethod
    def sigmas(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return frame_sigmas(timesteps, like)

    def loss(self, cfg, pred, target, timesteps, mask=None):
        """Velocity MSE over the frames that are denoised (condition frames excluded), optionally masked
        by a per-sample image mask ``[B, 1, H, W]`` applied to every frame."""
        loss = element_loss(pred.float(), target.float(), "l2")
        weight = torch.ones_like(loss[:, :1])
        held = condition_frames(timesteps.to(loss.device))
        if held.shape[1]:
            weight = weight * (~held).to(loss.dtype).view(held.shape[0], 1, held.shape[1], 1, 1)
        if mask is not None:
            weight = weight * resize_mask(mask, loss[:, :, 0]).unsqueeze(2)
        weight = weight.expand_as(loss)
        return ((loss * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp(min=1.0)).mean()


class LTXVideoFamily(ModelFamily):
    family = "ltxvideo"
    pipeline_class = "LTXPipeline"
    # SimpleTuner 3.1.6's LTX flavours; 0.9.5 is its default
    flavours = {"0.9.5": "Lightricks/LTX-Video-0.9.5", "0.9.0": "Lightricks/LTX-Video"}
    default_flavour = "0.9.5"
    denoiser_name = "transformer"
    denoiser_class_name = "LTXVideoTransformer3DModel"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    prediction_types = ("flow_matching",)
    # LoRA targets: the inherited to_k/to_q/to_v/to_out.0 (SimpleTuner's LTX default): every block's attn1 and attn2
    slider_lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "proj_in", "proj_out")
    modelspec_architecture = "ltx-video"
    quantization_exclude = DIT_QUANTIZATION_EXCLUDE
    comfyui_prefixes = {"transformer": "diffusion_model"}
    swappable_validation_scheduler = False  # LTXPipeline samples with its FlowMatchEulerDiscreteScheduler
    is_video = True
    transformer_block_lists = ("transformer_blocks",)
    qkv_fusion = False  # its attention processor calls the separate projections
    #: frames per second when ``--framerate`` is unset (SimpleTuner's LTX value and LTXPipeline's default)
    default_framerate = 25
    vae_class = DiffusersClass("AutoencoderKLLTXVideo")

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import T5EncoderModel

        return (T5EncoderModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import T5TokenizerFast

        return (T5TokenizerFast,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_ltxvideo(folder, seed=seed)

    @classmethod
    def video_frame_count(cls, num_frames: int) -> int:
        """The largest ``1 + 8k ≤ num_frames``: the released VAEs compress 8 frames into one latent frame after
        the first (LTXPipeline's ``(F − 1)/8 + 1``)."""
        return 1 + (max(1, num_frames) - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        if cfg.train_text_encoder and cfg.model_type == "lora":
            problems.append(Problem("train_text_encoder", True, "LTXPipeline.load_lora_weights loads transformer "
                                                                "LoRA weights only; leave the T5 encoder frozen"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = []
        if cfg.tokenizer_max_length:
            warnings.append(Problem("tokenizer_max_length", cfg.tokenizer_max_length,
                                    f"has no effect for ltxvideo: prompts are {T5_MAX_LENGTH} T5 tokens, as "
                                    "LTXPipeline encodes them (SimpleTuner ignores it too)"))
        if cfg.t5_padding == "zero":
            warnings.append(Problem("t5_padding", "zero", "has no effect for ltxvideo: the transformer masks "
                                                          "T5 padding tokens out of cross-attention"))
        if cfg.validation_noise_scheduler:
            warnings.append(Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                                    "has no effect for ltxvideo: validation uses FlowMatchEulerDiscreteScheduler"))
        alignment = cfg.aspect_bucket_alignment
        if alignment and alignment % PIPELINE_SIZE_MULTIPLE:
            warnings.append(Problem("aspect_bucket_alignment", alignment,
                                    f"LTX-Video's VAE encodes {PIPELINE_SIZE_MULTIPLE}x{PIPELINE_SIZE_MULTIPLE}-pixel "
                                    f"blocks: sizes that are not multiples of {PIPELINE_SIZE_MULTIPLE} lose or pad "
                                    "pixels (SimpleTuner forces 64)"))
        frames = cfg.validation_num_video_frames
        if frames and frames > MAX_VALIDATION_FRAMES:
            warnings.append(Problem("validation_num_video_frames", frames,
                                    f"ltxvideo renders at most {MAX_VALIDATION_FRAMES} frames (as SimpleTuner)"))
        return warnings

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler is kept for validation

    def make_objective(self) -> Any:
        config = self.denoiser.config
        return LTXVideoObjective(self.cfg, self.noise_scheduler.config, patch_size=config.patch_size,
                                 patch_size_t=config.patch_size_t)

    # ----- latents ---------------------------------------------------------------------------
    @property
    def latent_downscale(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` → latents ``[B, C, 1, h, w]`` of one-frame clips."""
        return self.encode_videos(pixels.unsqueeze(2))

    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clips ``[B, 3, F, H, W]`` in ``[-1, 1]`` → normalised latents ``[B, C, f, h, w]`` (the posterior
        mean; module docstring for the normalisation)."""
        vae = self.vae
        pixels = pixels.to(self.device, dtype=next(vae.parameters()).dtype)
        latents = vae.encode(pixels).latent_dist.mode().float()
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
        return (latents - mean) * vae.config.scaling_factor / std

    # ----- text ----------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        return {"t5_max_length": T5_MAX_LENGTH}

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """T5 last hidden states ``[B, 128, D]`` and the token mask ``[B, 128]`` (1 = real token), as
        ``LTXPipeline.encode_prompt``: padded to 128 tokens, T5 run without a mask."""
        (t5,) = text_encoders or self.text_encoders
        inputs = self.tokenizers[0](list(prompts), padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
        embeds = t5(inputs.input_ids.to(self.device))[0]
        return {"prompt_embeds": embeds, "prompt_attention_mask": inputs.attention_mask.to(self.device)}

    # ----- training ------------------------------------------------------------------------
    @property
    def frame_rate(self) -> float:
        """``--framerate``, else 25."""
        return self.output_framerate(self.cfg)

    def rope_interpolation_scale(self) -> tuple[float, float, float]:
        """LTXPipeline's ``(temporal compression / frame rate, spatial compression, spatial compression)``."""
        vae = self.vae
        return (vae.temporal_compression_ratio / self.frame_rate, vae.spatial_compression_ratio,
                vae.spatial_compression_ratio)

    def i2v_samples(self, batch: Any, count: int) -> list[bool]:
        """Which samples of a batch are image-to-video data: the batch's dataset ``video.is_i2v`` when set,
        else ``--ltx_train_mode i2v`` (SimpleTuner's rule for an unset ``is_i2v``)."""
        flag = getattr(batch, "is_i2v", None)
        if flag is None:
            flag = self.cfg.ltx_train_mode == "i2v"
        return [bool(flag)] * count

    def sample_timesteps(self, batch, latents, generator):
        """The clips' noise levels ``[B]``, per frame ``[B, F]`` when a sample is conditioned on its first frame."""
        cfg = self.cfg
        timesteps = self.objective.sample_timesteps(latents, generator)
        return condition_first_frame(timesteps, latents.shape[2], self.i2v_samples(batch, latents.shape[0]),
                                     protect=bool(cfg.ltx_protect_first_frame), probability=float(cfg.ltx_i2v_prob),
                                     partial_fraction=float(cfg.ltx_partial_noise_fraction), generator=generator)

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """The velocity ``[B, C, F, h, w]`` for latents ``[B, C, F, h, w]``; per-frame timesteps ``[B, F]`` (a
        condition frame) reach the transformer per token, ``[B, F·h·w]``, as LTXImageToVideoPipeline passes them."""
        b, _, f, h, w = noisy_latents.shape
        config = self.denoiser.config
        p, pt = config.patch_size, config.patch_size_t
        dtype, device = noisy_latents.dtype, noisy_latents.device
        if timesteps.dim() == 2:  # per frame → per token (frame-major, as packed)
            timesteps = timesteps.repeat_interleave((h // p) * (w // p), dim=1)
        out = denoiser(
            hidden_states=pack_latents(noisy_latents, p, pt),
            encoder_hidden_states=text["prompt_embeds"].to(device, dtype),
            timestep=timesteps.to(device, dtype),
            encoder_attention_mask=text["prompt_attention_mask"].to(device),
            num_frames=f, height=h, width=w, rope_interpolation_scale=self.rope_interpolation_scale(),
            return_dict=False,
        )[0]
        return unpack_latents(out, f // pt, h // p, w // p, p, pt)

    # ----- validation ------------------------------------------------------------------------
    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """LTXPipeline's arguments: clip length, frame rate, the training T5 length, sizes it accepts."""
        kwargs = dict(kwargs)
        frames = self.cfg.validation_num_video_frames or MAX_VALIDATION_FRAMES
        kwargs.update(num_frames=min(MAX_VALIDATION_FRAMES, int(frames)), frame_rate=self.frame_rate,
                      max_sequence_length=T5_MAX_LENGTH)
        for side in ("width", "height"):
            if side in kwargs:
                size = max(PIPELINE_SIZE_MULTIPLE, int(kwargs[side]) // PIPELINE_SIZE_MULTIPLE * PIPELINE_SIZE_MULTIPLE)
                if size != kwargs[side]:
                    log.warning("validation %s %s rounded down to %d: LTXPipeline takes multiples of %d",
                                side, kwargs[side], size, PIPELINE_SIZE_MULTIPLE)
                kwargs[side] = size
        return kwargs

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """ComfyUI's generic layer name for an LTX-Video transformer layer: ``diffusion_model.<layer path>`` in the
        original checkpoint's names, which ComfyUI's LTXV model keeps (:data:`ORIGINAL_LAYER_NAMES`)."""
        head, _, rest = module_path.partition(".")
        head = ORIGINAL_LAYER_NAMES.get(head, head)
        return f"{cls.comfyui_prefixes[module_name]}.{head}{'.' + rest if rest else ''}"


def tiny_ltxvideo_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """(transformer, VAE) configs of a tiny LTX-Video: 8 latent channels, 4× spatial and temporal compression."""
    transformer = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                       attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
               decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
               decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
               decoder_spatio_temporal_scaling=(True, True, False, False),
               decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
               timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    return transformer, vae


def build_tiny_ltxvideo(folder: Path, *, seed: int = 0) -> Path:
    """An LTXPipeline-shaped folder: tiny T5, LTX transformer and video VAE (with non-trivial latent statistics),
    and a flow-matching scheduler with dynamic shifting as LTX-Video's."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    from ..tiny import _add_index, _save, tiny_t5_encoder, write_t5_tokenizer

    torch.manual_seed(seed)
    transformer_config, vae_config = tiny_ltxvideo_configs()
    vae = AutoencoderKLLTXVideo(**vae_config)
    channels = vae_config["latent_channels"]
    vae.latents_mean.copy_(torch.linspace(-0.1, 0.1, channels))
    vae.latents_std.copy_(torch.linspace(0.5, 1.5, channels))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    folder = _save(folder, "LTXPipeline", {
        "transformer": LTXVideoTransformer3DModel(**transformer_config), "vae": vae,
        "text_encoder": tiny_t5_encoder(transformer_config["caption_channels"]), "scheduler": scheduler,
    })
    write_t5_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "T5TokenizerFast")
    return folder


FAMILY = LTXVideoFamily
