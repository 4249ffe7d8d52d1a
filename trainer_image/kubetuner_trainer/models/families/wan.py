"""Wan 2.1 / 2.2: a UMT5-conditioned 3-D diffusion transformer trained with rectified flow, text-to-video and
image-to-video.

* **Latents.** ``AutoencoderKLWan`` compresses 8× in space (16× for the Wan 2.2 VAE of ``ti2v-5b-2.2``) and
  4× in time (a clip of ``1 + 4k`` frames becomes ``1 + k`` latent frames); latents are normalised per
  channel with the VAE's ``latents_mean``/``latents_std``: ``(z − mean) / std``, the inverse of what the
  pipelines do before decoding. Images (image datasets, ``encode_images``) are 1-frame clips ``[B, C, 1, h, w]``.
* **Text.** UMT5's last hidden state over ``512`` tokens (SimpleTuner fixes Wan's length at 512 and
  ignores ``--tokenizer_max_length``); positions past each prompt's tokens are zeroed, as
  ``WanPipeline`` does; ``--t5_padding`` is therefore moot.
* **Denoiser.** ``WanTransformer3DModel`` on ``[B, C, F, h, w]`` with 1×2×2 patches, timesteps
  ``1000·σ``; the velocity target ``ε − x₀``.
* **Flavours** (SimpleTuner 3.1.6's table and hub ids, :data:`WAN_FLAVOURS`):

  - ``t2v-*``: text-to-video.
  - ``i2v-14b-2.1``, ``i2v-14b-2.1-720p`` (image-to-video) and ``flf2v-14b-2.1`` (first/last frame): the
    transformer takes ``[noisy latents, mask, condition latents]`` on the channel axis, as
    ``WanImageToVideoPipeline`` builds them: the condition is the VAE encoding of the clip's own first frame
    followed by black frames (and its own last frame, flf2v), the 4-channel mask marks the given frames;
    CLIP image embeddings (the ``image_encoder``'s penultimate hidden states) of those frames go to the
    transformer's image cross-attention. Both are computed from the training clip when its latents are
    cached (``encode_videos`` returns them with the latents) — every sample is conditioned, as SimpleTuner
    forces ``is_i2v`` for these flavours; an image (1-frame clip) is conditioned on itself.
  - ``i2v-14b-2.2-high`` / ``i2v-14b-2.2-low``: Wan 2.2 A14B, two experts in one folder — ``transformer``
    denoises the high-noise steps (``t ≥ boundary_ratio·1000``), ``transformer_2`` the low-noise ones
    (diffusers' layout and ``WanImageToVideoPipeline``'s switch). The flavour names the expert that trains;
    its timesteps are drawn only from its own range (the schedule's draw mapped affinely into
    ``[0.9, 1]`` or ``[0, 0.9)``); the schedule shift is 5.0 and the boundary 0.90 (SimpleTuner's stage
    settings). Conditioning as i2v above, without CLIP (the A14B transformer has no image cross-attention).
    Validation renders with both experts, the other one loaded frozen from the same folder.
  - ``ti2v-5b-2.2``: the Wan 2.2 VAE (48 channels, 16×) and ``expand_timesteps``: a clip of a dataset with
    ``video.is_i2v`` keeps its first latent frame clean (timestep 0 on its tokens, left out of the loss) —
    the first-frame condition of ``WanImageToVideoPipeline(expand_timesteps=True)``, which with Wan's causal
    VAE is exactly the clip's own first latent frame; other clips train text-to-video.
  - ``vace-*``: refused, they need control/reference videos per clip (module constant :data:`VACE_NEEDS`).
* **ComfyUI.** ``--lora_format comfyui`` names layers ``diffusion_model.<path>`` in the original Wan
  checkpoint's names (``blocks.0.self_attn.q``), which ComfyUI's Wan model keeps.
* **Validation.** ``WanPipeline`` (``WanImageToVideoPipeline`` for the image-to-video flavours) renders
  ``--validation_num_video_frames`` frames (at most 81, as in SimpleTuner; 81 when unset), written as MP4,
  GIF and a first-frame PNG at ``--framerate`` (16 fps by default, Wan's native rate). Image-to-video renders
  start from the first (and last) frame of the latest training sample, decoded from its cached condition
  latents.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...config import Problem
from ...training.objectives import FLOW_TIMESTEP_SCALE, FlowMatchingObjective
from ..family import DIT_QUANTIZATION_EXCLUDE, DiffusersClass, ModelFamily, RoutedTokens
from .ltxvideo import LTXVideoObjective, frame_sigmas

log = logging.getLogger(__name__)

#: UMT5 tokens per prompt (SimpleTuner's fixed Wan length; WanPipeline's max_sequence_length default)
TEXT_LENGTH = 512
#: SimpleTuner's Wan LoRA targets: the attention projections of every block
WAN_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: frames per latent frame after the first (AutoencoderKLWan's temporal compression, 2.1 and 2.2)
TEMPORAL_COMPRESSION = 4
#: the most frames SimpleTuner renders in a Wan validation clip
MAX_VALIDATION_FRAMES = 81
#: Wan 2.2 A14B stage settings of SimpleTuner 3.1.6 (its ``WAN_STAGE_OVERRIDES``): the expert switch at
#: ``boundary_ratio·1000`` and the training schedule shift of both stages
STAGE_BOUNDARY_RATIO = 0.9
STAGE_FLOW_SHIFT = 5.0
#: the experts of a two-stage folder, by the noise range they denoise (diffusers' conversion writes the
#: high-noise model to ``transformer`` and the low-noise model to ``transformer_2``)
STAGE_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}
#: what the VACE flavours need that kubetuner's datasets do not give yet
VACE_NEEDS = ("a control video (and optional mask and reference images) per training clip, encoded into "
              "WanVACETransformer3DModel's control latents as WanVACEPipeline prepares them; kubetuner's "
              "conditioning datasets pair one image with a sample, not a clip")


@dataclass(frozen=True)
class WanFlavour:
    """One ``--model_flavour``: its default hub id, what conditions it, the modelspec architecture of its files
    and, for a Wan 2.2 A14B expert, the stage it trains (``high``/``low`` noise)."""

    hub_id: str
    kind: str  # t2v | i2v | flf2v | ti2v | vace
    modelspec: str
    stage: str | None = None

    @property
    def concatenates_condition(self) -> bool:
        """Whether the transformer takes ``[latents, mask, condition latents]`` channels (i2v / flf2v)."""
        return self.kind in ("i2v", "flf2v")


#: SimpleTuner 3.1.6's Wan flavours and hub ids (``t2v-480p-1.3b-2.1`` is its default)
WAN_FLAVOURS = {
    "t2v-480p-1.3b-2.1": WanFlavour("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "t2v", "wan-2.1-t2v"),
    "t2v-480p-14b-2.1": WanFlavour("Wan-AI/Wan2.1-T2V-14B-Diffusers", "t2v", "wan-2.1-t2v"),
    "i2v-14b-2.1": WanFlavour("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "i2v", "wan-2.1-i2v"),
    "i2v-14b-2.1-720p": WanFlavour("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "i2v", "wan-2.1-i2v"),
    "i2v-14b-2.2-high": WanFlavour("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "i2v", "wan-2.2-i2v-a14b-high-noise", "high"),
    "i2v-14b-2.2-low": WanFlavour("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "i2v", "wan-2.2-i2v-a14b-low-noise", "low"),
    "flf2v-14b-2.1": WanFlavour("Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", "flf2v", "wan-2.1-flf2v"),
    "vace-1.3b-2.1": WanFlavour("Wan-AI/Wan2.1-VACE-1.3B-diffusers", "vace", "wan-2.1-vace"),
    "vace-14b-2.1": WanFlavour("Wan-AI/Wan2.1-VACE-14B-diffusers", "vace", "wan-2.1-vace"),
    "ti2v-5b-2.2": WanFlavour("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "ti2v", "wan-2.2-ti2v-5b"),
}
DEFAULT_FLAVOUR = "t2v-480p-1.3b-2.1"
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


def flavour_of(name: str | None) -> WanFlavour:
    """The :class:`WanFlavour` of ``--model_flavour`` (the default one when unset); KeyError when unknown."""
    return WAN_FLAVOURS[name or DEFAULT_FLAVOUR]


def stage_sigma_range(stage: str | None) -> tuple[float, float]:
    """The σ range a Wan 2.2 A14B expert denoises: ``[boundary, 1]`` (high) or ``[0, boundary)`` (low); all of
    ``[0, 1]`` without a stage (``WanImageToVideoPipeline`` switches to ``transformer_2`` below ``boundary·1000``)."""
    if stage == "high":
        return STAGE_BOUNDARY_RATIO, 1.0
    if stage == "low":
        return 0.0, STAGE_BOUNDARY_RATIO
    return 0.0, 1.0


def condition_mask(batch: int, frames: int, height: int, width: int, *, last: bool,
                   temporal: int = TEMPORAL_COMPRESSION) -> torch.Tensor:
    """The ``[B, temporal, F, h, w]`` mask channels of ``WanImageToVideoPipeline.prepare_latents`` for ``F``
    latent frames: 1 at the given pixel frames (the first; the last too with ``last``), the first frame
    repeated ``temporal`` times so that every latent frame has ``temporal`` pixel slots."""
    pixels = (frames - 1) * temporal + 1
    given = torch.zeros(batch, 1, pixels, height, width)
    given[:, :, 0] = 1
    if last and pixels > 1:
        given[:, :, -1] = 1
    given = torch.cat([given[:, :, :1].repeat_interleave(temporal, dim=2), given[:, :, 1:]], dim=2)
    return given.view(batch, frames, temporal, height, width).transpose(1, 2)


class WanObjective(FlowMatchingObjective):
    """Rectified flow on Wan latents, with the noise levels of one expert's range (Wan 2.2 A14B) and per-frame
    timesteps ``[B, F]`` (a clean condition frame, ``ti2v-5b-2.2``), whose condition frames leave the loss."""

    def __init__(self, cfg: Any, scheduler_config: Any, *, sigma_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__(cfg, scheduler_config)
        self.sigma_range = sigma_range

    def _into_range(self, timesteps: torch.Tensor) -> torch.Tensor:
        low, high = self.sigma_range
        return low * FLOW_TIMESTEP_SCALE + timesteps * (high - low)

    def sample_timesteps(self, latents, generator):
        """The schedule's draw ``[B]`` mapped affinely into :attr:`sigma_range` (unchanged for ``[0, 1]``)."""
        return self._into_range(super().sample_timesteps(latents, generator))

    def eval_timesteps(self, count):
        return [float(self._into_range(torch.tensor(t))) for t in super().eval_timesteps(count)]

    @staticmethod
    def sigmas(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return frame_sigmas(timesteps, like)

    def loss(self, cfg, pred, target, timesteps, mask=None):
        """Velocity MSE; with per-frame timesteps the condition frames are left out (as LTX-Video's objective)."""
        if timesteps.dim() == 2:
            return LTXVideoObjective.loss(self, cfg, pred, target, timesteps, mask)
        return super().loss(cfg, pred, target, timesteps, mask)


class WanFamily(ModelFamily):
    family = "wan"
    pipeline_class = "WanPipeline"
    flavours = {name: flavour.hub_id for name, flavour in WAN_FLAVOURS.items()}
    default_flavour = DEFAULT_FLAVOUR
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
    modelspec_architecture = WAN_FLAVOURS[DEFAULT_FLAVOUR].modelspec
    quantization_exclude = DIT_QUANTIZATION_EXCLUDE
    comfyui_prefixes = {"transformer": "diffusion_model"}
    swappable_validation_scheduler = False  # validation samples with the model's own flow scheduler
    is_video = True
    default_framerate = 16
    #: the flavour whose layout :meth:`build_tiny` writes
    tiny_flavour: ClassVar[str] = DEFAULT_FLAVOUR

    def __init__(self, cfg: Any, components: Any, **kwargs: Any):
        self.flavour = flavour_of(cfg.model_flavour)
        self.modelspec_architecture = self.flavour.modelspec
        self._image_encoder: tuple[Any, Any] | None = None  # (CLIPVisionModel, CLIPImageProcessor), loaded on use
        self._other_stage: torch.nn.Module | None = None
        self._validation_condition: torch.Tensor | None = None  # the latest sample's condition latents [C, F, h, w]
        super().__init__(cfg, components, **kwargs)
        if self.flavour.concatenates_condition or self.flavour.stage:
            self.pipeline_class = "WanImageToVideoPipeline"
        self._check_input_channels()

    def _check_input_channels(self) -> None:
        """ConfigError when the transformer's input channels do not fit the flavour (e.g. an i2v folder trained
        with a text-to-video flavour): ``C`` latents, or ``2C + 4`` with the i2v condition."""
        from ...config import ConfigError

        config = self.denoiser.config
        channels = config.out_channels or config.in_channels
        given = 2 * channels + TEMPORAL_COMPRESSION if self.flavour.concatenates_condition else channels
        if config.in_channels != given:
            fitting = [n for n, f in WAN_FLAVOURS.items() if f.kind != "vace" and
                       (2 * channels + TEMPORAL_COMPRESSION if f.concatenates_condition else channels)
                       == config.in_channels]
            raise ConfigError([Problem("model_flavour", self.cfg.model_flavour or DEFAULT_FLAVOUR,
                                       f"does not fit {self.components.source.model}: its transformer takes "
                                       f"{config.in_channels} input channels, this flavour gives {given}; flavours "
                                       f"of that layout: {', '.join(fitting) or 'none'}")])

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import UMT5EncoderModel

        return (UMT5EncoderModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import T5TokenizerFast

        return (T5TokenizerFast,)

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        """The family for a flavour that is not text-to-video: a subclass whose :meth:`build_tiny` writes that
        flavour's layout (everything else keys off ``--model_flavour`` and loads alike)."""
        if cls is WanFamily and flavour in WAN_FLAVOURS and WAN_FLAVOURS[flavour].kind != "t2v":
            return _flavour_layout(flavour)
        return cls

    @classmethod
    def lora_loader_class(cls):
        """``WanPipeline``: its ``save_lora_weights`` writes the same ``transformer.*`` keys as the i2v pipeline's."""
        import diffusers

        return diffusers.WanPipeline

    @classmethod
    def denoiser_subfolder(cls, flavour: str | None) -> str | None:
        """A Wan 2.2 A14B stage flavour trains the expert of its stage (:data:`STAGE_SUBFOLDERS`)."""
        stage = WAN_FLAVOURS[flavour].stage if flavour in WAN_FLAVOURS else None
        return STAGE_SUBFOLDERS[stage] if stage else None

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_wan(folder, seed=seed, flavour=cls.tiny_flavour)

    @classmethod
    def video_frame_count(cls, num_frames: int) -> int:
        """The largest ``1 + 4k ≤ num_frames`` (AutoencoderKLWan drops frames past the last full group)."""
        return 1 + (max(1, num_frames) - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        flavour = WAN_FLAVOURS.get(cfg.model_flavour or DEFAULT_FLAVOUR)
        if flavour is not None and flavour.kind == "vace":
            problems.append(Problem("model_flavour", cfg.model_flavour, "needs " + VACE_NEEDS + "; allowed: "
                                    + ", ".join(n for n, f in WAN_FLAVOURS.items() if f.kind != "vace")))
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", True, "WanPipeline loads transformer LoRAs only; "
                                                                "train the transformer alone"))
        alignment = cfg.aspect_bucket_alignment
        multiple = 32 if flavour is not None and flavour.kind == "ti2v" else 16
        if alignment and alignment % multiple:
            problems.append(Problem("aspect_bucket_alignment", alignment,
                                    f"must be a multiple of {multiple} for this Wan flavour (VAE compression x 2x2 "
                                    "patches); use 32 as SimpleTuner does, or 64"))
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
        flavour = WAN_FLAVOURS.get(cfg.model_flavour or DEFAULT_FLAVOUR)
        shift = cfg.flow_schedule_shift
        if flavour is not None and flavour.stage and not cfg.flow_schedule_auto_shift and shift != STAGE_FLOW_SHIFT:
            warnings.append(Problem("flow_schedule_shift", shift,
                                    f"is replaced by {STAGE_FLOW_SHIFT} for the Wan 2.2 A14B stage flavours "
                                    "(SimpleTuner's stage setting)"))
        return warnings

    @classmethod
    def resolve_prediction_type(cls, cfg: Any, scheduler: Any) -> str:
        """Flow matching (the hub's UniPC scheduler says ``flow_prediction``, its inference name for it)."""
        return cfg.prediction_type or cls.prediction_types[0]

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler is kept for validation

    def make_objective(self) -> Any:
        cfg = self.cfg
        if self.flavour.stage and not cfg.flow_schedule_auto_shift:
            cfg = cfg.replace(flow_schedule_shift=STAGE_FLOW_SHIFT)
        return WanObjective(cfg, self.noise_scheduler.config, sigma_range=stage_sigma_range(self.flavour.stage))

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

    def _vae_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, F, H, W]`` in ``[-1, 1]`` → normalised posterior means ``[B, C, f, h, w]``."""
        vae = self.vae
        pixels = pixels.to(self.device, dtype=next(vae.parameters()).dtype)
        return self._normalise(vae.encode(pixels).latent_dist.mode().float())

    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Clips ``[B, 3, F, H, W]`` in ``[-1, 1]`` → normalised latents ``[B, C, 1 + (F−1)//4, H/s, W/s]`` (the
        posterior mean, so cached latents do not depend on RNG state).

        The i2v / flf2v flavours return ``{"latents", "condition_latents", "image_embeds"}``: the condition
        latents ``[B, C, f, h, w]`` encode the clip's first frame then black frames (its last frame at the end,
        flf2v), as ``WanImageToVideoPipeline.prepare_latents``; ``image_embeds`` ``[B, n, L, D]`` (when the
        transformer has image cross-attention) are the CLIP embeddings of those ``n`` frames."""
        latents = self._vae_latents(pixels)
        if not self.flavour.concatenates_condition:
            return latents
        first, last = pixels[:, :, :1], pixels[:, :, -1:]
        with_last = self.flavour.kind == "flf2v" and pixels.shape[2] > 1
        blank = torch.zeros_like(pixels[:, :, : pixels.shape[2] - (2 if with_last else 1)])
        video = torch.cat([first, blank, last] if with_last else [first, blank], dim=2)
        out = {"latents": latents, "condition_latents": self._vae_latents(video)}
        if self.denoiser.config.image_dim is not None:
            frames = [first[:, :, 0], last[:, :, 0]] if self.flavour.kind == "flf2v" else [first[:, :, 0]]
            out["image_embeds"] = torch.stack([self.encode_frames(f) for f in frames], dim=1)
        return out

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Images ``[B, 3, H, W]`` → 1-frame latents ``[B, C, 1, H/s, W/s]`` (with their conditioning, i2v)."""
        return self.encode_videos(pixels.unsqueeze(2))

    def image_encoder(self) -> tuple[Any, Any]:
        """The model's ``image_encoder`` (``CLIPVisionModel``) and ``image_processor`` (``CLIPImageProcessor``),
        loaded from the model folder on first use. Raises ConfigError when the folder has none."""
        if self._image_encoder is None:
            from transformers import CLIPImageProcessorPil, CLIPVisionModel  # PIL processor: no torchvision

            from ...config import ConfigError

            src = self.components.source
            try:
                encoder = CLIPVisionModel.from_pretrained(src.model, subfolder="image_encoder", revision=src.revision,
                                                          torch_dtype=self.weight_dtype)
                processor = CLIPImageProcessorPil.from_pretrained(src.model, subfolder="image_processor",
                                                               revision=src.revision)
            except OSError as exc:
                raise ConfigError([Problem("pretrained_model_name_or_path", src.model,
                                           f"Wan flavour {self.cfg.model_flavour} needs the model's image_encoder/ "
                                           f"and image_processor/ (CLIP vision): {exc}")]) from exc
            encoder.requires_grad_(False).eval().to(self.device)
            self._image_encoder = (encoder, processor)
        return self._image_encoder

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, 3, H, W]`` in ``[-1, 1]`` → CLIP's penultimate hidden states ``[B, L, D]``, as
        ``WanImageToVideoPipeline.encode_image`` computes them from 8-bit images."""
        encoder, processor = self.image_encoder()
        images = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        inputs = processor(images=list(images), return_tensors="pt").to(self.device)
        hidden = encoder(pixel_values=inputs.pixel_values.to(encoder.dtype), output_hidden_states=True).hidden_states
        return hidden[-2].float()

    # ----- text ----------------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {"text_length": TEXT_LENGTH, "padding": "zeroed"}
        if self.flavour.kind != "t2v":  # latents cached with their conditioning (i2v): not a t2v entry
            identity["conditioning"] = self.flavour.kind
        return identity

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
    def first_frame_conditioned(self, batch: Any, latents: torch.Tensor) -> bool:
        """``ti2v-5b-2.2``: whether the batch keeps its first latent frame as condition (a dataset with
        ``video.is_i2v``, clips of more than one latent frame)."""
        return self.flavour.kind == "ti2v" and bool(getattr(batch, "is_i2v", None)) and latents.shape[2] > 1

    def sample_timesteps(self, batch, latents, generator):
        """Noise levels ``[B]`` in the trained expert's range; per frame ``[B, F]`` with 0 on the first frame for a
        first-frame-conditioned ``ti2v-5b-2.2`` batch."""
        timesteps = self.objective.sample_timesteps(latents, generator)
        if not self.first_frame_conditioned(batch, latents):
            return timesteps
        per_frame = timesteps[:, None].repeat(1, latents.shape[2])
        per_frame[:, 0] = 0
        return per_frame

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """``noisy_latents [B, C, F, h, w]`` → the velocity prediction of the same shape.

        i2v / flf2v: the transformer input is ``[noisy, mask, condition latents]`` (channels) and the image
        embeddings go to ``encoder_hidden_states_image`` (``[B·n, L, D]``, frames of a sample adjacent, as the
        flf2v image embedder expects); per-frame timesteps ``[B, F]`` reach the transformer per token."""
        dtype, device = noisy_latents.dtype, noisy_latents.device
        b, _, f, h, w = noisy_latents.shape
        kwargs: dict[str, Any] = {}
        hidden = noisy_latents
        if self.flavour.concatenates_condition:
            cond = _conditioning(batch)
            condition = cond["condition_latents"].to(device, dtype)
            self._validation_condition = condition[0].detach()
            mask = condition_mask(b, f, h, w, last=self.flavour.kind == "flf2v").to(device, dtype)
            hidden = torch.cat([noisy_latents, mask, condition], dim=1)
            if "image_embeds" in cond:
                kwargs["encoder_hidden_states_image"] = cond["image_embeds"].to(device, dtype).flatten(0, 1)
        if timesteps.dim() == 2:  # per frame → per token (frame-major, 1x2x2 patches)
            _, ph, pw = self.denoiser.config.patch_size
            timesteps = timesteps.repeat_interleave((h // ph) * (w // pw), dim=1)
        return denoiser(hidden_states=hidden, timestep=timesteps,
                        encoder_hidden_states=text["prompt_embeds"].to(device, dtype), return_dict=False,
                        **kwargs)[0]

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
    def other_stage(self) -> torch.nn.Module:
        """The expert this Wan 2.2 A14B flavour does not train, loaded frozen from the model folder on first use and
        quantized as ``--base_model_precision`` quantizes the trained one (SimpleTuner renders with the trained
        expert alone unless told otherwise; both experts render as ``WanImageToVideoPipeline`` does)."""
        if self._other_stage is None:
            from ..quantization import preset_for, quantize_module

            src = self.components.source
            other = next(s for s in STAGE_SUBFOLDERS.values() if s != STAGE_SUBFOLDERS[self.flavour.stage])
            log.info("loading the Wan 2.2 %s expert for validation renders", other)
            module = self.denoiser_class().from_pretrained(src.model, subfolder=other, revision=src.revision,
                                                           torch_dtype=self.weight_dtype)
            module = module.requires_grad_(False).eval().to(self.device)
            preset = preset_for(self.cfg, "base_model_precision")
            if preset is not None and not preset.pipeline_only:  # as frozen as the trained expert's base
                module = quantize_module(module, preset, exclude=self.quantization_exclude)
            self._other_stage = module
        return self._other_stage

    def pipeline_components(self, *, denoiser=None, text_encoders=None) -> dict[str, Any]:
        """The pipeline's components; a Wan 2.2 A14B stage puts the trained expert in its slot (``transformer``:
        high noise, ``transformer_2``: low noise) and the other expert in the other, switching at the boundary."""
        comps = super().pipeline_components(denoiser=denoiser, text_encoders=text_encoders)
        if self.flavour.stage:
            trained = comps.pop(self.denoiser_name)
            slots = {STAGE_SUBFOLDERS[self.flavour.stage]: trained}
            slots.setdefault("transformer", None)
            slots.setdefault("transformer_2", None)
            for slot, module in slots.items():
                comps[slot] = module if module is not None else self.other_stage()
            comps["boundary_ratio"] = STAGE_BOUNDARY_RATIO
        return comps

    def extra_pipeline_components(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"transformer_2": None}
        if self.flavour.kind == "ti2v":
            extra["expand_timesteps"] = True
        if self.flavour.concatenates_condition and self.denoiser.config.image_dim is not None:
            extra["image_encoder"], extra["image_processor"] = self.image_encoder()
        return extra

    def validation_frames(self) -> tuple[Any, Any]:
        """The first and last frame (PIL) of the latest training sample's condition video, decoded from its cached
        latents; mid-grey frames before the first training step."""
        from PIL import Image

        condition = self._validation_condition
        if condition is None:
            log.warning("Wan image-to-video validation before any training sample: starting from a grey frame")
            grey = Image.new("RGB", (64, 64), (128, 128, 128))
            return grey, grey
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        latents = condition[None].float() * torch.tensor(config.latents_std).view(shape).to(condition.device) + \
            torch.tensor(config.latents_mean).view(shape).to(condition.device)
        with torch.no_grad():
            video = self.vae.decode(latents.to(next(self.vae.parameters()).dtype)).sample[0]
        frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
        return Image.fromarray(frames[0]), Image.fromarray(frames[-1])

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The Wan pipelines' arguments: ``--validation_num_video_frames`` (≤ 81; 81 when unset), 512 text tokens,
        PIL frames; ``guidance_rescale`` does not exist for Wan and is left out. Image-to-video: the start (and
        end) frame, :meth:`validation_frames`."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        asked = getattr(self.cfg, "validation_num_video_frames", None)
        kwargs.update(num_frames=self.video_frame_count(min(MAX_VALIDATION_FRAMES, asked or MAX_VALIDATION_FRAMES)),
                      max_sequence_length=TEXT_LENGTH, output_type="pil")
        if self.flavour.concatenates_condition:
            first, last = self.validation_frames()
            kwargs["image"] = first
            if self.flavour.kind == "flf2v":
                kwargs["last_image"] = last
            kwargs.update(self.prompt_embeds(kwargs.pop("prompt"), kwargs.pop("negative_prompt", None)))
        return kwargs

    @torch.no_grad()
    def prompt_embeds(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        """``prompt_embeds``/``negative_prompt_embeds`` for ``WanImageToVideoPipeline``, encoded as it would
        (:meth:`encode_text`): diffusers 0.42's i2v prompt clean-up calls ftfy unconditionally, which is not
        installed."""
        embeds = self.encode_text([prompt, negative_prompt or ""])["prompt_embeds"]
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}


@cache
def _flavour_layout(flavour: str) -> type[WanFamily]:
    """:class:`WanFamily` building the tiny layout of ``flavour`` (one class per flavour)."""
    return type(f"WanFamily[{flavour}]", (WanFamily,), {"tiny_flavour": flavour, "__module__": __name__})


def _conditioning(batch: Any) -> dict[str, torch.Tensor]:
    """The batch's cached conditioning; ValueError naming the cause when a batch has none."""
    cond = getattr(batch, "cached_conditioning", None)
    if not cond or "condition_latents" not in cond:
        raise ValueError("a Wan image-to-video batch needs the condition latents cached with its latents (encode "
                         "the clips with this flavour's encoder; caches of a text-to-video flavour do not have them)")
    return cond


def tiny_wan_transformer_config() -> dict[str, Any]:
    """``WanTransformer3DModel`` config for tests: two blocks, 2 heads of 12 (rope splits 4/4/4)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


#: the tiny CLIP vision encoder of the i2v/flf2v layouts: 32-px images in 16-px patches (4 patches + class token)
TINY_CLIP_SIZE, TINY_CLIP_PATCH, TINY_CLIP_WIDTH = 32, 16, 16


def _tiny_vae(flavour: WanFlavour) -> Any:
    """A 4-channel AutoencoderKLWan with Wan 2.1's compression (8× space, 4× time), or for ``ti2v`` a 6-channel
    one shaped as the Wan 2.2 VAE (residual blocks, 2×2 pixel patches, 16× space)."""
    from diffusers import AutoencoderKLWan

    if flavour.kind == "ti2v":
        return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=6, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16,
                                latents_mean=[0.1, -0.2, 0.3, 0.0, 0.2, -0.1], latents_std=[1.5, 2.0, 0.8, 1.2, 1.0, 0.9])
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                            latents_std=[1.5, 2.0, 0.8, 1.2])


def _tiny_image_encoder() -> tuple[Any, Any]:
    """A two-layer ``CLIPVisionModel`` and its ``CLIPImageProcessor`` (the i2v/flf2v ``image_encoder``)."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=TINY_CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=TINY_CLIP_SIZE,
                                               patch_size=TINY_CLIP_PATCH))
    processor = CLIPImageProcessorPil(size={"shortest_edge": TINY_CLIP_SIZE},
                                   crop_size={"height": TINY_CLIP_SIZE, "width": TINY_CLIP_SIZE})
    return encoder, processor


def build_tiny_wan(folder: Path, *, seed: int = 0, flavour: str = DEFAULT_FLAVOUR) -> Path:
    """A Wan-shaped pipeline folder of ``flavour``'s layout: UMT5, a 2-block transformer, a tiny AutoencoderKLWan
    and the hub's UniPC flow scheduler settings. i2v/flf2v: the transformer takes ``2C + 4`` channels, with a
    CLIP image encoder and image cross-attention (2.1; flf2v with the two-image position embedding); a Wan 2.2
    A14B stage flavour: two experts (``transformer``, ``transformer_2``) and ``boundary_ratio``; ti2v: the
    Wan 2.2-shaped VAE and ``expand_timesteps``."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from ..tiny import _add_index, _save, write_t5_tokenizer

    layout = flavour_of(flavour)
    if layout.kind == "vace":
        raise ValueError(f"no tiny layout for {flavour}: {VACE_NEEDS}")
    torch.manual_seed(seed)
    vae = _tiny_vae(layout)
    channels = vae.config.z_dim
    config = dict(tiny_wan_transformer_config(), in_channels=channels, out_channels=channels)
    components: dict[str, Any] = {"vae": vae}
    if layout.concatenates_condition:
        config["in_channels"] = 2 * channels + TEMPORAL_COMPRESSION
        if layout.stage is None:  # Wan 2.1 i2v/flf2v: CLIP image cross-attention
            inner = config["num_attention_heads"] * config["attention_head_dim"]
            config.update(image_dim=TINY_CLIP_WIDTH, added_kv_proj_dim=inner)
            if layout.kind == "flf2v":
                config["pos_embed_seq_len"] = 2 * ((TINY_CLIP_SIZE // TINY_CLIP_PATCH) ** 2 + 1)
            components["image_encoder"], components["image_processor"] = _tiny_image_encoder()
    components["text_encoder"] = UMT5EncoderModel(UMT5Config(
        vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    components["transformer"] = WanTransformer3DModel(**config)
    components["transformer_2"] = WanTransformer3DModel(**config) if layout.stage else None
    components["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0, num_train_timesteps=1000)
    pipeline = "WanImageToVideoPipeline" if layout.concatenates_condition else "WanPipeline"
    folder = _save(folder, pipeline, components)
    write_t5_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "T5TokenizerFast")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(boundary_ratio=STAGE_BOUNDARY_RATIO if layout.stage else None,
                 expand_timesteps=layout.kind == "ti2v")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


FAMILY = WanFamily
