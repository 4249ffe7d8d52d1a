"""The model-family interface every adapter implements, and the encoder bridge for the data pipeline.

A family adapter owns the loaded components (UNet, VAE, text encoders, tokenizers, noise
scheduler) and knows the family's conventions: how prompts become conditioning tensors,
how the UNet is called, which target the loss compares against, which layers LoRA wraps,
and which diffusers pipeline renders validation images.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .loading import ModelSource, load_components

CLIP_TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_ATTENTION_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass
class Components:
    """The loaded parts of one model. ``text_encoders``/``tokenizers`` are in pipeline order."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    source: ModelSource
    extra: dict[str, Any] = field(default_factory=dict)


class AdapterEncoders:
    """What the data pipeline needs from the model (the ``Encoders`` protocol)."""

    def __init__(self, adapter: ModelAdapter):
        self._adapter = adapter
        self.cache_key = adapter.cache_key
        self.latent_downscale = adapter.latent_downscale

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._adapter.encode_images(pixels)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        batched = self._adapter.encode_text(list(prompts))
        return [{k: v[i].detach().cpu() for k, v in batched.items()} for i in range(len(prompts))]


class ModelAdapter(ABC):
    """One model family. Subclasses set the class attributes and the text/predict hooks."""

    family: ClassVar[str]
    pipeline_class: ClassVar[str]
    #: flavour name -> default hub id (used when ``--pretrained_model_name_or_path`` is unset)
    flavours: ClassVar[dict[str, str]]
    default_flavour: ClassVar[str]
    #: the text encoder / tokenizer subfolders, in pipeline order
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    default_lora_targets: ClassVar[tuple[str, ...]] = UNET_ATTENTION_LORA_TARGETS
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = CLIP_TEXT_LORA_TARGETS

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTokenizer

        return (CLIPTokenizer,)

    def __init__(self, cfg: Any, components: Components, *, device: torch.device | str = "cpu",
                 weight_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.components = components
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        scheduler = components.noise_scheduler
        self.prediction_type: str = cfg.prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported by the {self.family} family; "
                "use epsilon or v_prediction"
            )

    # ----- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: Any, *, device: torch.device | str = "cpu",
             weight_dtype: torch.dtype = torch.float32) -> ModelAdapter:
        """Load every component from the configured folder, hub id or single file."""
        components = load_components(cls, cfg, weight_dtype=weight_dtype)
        adapter = cls(cfg, components, device=device, weight_dtype=weight_dtype)
        adapter.to(device)
        return adapter

    def to(self, device: torch.device | str) -> ModelAdapter:
        self.device = torch.device(device)
        c = self.components
        c.unet.to(self.device)
        c.vae.to(self.device)
        for te in c.text_encoders:
            te.to(self.device)
        return self

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

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
            "vae_scaling": self.vae.config.scaling_factor,
            "vae_dtype": str(next(self.vae.parameters()).dtype),
        }
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{self.family}-{digest}"

    def encoders(self) -> AdapterEncoders:
        return AdapterEncoders(self)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` in ``[-1,1]`` → scaled latents (a sample of the VAE posterior)."""
        vae = self.vae
        pixels = pixels.to(self.device, dtype=next(vae.parameters()).dtype)
        # the posterior mean: cached latents must not depend on RNG state or encoding order
        latents = vae.encode(pixels).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    @abstractmethod
    def encode_text(self, prompts: Sequence[str],
                    text_encoders: Sequence[torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """Prompts → batched conditioning tensors (with gradients when a text encoder trains).

        ``text_encoders`` replaces the loaded ones (e.g. their DDP-wrapped versions during training).
        """

    # ----- training --------------------------------------------------------------------------
    @abstractmethod
    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                text: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The UNet's output for a batch; ``unet`` may be the wrapped (DDP/PEFT) module."""

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the prediction is compared against, for this model's prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def text_lora_targets(self, index: int) -> tuple[str, ...]:
        return self.text_encoder_lora_targets

    # ----- saving / validation -------------------------------------------------------------
    def pipeline_components(self, *, unet: torch.nn.Module | None = None,
                            text_encoders: Sequence[torch.nn.Module] | None = None) -> dict[str, Any]:
        comps: dict[str, Any] = {"unet": unet or self.unet, "vae": self.vae,
                                 "scheduler": self.noise_scheduler}
        for name, te in zip(self.text_encoder_names, text_encoders or self.text_encoders, strict=True):
            comps[name] = te
        for name, tok in zip(self.tokenizer_names, self.tokenizers, strict=True):
            comps[name] = tok
        comps.update(self.extra_pipeline_components())
        return comps

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {}

    def build_pipeline(self, *, unet: torch.nn.Module | None = None,
                       text_encoders: Sequence[torch.nn.Module] | None = None, scheduler: Any = None):
        """The family's diffusers pipeline around the given (unwrapped) modules, for validation."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        comps = self.pipeline_components(unet=unet, text_encoders=text_encoders)
        if scheduler is not None:
            comps["scheduler"] = scheduler
        return cls(**comps)

    @classmethod
    def lora_loader_class(cls):
        """The pipeline class whose ``save_lora_weights``/``load_lora_weights`` fit this family."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class)
