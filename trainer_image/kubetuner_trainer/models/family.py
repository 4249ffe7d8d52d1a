"""The model-family interface: one subclass per family (``models/families/<name>.py``).

A family names the classes it loads (denoiser, text encoders, tokenizers, scheduler, pipeline),
owns the loaded components and its training objective, and holds every fact that differs
between families: how prompts become conditioning tensors, how the denoiser is called, which
layers LoRA wraps (and the named target presets), the modelspec architecture, the ComfyUI key
prefixes, the config rules only it has, and how to build a tiny random-weight copy for tests.
The loop, LoRA and checkpoint code only talk to this interface.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..config import Problem
from .components import Components
from .loading import load_components

CLIP_TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_ATTENTION_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: --slider_lora_target on a UNet: self-attention plus the input/output convs, the transformer
#: projections and the time embedding (SimpleTuner's slider targets, less the names a UNet lacks)
UNET_SLIDER_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "proj_in", "proj_out",
                            "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
#: a UNet ControlNet's LoRA layers (SimpleTuner's ControlNet targets: attention, feed-forward, resnet convs,
#: time embedding, the conditioning embedding and the zero convolutions); names a model lacks are skipped
UNET_CONTROLNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv", "conv1", "conv2",
    "conv_in", "conv_shortcut", "linear_1", "linear_2", "time_emb_proj",
    *(f"controlnet_cond_embedding.{n}" for n in ("conv_in", *(f"blocks.{i}" for i in range(6)), "conv_out")),
    *(f"controlnet_down_blocks.{i}" for i in range(12)), "controlnet_mid_block",
)

#: the denoiser layers SimpleTuner 3.1.6 keeps out of quanto quantization for SD3, Wan and LTX-Video (fnmatch
#: patterns on module names, quanto's ``exclude``): norms, output projection, patch/position/condition
#: embedders, feed-forward blocks, modulation tables. The other families but Flux (its own list) have none.
DIT_QUANTIZATION_EXCLUDE = ("*norm*", "*norm1_context*", "*norm_added_q*", "*norm_added_k*", "proj_out*",
                            "*pos_embed*", "*patch_embedding*", "*ffn*", "*scale_shift_table*", "*norm_out*",
                            "*context_embedder*", "*time_text_embed*", "*time_proj*", "*condition_embedder*")

#: the conditioning types a ControlNet trains on: those planned exactly like their target (pixel-aligned)
CONTROLNET_CONDITIONING_TYPES = ("controlnet", "reference_strict", "mask", "segmentation")

#: the options that relocate a denoiser, by the denoiser's pipeline name
DENOISER_LOCATION_OPTIONS = {
    "unet": ("pretrained_unet_model_name_or_path", "pretrained_unet_subfolder"),
    "transformer": ("pretrained_transformer_model_name_or_path", "pretrained_transformer_subfolder"),
}


class DiffusersClass:
    """A class attribute naming a diffusers class, imported on first access (family modules are listed
    without torch): ``vae_class = DiffusersClass("AutoencoderKLQwenImage")``."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> type:
        import diffusers

        return getattr(diffusers, self.name)


@dataclass(frozen=True)
class RoutedTokens:
    """Where one block list of the denoiser (an entry of ``transformer_block_lists``) carries the image
    tokens that TREAD routing (``--tread_config``) routes around blocks.

    ``argument``: the block's ``forward`` argument that holds the tokens ``[B, S, D]``; ``output``: their
    index in the block's output tuple (None: the block returns the tensor itself); ``trailing``: the image
    tokens are the last :meth:`ModelFamily.image_token_count` tokens of ``argument``, after tokens that are
    never routed (text the list carries in front of them); False: every token of ``argument`` is an image token.
    """

    argument: str = "hidden_states"
    output: int | None = None
    trailing: bool = False


class FamilyEncoders:
    """What the data pipeline needs from the model (the ``Encoders`` protocol)."""

    def __init__(self, family: ModelFamily):
        self._family = family
        self.cache_key = family.cache_key
        self.latent_downscale = family.latent_downscale
        #: the conditioning hooks, read by the data pipeline (data/conditioning.py)
        self.conditioning_needs_pixels = family.conditioning_needs_pixels(family.cfg)
        self.text_uses_conditioning_images = family.text_uses_conditioning_images(family.cfg)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """``[B,3,H,W]`` images or ``[B,3,F,H,W]`` clips (video datasets) → latents, or a dict of ``latents`` and
        the tensors that condition the denoiser, cached with them (``Batch.cached_conditioning``)."""
        if pixels.dim() == 5:
            return self._family.encode_videos(pixels)
        return self._family.encode_images(pixels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        batched = self._family.encode_text(list(prompts))
        return [{k: v[i].detach().cpu() for k, v in batched.items()} for i in range(len(prompts))]

    @torch.no_grad()
    def encode_prompts_with_images(self, prompts: list[str],
                                   images: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Per prompt, its embedding encoded together with its conditioning images (``[3, H, W]`` in [-1, 1],
        one per slot): ``ModelFamily.encode_text_with_images``."""
        batched = self._family.encode_text_with_images(list(prompts), images)
        return [{k: v[i].detach().cpu() for k, v in batched.items()} for i in range(len(prompts))]


class ModelFamily(ABC):
    """One model family. Subclasses set the class attributes and the text/predict hooks."""

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    #: flavour name -> default hub id (used when ``--pretrained_model_name_or_path`` is unset)
    flavours: ClassVar[dict[str, str]]
    default_flavour: ClassVar[str]
    #: the trained network: its pipeline component name (= subfolder, LoRA key prefix) and class
    denoiser_name: ClassVar[str] = "unet"
    denoiser_class_name: ClassVar[str] = "UNet2DConditionModel"
    scheduler_class_name: ClassVar[str] = "DDPMScheduler"
    #: False for a pixel-space family (DeepFloyd IF): no VAE is loaded, the latent cache stores the
    #: pixels ``[-1, 1]`` themselves and the pipeline gets no ``vae``
    uses_vae: ClassVar[bool] = True
    #: False where diffusers' fused QKV projections cannot train the denoiser (its attention processors keep
    #: calling the separate layers, or fail on the fused ones): ``--fuse_qkv_projections`` is refused
    qkv_fusion: ClassVar[bool] = True
    #: the text encoder / tokenizer subfolders, in pipeline order
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    #: the text encoders ``--train_text_encoder`` trains, by pipeline name (None: every one); the
    #: others stay frozen (e.g. SD3's T5, whose LoRA the pipeline's loader cannot load)
    trainable_text_encoder_names: ClassVar[tuple[str, ...] | None] = None
    #: option that relocates one text encoder -> its pipeline name (e.g. the T5 of Flux)
    text_encoder_location_options: ClassVar[dict[str, str]] = {}
    #: prediction types the family trains with; the first is its default
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    default_lora_targets: ClassVar[tuple[str, ...]] = UNET_ATTENTION_LORA_TARGETS
    #: the targets of --slider_lora_target (concept sliders)
    slider_lora_targets: ClassVar[tuple[str, ...]] = UNET_SLIDER_LORA_TARGETS
    #: the option choosing a named target preset, and the presets (unset option -> default targets)
    lora_target_option: ClassVar[str | None] = None
    lora_target_presets: ClassVar[dict[str, tuple[str, ...]]] = {}
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = CLIP_TEXT_LORA_TARGETS
    #: ``modelspec.architecture`` of saved files (``/lora`` is appended for LoRA files)
    modelspec_architecture: ClassVar[str]
    #: kohya/ComfyUI LoRA key prefix of each trained module, by pipeline name
    comfyui_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet", "text_encoder": "lora_te1",
                                                  "text_encoder_2": "lora_te2"}
    #: the prefix of a lone text encoder (kohya: ``lora_te`` when there is only one)
    comfyui_single_text_encoder_prefix: ClassVar[str] = "lora_te"
    #: layers ComfyUI's model holds as one fused weight, by their last name in the fused weight's row order
    #: (Lumina 2's ``to_q``, ``to_k``, ``to_v`` → ``attention.qkv``): ``comfyui_key`` gives them one name and the
    #: export stacks their LoRAs into one (exact); empty: no fused layers
    comfyui_fused_parts: ClassVar[tuple[str, ...]] = ()
    #: denoiser module-name patterns (fnmatch on the full module name, quanto's ``exclude``) a quantization
    #: preset leaves in full precision; SimpleTuner's per-family list (empty: every layer is quantized)
    quantization_exclude: ClassVar[tuple[str, ...]] = ()
    #: whether ``--validation_noise_scheduler`` may replace the pipeline's scheduler (DDPM-type schedulers)
    swappable_validation_scheduler: ClassVar[bool] = True
    #: the diffusers image-to-image pipeline of the family (``--validation_using_datasets`` renders through it
    #: from dataset images); None: the family has none and that option is refused
    img2img_pipeline_class: ClassVar[str | None] = None
    #: video families train on ``dataset_type: video`` clips (``encode_videos``, 5-D latents ``[B,C,F,h,w]``)
    #: and render validation clips; image datasets then train as 1-frame clips when ``encode_images`` gives
    #: ``[B,C,1,h,w]``
    is_video: ClassVar[bool] = False
    #: frames per second of rendered clips when ``--framerate`` is unset (the model's native rate)
    default_framerate: ClassVar[int] = 30
    #: the denoiser's lists of repeated transformer blocks (attribute names, in forward order): what
    #: ``--musubi_blocks_to_swap`` swaps and ``--dynamo_use_regional_compilation`` compiles; empty: none
    transformer_block_lists: ClassVar[tuple[str, ...]] = ()
    #: TREAD routing (``--tread_config``): how each of ``transformer_block_lists`` carries the image tokens,
    #: in the same order; empty: the family cannot be routed and ``--tread_config`` is refused
    routed_tokens: ClassVar[tuple[RoutedTokens, ...]] = ()
    #: ControlNet training (``--controlnet``): the diffusers ControlNet class built from this family's denoiser
    #: and the pipeline that renders with it; None: this family trains no ControlNet here
    controlnet_class_name: ClassVar[str | None] = None
    controlnet_pipeline_class: ClassVar[str | None] = None
    #: the ControlNet class method that builds it from the denoiser's weights
    controlnet_constructor: ClassVar[str] = "from_unet"
    #: what the ControlNet reads of the control image: ``pixels`` (RGB in [0, 1], what the pipeline's control
    #: image processor gives a UNet ControlNet) or ``latents`` (the VAE's scaled latents, as SD3/Flux pipelines)
    controlnet_input: ClassVar[str] = "pixels"
    #: the pipeline call argument that takes the control image
    controlnet_image_argument: ClassVar[str] = "image"
    #: the ControlNet's layers a LoRA wraps (``--controlnet`` with ``--model_type lora``)
    controlnet_lora_targets: ClassVar[tuple[str, ...]] = UNET_CONTROLNET_LORA_TARGETS

    @classmethod
    def denoiser_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.denoiser_class_name)

    @classmethod
    def scheduler_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.scheduler_class_name)

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTokenizer

        return (CLIPTokenizer,)

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        """The class that loads ``flavour`` (or, none named, the model at ``location``): the family itself
        unless a flavour has other components (the SDXL refiner)."""
        return cls

    @classmethod
    def denoiser_subfolder(cls, flavour: str | None) -> str | None:
        """The model subfolder the trained denoiser loads from when ``--pretrained_<denoiser>_subfolder`` is
        unset; None: its pipeline name (:attr:`denoiser_name`). E.g. one expert of a two-stage model."""
        return None

    @classmethod
    @abstractmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        """Write a tiny random-weight model of this family in diffusers layout to ``folder``."""

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        """The family's own configuration rules (checked by preflight before anything loads)."""
        return []

    @classmethod
    def video_frame_count(cls, num_frames: int) -> int:
        """The frame count a clip of ``num_frames`` trains with: the largest count ≤ ``num_frames`` the
        family's video VAE encodes without dropping frames (e.g. ``1 + 4k`` for Wan). Identity by default."""
        return num_frames

    @classmethod
    def output_framerate(cls, cfg: Any) -> float:
        """Frames per second of rendered clips: ``--framerate``, else :attr:`default_framerate`."""
        return float(getattr(cfg, "framerate", None) or cls.default_framerate)

    # ----- conditioning datasets (data/conditioning.py; every default keeps a family unchanged) ---------
    @classmethod
    def requires_conditioning(cls, cfg: Any) -> bool:
        """Whether the run trains on conditioning inputs: edit flavours, and ``--controlnet`` (its control
        images; SimpleTuner requires a conditioning dataset then too). Every training dataset must then link a
        conditioning dataset (preflight, exit 78 naming ``datasets[<id>].conditioning_data``), and validation
        renders dataset samples with their conditioning images. False otherwise (the default)."""
        return bool(getattr(cfg, "controlnet", False))

    @classmethod
    def conditioning_types(cls, cfg: Any) -> tuple[str, ...] | None:
        """The ``conditioning_type`` values the flavour takes (None: any, the default); with ``--controlnet`` the
        pixel-aligned ones (a control image must line up with its target)."""
        return CONTROLNET_CONDITIONING_TYPES if getattr(cfg, "controlnet", False) else None

    @classmethod
    def conditioning_needs_pixels(cls, cfg: Any) -> bool:
        """Whether batches carry ``conditioning_pixels`` next to ``conditioning_latents``: a ControlNet that reads
        pixels (``controlnet_input``) needs them; False otherwise (the default)."""
        return bool(getattr(cfg, "controlnet", False)) and cls.controlnet_input == "pixels"

    @classmethod
    def text_uses_conditioning_images(cls, cfg: Any) -> bool:
        """Whether prompts are encoded together with their conditioning images (``encode_text_with_images``;
        the text-embedding cache is then keyed on caption and images). False by default."""
        return False

    def encode_text_with_images(self, prompts: Sequence[str],
                                images: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Prompts encoded with their conditioning images → batched tensors like :meth:`encode_text`.

        ``images[i]`` holds prompt ``i``'s conditioning pixels, one ``[3, H, W]`` float32 tensor in [-1, 1] per
        slot. Families whose :meth:`text_uses_conditioning_images` is true implement it.
        """
        raise NotImplementedError(f"model_family {self.family} does not encode prompts with images")

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        """Options this family accepts but ignores (logged at start, as SimpleTuner does)."""
        return []

    def __init__(self, cfg: Any, components: Components, *, device: torch.device | str = "cpu",
                 weight_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.components = components
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.prediction_type: str = self.resolve_prediction_type(cfg, components.noise_scheduler)
        if self.prediction_type not in self.prediction_types:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported by the {self.family} family; "
                f"use {' or '.join(self.prediction_types)}"
            )
        self.objective = self.make_objective()

    @classmethod
    def resolve_prediction_type(cls, cfg: Any, scheduler: Any) -> str:
        """``--prediction_type``, else what the model's scheduler says, else the family default."""
        config = getattr(scheduler, "config", None)
        return cfg.prediction_type or getattr(config, "prediction_type", None) or cls.prediction_types[0]

    def make_objective(self) -> Any:
        """The training objective (DDPM ε/v for the UNet families)."""
        from ..training.objectives import DDPMObjective

        return DDPMObjective(self.cfg, self.noise_scheduler, self.prediction_type)

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        """A DDPM scheduler carrying the model's betas, with the training-time overrides applied."""
        from diffusers import DDPMScheduler

        overrides: dict[str, Any] = {}
        if cfg.prediction_type:
            overrides["prediction_type"] = cfg.prediction_type
        if cfg.rescale_betas_zero_snr:
            overrides["rescale_betas_zero_snr"] = True
            overrides["timestep_spacing"] = "trailing"
        if cfg.training_scheduler_timestep_spacing:
            overrides["timestep_spacing"] = cfg.training_scheduler_timestep_spacing
        return DDPMScheduler.from_config(scheduler.config, **overrides)

    # ----- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: Any, *, device: torch.device | str = "cpu",
             weight_dtype: torch.dtype = torch.float32) -> ModelFamily:
        """Load every component from the configured folder, hub id or single file.

        Raises :class:`~kubetuner_trainer.config.ConfigError` when a location is missing or holds
        something else than the family expects.
        """
        from .quantization import quantize_components

        layout = cls.for_flavour(cfg.model_flavour, cfg.pretrained_model_name_or_path)
        if layout is not cls:
            return layout.load(cfg, device=device, weight_dtype=weight_dtype)
        from ..acceleration import configure_vae

        components = load_components(cls, cfg, weight_dtype=weight_dtype)
        if getattr(cfg, "controlnet", False):  # built from the denoiser's weights before they are quantized
            from .controlnet import CONTROLNET, build_controlnet

            components.extra[CONTROLNET] = build_controlnet(cls, cfg, components, weight_dtype=weight_dtype)
        quantize_components(cls, cfg, components, device)
        configure_vae(cfg, components.vae)
        model = cls(cfg, components, device=device, weight_dtype=weight_dtype)
        model.to(device)
        return model

    def to(self, device: torch.device | str) -> ModelFamily:
        """Move the model to ``device``; a denoiser whose weights the memory plan places (block swap,
        group offload) stays where it is."""
        from ..acceleration import denoiser_placed_by_plan

        self.device = torch.device(device)
        c = self.components
        if not denoiser_placed_by_plan(self.cfg):
            c.denoiser.to(self.device)
        if c.vae is not None:
            c.vae.to(self.device)
        if self.controlnet is not None:
            self.controlnet.to(self.device)
        for te in c.text_encoders:
            te.to(self.device)
        self.objective.to(self.device)
        return self

    def reload_text_encoders(self) -> None:
        """Load the text encoders again from the model's source (after ``--fully_unload_text_encoder`` freed them)."""
        from .loading import load_text_encoders

        loaded = load_text_encoders(type(self), self.components.source, self.weight_dtype)
        for i, te in enumerate(loaded):
            self.components.text_encoders[i] = te.to(self.device)

    def transformer_blocks(self, denoiser: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """The denoiser's repeated transformer blocks in forward order (from ``transformer_block_lists``)."""
        model = denoiser if denoiser is not None else self.denoiser
        return [block for name in self.transformer_block_lists for block in getattr(model, name)]

    def route_block_inputs(self, block_list: str, arguments: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """A routed block's ``forward`` arguments (by name) with its per-token side inputs (rotary embeddings,
        attention masks, per-token modulation) cut to the image tokens TREAD keeps.

        ``keep``: the kept image tokens' indices, ``[K]`` int64, ascending, into the ``N`` image tokens.
        The routed tokens themselves are already cut. Default: the blocks have no per-token side inputs.
        """
        return arguments

    def image_token_count(self, arguments: Mapping[str, Any]) -> int:
        """The number of image tokens of one denoiser call (``arguments``: its ``forward`` arguments by
        name); needed only by families with a :attr:`RoutedTokens.trailing` block list."""
        raise NotImplementedError(f"{self.family} has no block list with trailing image tokens")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.components.denoiser

    @property
    def controlnet(self) -> torch.nn.Module | None:
        """The ControlNet built or loaded for ``--controlnet`` (None without it)."""
        return self.components.extra.get("controlnet")

    @property
    def vae(self) -> torch.nn.Module:
        return self.components.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.components.text_encoders

    @property
    def tokenizers(self) -> list[Any]:
        return self.components.tokenizers

    @property
    def noise_scheduler(self) -> Any:
        return self.components.noise_scheduler

    # ----- data-pipeline bridge --------------------------------------------------------------
    @property
    def latent_downscale(self) -> int:
        if self.vae is None:
            return 1  # pixel space
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def cache_key(self) -> str:
        """Identity of everything that shapes cached latents and embeddings."""
        src = self.components.source
        ident = {
            "family": self.family,
            "model": src.model,
            "revision": src.revision,
            "variant": src.variant,
            "vae": src.vae,
            "text_encoders": [type(te).__name__ for te in self.text_encoders],
            "text_config": [te.config.to_dict().get("hidden_size") for te in self.text_encoders],
            "vae_scaling": getattr(self.vae.config, "scaling_factor", None) if self.vae is not None else None,
            "vae_dtype": str(next(self.vae.parameters()).dtype) if self.vae is not None else None,
        }
        ident.update(self.text_cache_identity())
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{self.family}-{digest}"

    def text_cache_identity(self) -> dict[str, Any]:
        """Extra options that change cached text embeddings (empty for families without any)."""
        return {}

    def encoders(self) -> FamilyEncoders:
        return FamilyEncoders(self)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` in ``[-1,1]`` → scaled latents (the VAE posterior mean); the pixels themselves
        (float32) for a pixel-space family."""
        vae = self.vae
        if vae is None:
            return pixels.to(self.device, dtype=torch.float32)
        pixels = pixels.to(self.device, dtype=next(vae.parameters()).dtype)
        # the posterior mean: cached latents must not depend on RNG state or encoding order
        latents = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def encode_videos(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clips ``[B,3,F,H,W]`` in ``[-1,1]`` → latents ``[B,C,F',h,w]`` (video families override this).

        Raises ``NotImplementedError`` for image families (preflight refuses video datasets for them).
        """
        raise NotImplementedError(f"model_family {self.family} does not train on video clips")

    @abstractmethod
    def encode_text(self, prompts: Sequence[str],
                    text_encoders: Sequence[torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """Prompts → batched conditioning tensors (with gradients when a text encoder trains).

        ``text_encoders`` replaces the loaded ones (e.g. their DDP-wrapped versions during training).
        """

    # ----- training --------------------------------------------------------------------------
    def sample_timesteps(self, batch: Any, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Noise levels of a training batch on the objective's scale, as a CPU tensor.

        ``[B]`` (the objective's draw) by default. A family whose objective and :meth:`predict` take finer
        levels may return more dimensions, e.g. ``[B, F]`` per video frame (first-frame conditioning).
        """
        return self.objective.sample_timesteps(latents, generator)

    @abstractmethod
    def predict(self, denoiser: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                text: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The denoiser's output for a batch; ``denoiser`` may be the wrapped (DDP/PEFT) module.

        ``timesteps`` are on the objective's scale; the output has the shape of ``noisy_latents``.
        """

    # ----- ControlNet (models/controlnet.py drives these) ------------------------------------------
    @classmethod
    def supports_controlnet(cls) -> bool:
        return cls.controlnet_class_name is not None and cls.controlnet_pipeline_class is not None

    @classmethod
    def controlnet_builder(cls) -> Any:
        """The function building the ControlNet from the denoiser (``builder(denoiser, **settings)``): the diffusers
        class's :attr:`controlnet_constructor`; a family whose ControlNet class has none supplies its own."""
        import diffusers

        return getattr(getattr(diffusers, str(cls.controlnet_class_name)), cls.controlnet_constructor)

    @classmethod
    def controlnet_init_kwargs(cls, components: Components) -> dict[str, Any]:
        """Arguments of :attr:`controlnet_constructor` before ``--controlnet_custom_config``. For a UNet ControlNet:
        diffusers' defaults, except that the control image's embedding downsamples by the VAE's factor (8 for
        every released model; smaller for tiny test models)."""
        vae = components.vae
        blocks = len(vae.config.block_out_channels) if vae is not None else 4
        return {} if blocks == 4 else {"conditioning_embedding_out_channels": (16, 32, 96, 256, 512)[:blocks]}

    def controlnet_lora_target_list(self, cfg: Any) -> tuple[str, ...]:
        """The ControlNet's LoRA targets for this configuration (a family with target presets may pick one)."""
        return self.controlnet_lora_targets

    def controlnet_residuals(self, controlnet: torch.nn.Module, control: torch.Tensor, args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> dict[str, Any]:
        """Run ``controlnet`` for one denoiser call (``args``/``kwargs``: the call :meth:`predict` makes) and return
        the denoiser keyword arguments that carry its output. This default is the UNet ControlNet
        (``ControlNetModel``): the down-block and mid-block residuals; ``control`` is ``[B, 3, H, W]`` in [0, 1]."""
        sample, timestep = args[0], args[1]
        down, mid = controlnet(sample, timestep, encoder_hidden_states=kwargs["encoder_hidden_states"],
                               added_cond_kwargs=kwargs.get("added_cond_kwargs"), controlnet_cond=control.to(sample.dtype),
                               return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def lora_targets(self, cfg: Any) -> tuple[str, ...]:
        """The denoiser's LoRA targets: the preset named by ``lora_target_option``, the slider targets with
        ``--slider_lora_target``, else the default."""
        preset = getattr(cfg, self.lora_target_option, None) if self.lora_target_option else None
        if preset:
            return self.lora_target_presets[preset]
        if getattr(cfg, "slider_lora_target", False):
            return self.slider_lora_targets
        return self.default_lora_targets

    def trainable_text_encoders(self) -> list[tuple[int, str, torch.nn.Module]]:
        """(index in pipeline order, pipeline name, module) of each text encoder ``--train_text_encoder`` trains."""
        names = self.trainable_text_encoder_names or self.text_encoder_names
        return [(i, n, te) for i, (n, te) in enumerate(zip(self.text_encoder_names, self.text_encoders, strict=True))
                if n in names]

    def text_lora_targets(self, index: int) -> tuple[str, ...]:
        return self.text_encoder_lora_targets

    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module, interval: int | None = None) -> Any:
        """Recompute activations of every ``interval``-th block in the backward pass (every block when unset)."""
        from ..training.checkpointing import enable_gradient_checkpointing

        return enable_gradient_checkpointing(denoiser, interval)

    # ----- saving / validation -------------------------------------------------------------
    def pipeline_components(self, *, denoiser: torch.nn.Module | None = None,
                            text_encoders: Sequence[torch.nn.Module] | None = None) -> dict[str, Any]:
        comps: dict[str, Any] = {self.denoiser_name: denoiser or self.denoiser, "scheduler": self.inference_scheduler()}
        if self.uses_vae:
            comps["vae"] = self.vae
        for name, te in zip(self.text_encoder_names, text_encoders or self.text_encoders, strict=True):
            comps[name] = te
        for name, tok in zip(self.tokenizer_names, self.tokenizers, strict=True):
            comps[name] = tok
        comps.update(self.extra_pipeline_components())
        return comps

    def inference_scheduler(self) -> Any:
        """The scheduler saved with the pipeline and used for validation (the training one by default)."""
        return self.noise_scheduler

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {}

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Validation-call arguments (prompt, size, steps, guidance, …) adapted to this family's pipeline."""
        return kwargs

    def build_pipeline(self, *, denoiser: torch.nn.Module | None = None,
                       text_encoders: Sequence[torch.nn.Module] | None = None, scheduler: Any = None,
                       controlnet: torch.nn.Module | None = None):
        """The family's diffusers pipeline around the given (unwrapped) modules, for validation; with a
        ``controlnet``, the family's ControlNet pipeline (:attr:`controlnet_pipeline_class`)."""
        import inspect

        import diffusers

        comps = self.pipeline_components(denoiser=denoiser, text_encoders=text_encoders)
        if scheduler is not None:
            comps["scheduler"] = scheduler
        if controlnet is None:
            return getattr(diffusers, self.pipeline_class)(**comps)
        cls = getattr(diffusers, str(self.controlnet_pipeline_class))
        accepted = inspect.signature(cls.__init__).parameters
        return cls(**{k: v for k, v in comps.items() if k in accepted}, controlnet=controlnet)

    @classmethod
    def lora_loader_class(cls):
        """The pipeline class whose ``save_lora_weights``/``load_lora_weights`` fit this family."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def comfyui_prefix(cls, module_name: str, trained: Sequence[str]) -> str:
        """The kohya/ComfyUI key prefix of one trained module (``trained``: every trained module's name)."""
        text_encoders = [n for n in trained if n in cls.text_encoder_names]
        if module_name in cls.text_encoder_names and len(cls.text_encoder_names) == 1 and len(text_encoders) == 1:
            return cls.comfyui_single_text_encoder_prefix
        return cls.comfyui_prefixes.get(module_name, f"lora_{module_name}")

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """The ComfyUI layer name of ``module_path`` inside a trained module (kohya: dots become ``_``;
        CLIP text-encoder layers by ComfyUI's CLIP rule, :func:`~..training.lora.comfyui_clip_layer`)."""
        prefix = cls.comfyui_prefix(module_name, trained)
        if module_name in cls.text_encoder_names:
            from ..training.lora import comfyui_clip_layer

            return f"{prefix}_{comfyui_clip_layer(module_path)}"
        return f"{prefix}_{module_path.replace('.', '_')}"
