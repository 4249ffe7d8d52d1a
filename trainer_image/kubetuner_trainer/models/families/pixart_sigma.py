"""PixArt Sigma: a DiT on T5 hidden states (with their token mask), DDPM ε-prediction, SDXL's VAE.

Conditioning as ``PixArtSigmaPipeline.encode_prompt``: T5 tokens padded to 300 (SimpleTuner fixes
PixArt to 300 and ignores ``--tokenizer_max_length``), the encoder run with the token mask, the mask
cached next to the hidden states and handed to the transformer as ``encoder_attention_mask``;
``--t5_padding zero`` zeroes the padding states. Captions are not "cleaned" (diffusers' cleaning
needs ftfy, which SimpleTuner does not install either).

The transformer predicts 8 channels for 4-channel latents: the noise and a learned variance. The
loss uses the noise half only, as the pipeline does at inference (the variance half gets no
gradient, as in SimpleTuner). Training adds noise on the model's DDPM betas; validation samples
with ``DPMSolverMultistepScheduler`` (PixArt Sigma's own). Neither
``PixArtTransformer2DModel`` nor ``PixArtSigmaPipeline`` carries diffusers' LoRA methods, so the
family loads and validates with subclasses that add them (diffusers' PEFT mixin and its
transformer-only LoRA loader); saved files still name the upstream classes. LoRA files use the
diffusers names ``transformer.<layer>.lora_A/B``, which that loader and ComfyUI read.

The ``900M-1024-v0.7-stage1``/``-stage2`` flavours are the two experts of an eDiffi-style split (as in
SimpleTuner 3.1.6, which recognises them by "stage1"/"stage2" in the flavour or, a flavour being named, in the
model path): stage 1 takes the high-noise timesteps, ``[int(T·s), T)``, stage 2 the low-noise ones,
``[0, int(T·s))``, with ``s = --refiner_training_strength`` — ``--refiner_training`` with and without
``--refiner_training_invert_schedule`` (:func:`~kubetuner_trainer.training.timesteps.refiner_timestep_range`).
Validation renders with the trained stage alone over the whole schedule: SimpleTuner does not chain the other
stage into either stage's validation, and kubetuner logs this at start.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import RoutedTokens
from ._text_transformer import TextTransformerFamily

#: T5 tokens per prompt (PixArt Sigma's length; SimpleTuner ignores --tokenizer_max_length for PixArt)
T5_MAX_LENGTH = 300
#: the eDiffi-style expert stages, as SimpleTuner spots them in a flavour or model path
STAGES = ("stage1", "stage2")


def expert_stage(cfg: Any) -> str | None:
    """``"stage1"``/``"stage2"`` when the run trains one PixArt expert, else None.

    SimpleTuner 3.1.6 looks for the stage name in ``--model_flavour`` and, only when a flavour is named, in
    ``--pretrained_model_name_or_path`` too.
    """
    flavour = getattr(cfg, "model_flavour", None)
    if not flavour:
        return None
    location = getattr(cfg, "pretrained_model_name_or_path", None) or ""
    return next((stage for stage in STAGES if stage in flavour or stage in location), None)


def stage_range(cfg: Any, num_timesteps: int) -> tuple[int, int]:
    """The ``[low, high)`` timesteps the expert named by :func:`expert_stage` trains (stage 1: the inverted,
    high-noise range; stage 2: the refiner range, inverted only by ``--refiner_training_invert_schedule``).

    Raises ValueError when ``--refiner_training_strength`` leaves the range empty.
    """
    from ...training.timesteps import refiner_timestep_range

    return refiner_timestep_range(num_timesteps, float(cfg.refiner_training_strength), invert=stage_inverts(cfg))


def stage_problem(cfg: Any) -> Problem | None:
    """The config error of a stage flavour whose ``--refiner_training_strength`` leaves it no timestep."""
    try:
        stage_range(cfg, 1000)
    except ValueError as exc:
        return Problem("refiner_training_strength", cfg.refiner_training_strength,
                       f"{exc} for the PixArt {expert_stage(cfg)} expert; use a value in (0, 1)")
    return None


def stage_inverts(cfg: Any) -> bool:
    """Whether the expert's range is the inverted one (always for stage 1, as SimpleTuner forces it)."""
    return expert_stage(cfg) == "stage1" or bool(cfg.refiner_training_invert_schedule)


def _as_upstream(cls: type, upstream: type) -> type:
    """Give a subclass the upstream class's name and module, so that ``save_pretrained`` writes the upstream
    class into ``config.json``/``model_index.json`` and what we save loads with plain diffusers."""
    cls.__name__ = cls.__qualname__ = upstream.__name__
    cls.__module__ = upstream.__module__
    return cls


@cache
def peft_transformer_class() -> type:
    """``PixArtTransformer2DModel`` with diffusers' PEFT methods (``add_adapter``, ``load_lora_adapter``), which
    the upstream class lacks; saved files name the upstream class."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.loaders import PeftAdapterMixin

    class PeftPixArtTransformer2DModel(PixArtTransformer2DModel, PeftAdapterMixin):
        """PixArt's transformer with LoRA support."""

    return _as_upstream(PeftPixArtTransformer2DModel, PixArtTransformer2DModel)


@cache
def lora_pipeline_class() -> type:
    """``PixArtSigmaPipeline`` with diffusers' transformer-only LoRA loader (``load_lora_weights``); saved
    pipelines name the upstream class."""
    from diffusers import PixArtSigmaPipeline
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

    class PixArtSigmaLoraPipeline(PixArtSigmaPipeline, SanaLoraLoaderMixin):
        """PixArt Sigma plus ``load_lora_weights``/``save_lora_weights`` for ``transformer.*`` LoRA keys."""

    return _as_upstream(PixArtSigmaLoraPipeline, PixArtSigmaPipeline)


class PixArtSigmaFamily(TextTransformerFamily):
    family = "pixart_sigma"
    pipeline_class = "PixArtSigmaPipeline"
    # SimpleTuner 3.1.6's PixArt flavours; 900M-1024-v0.6 is its default
    flavours = {
        "900M-1024-v0.6": "terminusresearch/pixart-900m-1024-ft-v0.6",
        "900M-1024-v0.7-stage1": "terminusresearch/pixart-900m-1024-ft-v0.7-stage1",
        "900M-1024-v0.7-stage2": "terminusresearch/pixart-900m-1024-ft-v0.7-stage2",
        "600M-512": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
        "600M-1024": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        "600M-2048": "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS",
    }
    default_flavour = "900M-1024-v0.6"
    denoiser_class_name = "PixArtTransformer2DModel"
    transformer_block_lists = ("transformer_blocks",)
    #: each block takes and returns the image tokens ``[B, h·w, D]``; positions are added before the blocks
    routed_tokens = (RoutedTokens(),)
    scheduler_class_name = "DPMSolverMultistepScheduler"
    text_encoder_location_options = {"pretrained_t5_model_name_or_path": "text_encoder"}
    slider_lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    modelspec_architecture = "pixart-sigma"
    embeds_key = "prompt_embeds"
    mask_key = "prompt_attention_mask"
    comfyui_loads_lora = True

    @classmethod
    def denoiser_class(cls) -> type:
        return peft_transformer_class()

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import T5EncoderModel

        return (T5EncoderModel,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_pixart_sigma(folder, seed=seed)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = super().config_problems(cfg)
        if expert_stage(cfg) and stage_problem(cfg):
            problems.append(stage_problem(cfg))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = super().config_warnings(cfg)
        if cfg.tokenizer_max_length:
            warnings.append(Problem("tokenizer_max_length", cfg.tokenizer_max_length,
                                    f"has no effect: PixArt Sigma uses {T5_MAX_LENGTH} T5 tokens (as SimpleTuner)"))
        if (cfg.max_grad_norm or 0) > 0.01 and not getattr(cfg, "i_know_what_i_am_doing", False):
            warnings.append(Problem("max_grad_norm", cfg.max_grad_norm,
                                    "SimpleTuner lowers it to 0.01 for PixArt Sigma; kubetuner uses the value given"))
        stage = expert_stage(cfg)
        if stage and not stage_problem(cfg):
            low, high = stage_range(cfg, 1000)
            warnings.append(Problem("model_flavour", cfg.model_flavour,
                                    f"trains the PixArt {stage} expert on timesteps [{low}, {high}) of 1000 "
                                    "(refiner_training, as SimpleTuner); validation renders with this stage alone "
                                    "over the whole schedule, as SimpleTuner does (the other stage is not chained)"))
        return warnings

    def make_objective(self) -> Any:
        """DDPM on the expert's timesteps for a stage flavour (:func:`stage_range`), else on ``--refiner_training``'s."""
        if expert_stage(self.cfg) is None:
            return super().make_objective()
        from ...training.objectives import DDPMObjective

        return DDPMObjective(self.cfg, self.noise_scheduler, self.prediction_type, refiner=True,
                             invert=stage_inverts(self.cfg))

    @property
    def max_sequence_length(self) -> int:
        return T5_MAX_LENGTH

    def text_cache_identity(self) -> dict[str, Any]:
        return {**super().text_cache_identity(), "t5_padding": self.cfg.t5_padding or "unmodified"}

    def run_text_encoder(self, encoder, ids, mask):
        embeds = encoder(ids, attention_mask=mask)[0]
        if self.cfg.t5_padding == "zero":
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return embeds

    def route_block_inputs(self, block_list: str, arguments: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """An image-token attention mask (``[B, 1, S]`` bias), when one is given, cut to the kept tokens."""
        mask = arguments.get("attention_mask")
        if mask is not None:
            arguments["attention_mask"] = mask.index_select(-1, keep.to(mask.device))
        return arguments

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """The noise prediction ``[B, 4, h, w]`` (the learned-variance half of the output dropped)."""
        embeds, mask = self.text_inputs(text, noisy_latents)
        out = denoiser(noisy_latents, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=timesteps,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return self.without_learned_sigma(out, noisy_latents.shape[1])

    # ----- validation / export --------------------------------------------------------------------
    def inference_scheduler(self) -> Any:
        """PixArt Sigma samples with DPM-Solver++ on the training betas."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)

    def build_pipeline(self, *, denoiser=None, text_encoders=None, scheduler=None):
        comps = self.pipeline_components(denoiser=denoiser, text_encoders=text_encoders)
        if scheduler is not None:
            comps["scheduler"] = scheduler
        return lora_pipeline_class()(**comps)

    @classmethod
    def lora_loader_class(cls):
        return lora_pipeline_class()

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Render at the asked size (no resolution binning) with uncleaned captions, as trained."""
        kwargs = super().pipeline_call_kwargs(kwargs)
        kwargs.update(use_resolution_binning=False, clean_caption=False)
        return kwargs


def tiny_pixart_transformer_config(caption_channels: int = 32) -> dict[str, Any]:
    """A two-block ``PixArtTransformer2DModel``: 4-channel latents in, 8 channels (learned sigma) out."""
    return dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                cross_attention_dim=16, caption_channels=caption_channels, sample_size=16, patch_size=2,
                norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=1)


def build_tiny_pixart_sigma(folder: Path, *, seed: int = 0) -> Path:
    """A PixArt-Sigma-shaped pipeline folder: T5 with its tokenizer, the DiT, a 4-channel VAE, DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from ..tiny import _add_index, _save, _tiny_vae, tiny_t5_encoder, write_t5_tokenizer

    torch.manual_seed(seed)
    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE, which PixArt Sigma uses
    folder = _save(folder, "PixArtSigmaPipeline", {
        "transformer": PixArtTransformer2DModel(**tiny_pixart_transformer_config()),
        "vae": vae, "text_encoder": tiny_t5_encoder(32),
        "scheduler": DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                 num_train_timesteps=1000),
    })
    write_t5_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "T5TokenizerFast")
    return folder


FAMILY = PixArtSigmaFamily
