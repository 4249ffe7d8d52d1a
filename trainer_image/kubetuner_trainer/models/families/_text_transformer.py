"""Shared by the diffusion-transformer families conditioned on one text encoder with a token mask.

PixArt Sigma (T5), Sana (Gemma 2), AuraFlow (UMT5) and Lumina 2 (Gemma 2) all tokenize a prompt to a
fixed length, run one encoder and hand the transformer its hidden states ``[B, L, D]``; all but
AuraFlow also hand it the token mask ``[B, L]`` so that padding takes no attention. The text encoder
stays frozen: these pipelines' LoRA loaders load transformer weights only. Not a family itself (the
registry skips modules whose name starts with ``_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ...config import ConfigError, Problem
from ..family import ModelFamily

#: SimpleTuner's attention LoRA targets, shared by these families
ATTENTION_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
#: the pixel alignment SimpleTuner forces on these families (--aspect_bucket_alignment)
SIMPLETUNER_ALIGNMENT = 64


def refused_train_text_encoder(cfg: Any, family: str, pipeline_class: str) -> list[Problem]:
    """``--train_text_encoder`` is refused: with LoRA because the pipeline's LoRA loader reads transformer weights
    only; with full training because kubetuner does not build text-encoder training for these families."""
    if not getattr(cfg, "train_text_encoder", False):
        return []
    if getattr(cfg, "model_type", "lora") == "full":
        return [Problem("train_text_encoder", True, f"is not built for {family} full training: kubetuner keeps its "
                                                    "text encoder frozen")]
    return [Problem("train_text_encoder", True, f"is not supported for {family}: {pipeline_class}.load_lora_weights "
                                                "loads transformer LoRAs only, so its text encoder stays frozen")]


class TextTransformerFamily(ModelFamily):
    """A diffusion transformer on one frozen text encoder's hidden states and token mask."""

    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    trainable_text_encoder_names = ()
    default_lora_targets = ATTENTION_LORA_TARGETS
    #: the pipeline argument names of the cached embeddings and their mask
    embeds_key: ClassVar[str] = "prompt_embeds"
    mask_key: ClassVar[str] = "prompt_attention_mask"
    #: whether the pipeline pads prompts on the right whatever the tokenizer says (SanaPipeline does)
    pad_right: ClassVar[bool] = False
    #: whether ComfyUI has a LoRA loader for this family (keys from :meth:`comfyui_key`: by default the diffusers
    #: names ``transformer.<layer>``, which ComfyUI maps for PixArt and AuraFlow)
    comfyui_loads_lora: ClassVar[bool] = False

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import AutoTokenizer

        return (AutoTokenizer,)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = refused_train_text_encoder(cfg, cls.family, cls.pipeline_class)
        if getattr(cfg, "lora_format", None) == "comfyui" and not cls.comfyui_loads_lora:
            problems.append(Problem("lora_format", "comfyui", f"ComfyUI has no {cls.family} model, hence no LoRA "
                                                              "loader for it; use diffusers"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        alignment = getattr(cfg, "aspect_bucket_alignment", SIMPLETUNER_ALIGNMENT)
        if alignment == SIMPLETUNER_ALIGNMENT:
            return []
        return [Problem("aspect_bucket_alignment", alignment,
                        f"SimpleTuner raises it to {SIMPLETUNER_ALIGNMENT} for {cls.family}; kubetuner keeps "
                        f"{alignment} (sizes must still fit the latent patches)")]

    def __init__(self, cfg: Any, components: Any, **kwargs: Any):
        super().__init__(cfg, components, **kwargs)
        self._check_alignment()

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE downscale times the transformer's patch size."""
        return self.latent_downscale * int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    def _check_alignment(self) -> None:
        """Bucket sizes that do not cut into whole latent patches are a config error (exit 78)."""
        alignment = getattr(self.cfg, "aspect_bucket_alignment", None)
        if alignment and alignment % self.pixel_multiple:
            raise ConfigError([Problem("aspect_bucket_alignment", alignment,
                                       f"must be a multiple of {self.pixel_multiple} for this {self.family} model "
                                       f"(VAE downscale {self.latent_downscale} × patch size)")])

    # ----- text ----------------------------------------------------------------------------------
    @property
    def max_sequence_length(self) -> int:
        """Tokens per prompt (the pipeline's ``max_sequence_length``)."""
        raise NotImplementedError

    def text_cache_identity(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def tokenize(self, prompts: Sequence[str], max_length: int) -> Any:
        """Token ids and mask ``[B, max_length]``, padded (on the tokenizer's side, or the right where the
        family's pipeline forces it) and truncated."""
        tokenizer = self.tokenizers[0]
        if self.pad_right:
            tokenizer.padding_side = "right"
        return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt")

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, L, D]`` and ``prompt_attention_mask [B, L]`` (1 = token, 0 = padding)."""
        encoder = (text_encoders or self.text_encoders)[0]
        inputs = self.tokenize(prompts, self.max_sequence_length)
        mask = inputs.attention_mask.to(self.device)
        embeds = self.run_text_encoder(encoder, inputs.input_ids.to(self.device), mask)
        return {self.embeds_key: embeds, self.mask_key: mask}

    def run_text_encoder(self, encoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state, computed with the token mask."""
        return encoder(ids, attention_mask=mask)[0]

    # ----- training -------------------------------------------------------------------------------
    def text_inputs(self, text: dict[str, torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds in the latents' dtype, mask) on the latents' device."""
        return (text[self.embeds_key].to(like.device, like.dtype), text[self.mask_key].to(like.device))

    @staticmethod
    def without_learned_sigma(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
        """Drop the learned-variance half of an output with twice the latent channels (as the pipelines do)."""
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latent_channels else out

    # ----- validation -----------------------------------------------------------------------------
    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The trained prompt length; ``guidance_rescale`` does not exist for these pipelines."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        kwargs["max_sequence_length"] = self.max_sequence_length
        return kwargs

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """ComfyUI reads these families' LoRA layers by their diffusers names, ``transformer.<layer>``."""
        return f"{module_name}.{module_path}"


class FlowTextTransformerFamily(TextTransformerFamily):
    """The rectified-flow members (Sana, AuraFlow, Lumina 2): sigmas from the ``--flow_*`` options,
    velocity target, validation with the model's ``FlowMatchEulerDiscreteScheduler``."""

    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    prediction_types = ("flow_matching",)
    swappable_validation_scheduler = False

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler is kept for validation

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        return FlowMatchingObjective(self.cfg, self.noise_scheduler.config)

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = super().config_warnings(cfg)
        if getattr(cfg, "validation_noise_scheduler", None):
            warnings.append(Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                                    f"has no effect for {cls.family}: validation uses FlowMatchEulerDiscreteScheduler"))
        return warnings
