"""Cosmos-Predict2 text-to-image: a T5 encoder, ``CosmosTransformer3DModel`` on single frames of the Wan VAE,
trained with the EDM objective its pipeline samples with.

Latents are one-frame Wan-VAE latents ``[B, 16, H/8, W/8]`` normalised by the VAE's
``latents_mean``/``latents_std`` and scaled by ``σ_data`` (the pipeline's decode inverts exactly that).
Text is ``Cosmos2TextToImagePipeline``'s T5 encoding: ``[B, L, d]`` with ``L = --tokenizer_max_length``
(512 when unset), padding positions zeroed.

The objective (:class:`EDMObjective`, as the pipeline's sampler and SimpleTuner define it): noise
levels ``σ`` are log-normal (``ln σ ~ N(0, 1)``) clamped to the pipeline's ``[σ_min, σ_max]``; the
noisy latent is ``x_σ = x₀ + σ·ε``; the transformer sees ``c_in·x_σ`` at timestep ``t = σ/(σ+1)`` and
its output ``F`` gives ``x̂₀ = c_skip·x_σ + c_out·F`` with ``c_in = c_skip = 1/(1+σ)``,
``c_out = −σ/(1+σ)``; the loss is ``λ(σ)·‖x̂₀ − x₀‖²`` with ``λ = (σ² + σ_d²)/(σ·σ_d)²``. The σ
range and ``σ_data`` are read from the pipeline class, not typed here.

Validation renders and NVIDIA's safety checker: ``Cosmos2TextToImagePipeline`` refuses to render without the
``cosmos_guardrail`` package's checker (NVIDIA's Open Model License asks for it). When that package is installed,
validation renders are screened by it. This trainer image does not ship it (it downloads NVIDIA's guardrail
models at start); without it, validation renders run unscreened, as SimpleTuner 3.1.6 renders Cosmos (its own
pipeline copy drops the checker) — a choice kubetuner states at start (a configuration warning on
``validation_prompt``) and logs again at the first unscreened render. Saved pipelines carry no checker and load
into diffusers' pipeline as ever. ``--lora_format comfyui`` names layers ``diffusion_model.<layer>`` in NVIDIA's
original names (``blocks.0.self_attn.q_proj``), which ComfyUI's Cosmos-Predict2 model keeps. The pipeline has no
LoRA loader;
LoRA files load with ``pipe.transformer.load_lora_adapter(path, prefix="transformer")`` (or through the
subclass here, which adds diffusers' transformer-only ``load_lora_weights``).
Flavours and hub ids are SimpleTuner 3.1.6's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ...config import Problem
from ...training.losses import masked_mean
from ...training.objectives import Objective
from ..family import DiffusersClass, ModelFamily, RoutedTokens
from .pixart_sigma import _as_upstream

log = logging.getLogger(__name__)

#: T5 tokens per prompt when ``--tokenizer_max_length`` is unset (the pipeline's max_sequence_length)
COSMOS_MAX_LENGTH = 512
ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
SLIDER_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "patch_embed.proj", "proj_out",
                  "time_embed.t_embedder.linear_1", "time_embed.t_embedder.linear_2")


def text_length(cfg: Any) -> int:
    return int(getattr(cfg, "tokenizer_max_length", None) or COSMOS_MAX_LENGTH)


def guardrail_available() -> bool:
    from diffusers.utils import is_cosmos_guardrail_available

    return bool(is_cosmos_guardrail_available())


class _NearestResize:
    """Stands in for ``torchvision.transforms`` in diffusers' Cosmos transformer when torchvision is absent: the
    padding mask it resizes with nearest-neighbour sampling is resized by ``torch.nn.functional.interpolate``
    (mode ``nearest``, the same sampling)."""

    class InterpolationMode:
        NEAREST = "nearest"

    class functional:
        @staticmethod
        def resize(tensor: torch.Tensor, size: list[int], interpolation: str = "nearest") -> torch.Tensor:
            return torch.nn.functional.interpolate(tensor, size=list(size), mode="nearest")


@cache
def _transformer_module() -> Any:
    from diffusers.models.transformers import transformer_cosmos

    if not hasattr(transformer_cosmos, "transforms"):  # torchvision missing
        transformer_cosmos.transforms = _NearestResize
    return transformer_cosmos


#: diffusers' Cosmos-Predict2 layer names → NVIDIA's original ones (dot-separated segments, applied in order):
#: the names ComfyUI's CosmosPredict2 model uses (comfy/ldm/cosmos/predict2.py), the inverse of the renames in
#: diffusers' single-file converter ``convert_cosmos_transformer_checkpoint_to_diffusers``
ORIGINAL_LAYER_NAMES = (
    ("transformer_blocks", "blocks"), ("attn1", "self_attn"), ("attn2", "cross_attn"),
    ("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out.0", "output_proj"),
    ("ff.net.0.proj", "mlp.layer1"), ("ff.net.2", "mlp.layer2"),
    ("norm1.linear_1", "adaln_modulation_self_attn.1"), ("norm1.linear_2", "adaln_modulation_self_attn.2"),
    ("norm2.linear_1", "adaln_modulation_cross_attn.1"), ("norm2.linear_2", "adaln_modulation_cross_attn.2"),
    ("norm3.linear_1", "adaln_modulation_mlp.1"), ("norm3.linear_2", "adaln_modulation_mlp.2"),
    ("time_embed.t_embedder", "t_embedder.1"), ("patch_embed.proj", "x_embedder.proj.1"),
    ("norm_out.linear_1", "final_layer.adaln_modulation.1"), ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
    ("proj_out", "final_layer.linear"),
)

#: said when a validation render runs without NVIDIA's safety checker (configuration warning and render log)
UNSCREENED_RENDERS = ("validation renders run without NVIDIA's Cosmos safety checker: the cosmos_guardrail package is "
                      "not installed (SimpleTuner 3.1.6 renders Cosmos without it too; NVIDIA's Open Model License "
                      "asks for it). Install cosmos_guardrail in the trainer image to screen them, or set no "
                      "validation prompt")


class UnscreenedRenders:
    """Stands in for ``CosmosSafetyChecker`` during one render when ``cosmos_guardrail`` is not installed: every
    prompt passes and frames come back as they are (what SimpleTuner's checker-free pipeline does)."""

    def to(self, *args: Any, **kwargs: Any) -> UnscreenedRenders:
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: Any) -> Any:
        """``frames``: uint8 ``[F, H, W, 3]``, returned unchanged."""
        return frames


@cache
def pipeline_class() -> type:
    """``Cosmos2TextToImagePipeline`` that can be assembled (and saved) without a safety checker, renders with
    NVIDIA's checker when ``cosmos_guardrail`` is installed and unscreened (logged) otherwise (see module), plus
    diffusers' transformer-only LoRA loader (``load_lora_weights``). Saved pipelines name the upstream class."""
    from diffusers import Cosmos2TextToImagePipeline
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

    class AssemblableCosmos2TextToImagePipeline(Cosmos2TextToImagePipeline, SanaLoraLoaderMixin):
        def __init__(self, text_encoder, tokenizer, transformer, vae, scheduler, safety_checker=None):
            if safety_checker is None and guardrail_available():
                from cosmos_guardrail import CosmosSafetyChecker

                safety_checker = CosmosSafetyChecker()
            # upstream builds a checker when given None; a placeholder keeps the rest of its set-up
            super().__init__(text_encoder, tokenizer, transformer, vae, scheduler,
                             safety_checker if safety_checker is not None else torch.nn.Identity())
            if safety_checker is None:
                self.register_modules(safety_checker=None)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if self.safety_checker is not None:
                return super().__call__(*args, **kwargs)
            _say_unscreened()
            # only for this call, and past the config: the pipeline stays checker-free for saving
            self.__dict__["safety_checker"] = UnscreenedRenders()
            try:
                return super().__call__(*args, **kwargs)
            finally:
                self.__dict__["safety_checker"] = None

    return _as_upstream(AssemblableCosmos2TextToImagePipeline, Cosmos2TextToImagePipeline)


@cache
def _say_unscreened() -> None:
    """Log :data:`UNSCREENED_RENDERS` once per process (at the first unscreened render)."""
    log.warning("cosmos2image: %s", UNSCREENED_RENDERS)


@cache
def edm_constants() -> dict[str, float]:
    """The pipeline's σ_min, σ_max and σ_data (set in its ``__init__``; read from an empty instance)."""
    probe = pipeline_class()(None, None, None, None, None)
    return {"sigma_min": probe.sigma_min, "sigma_max": probe.sigma_max, "sigma_data": probe.sigma_data}


class EDMObjective(Objective):
    """Cosmos-Predict2's EDM training objective (see the module docstring); timesteps are σ."""

    prediction_type = "sample"
    timestep_dtype = torch.float32
    num_train_timesteps = 1

    def __init__(self, sigma_min: float, sigma_max: float, sigma_data: float):
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def _clamped(self, log_sigma: torch.Tensor) -> torch.Tensor:
        return log_sigma.exp().clamp(self.sigma_min, self.sigma_max)

    def sample_timesteps(self, latents, generator):
        return self._clamped(torch.randn(latents.shape[0], generator=generator))

    def noisy_latents(self, latents, noise, timesteps):
        return latents + timesteps.to(latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1))) * noise

    def target(self, latents, noise, timesteps):
        return latents

    def eval_timesteps(self, count):
        """σ at the centres of ``count`` equal-probability slices of the log-normal."""
        count = max(1, count)
        normal = torch.distributions.Normal(0.0, 1.0)
        centres = torch.tensor([(i + 0.5) / count for i in range(count)])
        return self._clamped(normal.icdf(centres)).tolist()

    def loss(self, cfg, pred, target, timesteps, mask=None):
        sigma = timesteps.float().to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return masked_mean(weight * (pred.float() - target.float()) ** 2, mask).mean()


class Cosmos2ImageFamily(ModelFamily):
    family = "cosmos2image"
    pipeline_class = "Cosmos2TextToImagePipeline"
    flavours = {"2b": "nvidia/Cosmos-Predict2-2B-Text2Image", "14b": "nvidia/Cosmos-Predict2-14B-Text2Image"}
    default_flavour = "2b"
    denoiser_name = "transformer"
    denoiser_class_name = "CosmosTransformer3DModel"
    transformer_block_lists = ("transformer_blocks",)
    routed_tokens = (RoutedTokens(),)  # each block takes and returns the image tokens [B, h·w, D]
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    vae_class = DiffusersClass("AutoencoderKLWan")
    text_encoder_location_options = {"pretrained_t5_model_name_or_path": "text_encoder"}
    prediction_types = ("sample",)
    default_lora_targets = ATTENTION
    slider_lora_targets = SLIDER_TARGETS
    modelspec_architecture = "cosmos-predict2"
    swappable_validation_scheduler = False
    comfyui_prefixes = {"transformer": "diffusion_model"}

    @classmethod
    def denoiser_class(cls) -> type:
        return _transformer_module().CosmosTransformer3DModel

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
        """A Cosmos-Predict2-shaped pipeline: T5, a 2-block Cosmos transformer, a 4× Wan VAE, the scheduler
        Cosmos samples with (Karras σ, as the hub configs)."""
        from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
        from transformers import T5TokenizerFast

        from ..tiny import tiny_t5_encoder, write_t5_tokenizer

        folder = Path(folder)
        write_t5_tokenizer(folder / "tokenizer")
        torch.manual_seed(seed)
        pipe = pipeline_class()(
            text_encoder=tiny_t5_encoder(32), tokenizer=T5TokenizerFast.from_pretrained(folder / "tokenizer"),
            transformer=CosmosTransformer3DModel(
                in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=24, num_layers=2,
                mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(4, 32, 32), patch_size=(1, 2, 2),
                rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None),
            vae=AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True]),
            scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=1.0))
        pipe.save_pretrained(folder)
        return folder

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", True, "Cosmos' T5 encoder is not trained here (the "
                                    "pipeline loads no text-encoder LoRA)"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        """Validation renders without NVIDIA's safety checker (``cosmos_guardrail`` not installed) are said at start."""
        from ...runtime.validation import PROMPT_OPTIONS

        if guardrail_available():
            return []
        asking = [name for name in PROMPT_OPTIONS if getattr(cfg, name, None)]
        return [Problem(asking[0], getattr(cfg, asking[0]), UNSCREENED_RENDERS)] if asking else []

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler

    @classmethod
    def resolve_prediction_type(cls, cfg: Any, scheduler: Any) -> str:
        return cfg.prediction_type or cls.prediction_types[0]

    def make_objective(self) -> Any:
        return EDMObjective(**{k: float(v) for k, v in edm_constants().items()})

    # ----- latents -------------------------------------------------------------------------
    @property
    def latent_downscale(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)  # the pipeline's vae_scale_factor_spatial

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B,3,H,W]`` in ``[-1,1]`` → normalised one-frame latents ``[B,16,H/8,W/8]`` (posterior mean)."""
        vae = self.vae
        latents = vae.encode(pixels.to(self.device, next(vae.parameters()).dtype).unsqueeze(2)).latent_dist.mode()
        latents = latents[:, :, 0].float()
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return (latents - mean) / std * edm_constants()["sigma_data"]

    # ----- text ----------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        return {"text_length": text_length(self.cfg)}

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, L, d]``: the pipeline's T5 encoding (its ``_get_t5_prompt_embeds``)."""
        encoder = (text_encoders or self.text_encoders)[0]
        holder = SimpleNamespace(tokenizer=self.tokenizers[0], text_encoder=encoder, _execution_device=self.device)
        embeds = pipeline_class()._get_t5_prompt_embeds(holder, list(prompts), max_sequence_length=text_length(
            self.cfg), device=self.device, dtype=encoder.dtype)
        return {"prompt_embeds": embeds}

    # ----- training ------------------------------------------------------------------------
    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """``x̂₀`` from ``x_σ`` (see the module docstring); ``timesteps`` are σ."""
        b, _, h, w = noisy_latents.shape
        sigma = timesteps.to(noisy_latents.device, torch.float32).view(-1, 1, 1, 1)
        scale = 1.0 / (sigma + 1.0)  # c_in = c_skip
        t = (sigma * scale).view(b)
        dtype = noisy_latents.dtype
        out = denoiser(hidden_states=(noisy_latents * scale).to(dtype).unsqueeze(2), timestep=t.to(dtype),
                       encoder_hidden_states=text["prompt_embeds"].to(noisy_latents.device, dtype),
                       padding_mask=noisy_latents.new_zeros(1, 1, h, w), return_dict=False)[0][:, :, 0]
        return scale * noisy_latents.float() - sigma * scale * out.float()

    def route_block_inputs(self, block_list: str, arguments: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """The rotary embedding rows (``(cos, sin)``, each ``[S, D]``), the learned positions
        (``extra_pos_emb [B, S, D]``) and per-token modulation (``temb``/``embedded_timestep [B, S, D]``)
        of the kept tokens."""
        rope = arguments.get("image_rotary_emb")
        if rope is not None:
            arguments["image_rotary_emb"] = tuple(r.index_select(0, keep.to(r.device)) for r in rope)
        for name in ("extra_pos_emb", "temb", "embedded_timestep"):
            value = arguments.get(name)
            if value is not None and value.dim() == 3:
                arguments[name] = value.index_select(1, keep.to(value.device))
        return arguments

    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module, interval: int | None = None) -> Any:
        from ...training.checkpointing import enable_gradient_checkpointing

        return enable_gradient_checkpointing(denoiser, interval)

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """``diffusion_model.<layer>`` in NVIDIA's original Cosmos-Predict2 names, which ComfyUI's CosmosPredict2
        model keeps and maps LoRA keys onto (:data:`ORIGINAL_LAYER_NAMES`), e.g. ``transformer_blocks.0.attn1.to_q``
        → ``diffusion_model.blocks.0.self_attn.q_proj``."""
        path = f".{module_path}."
        for diffusers_name, original in ORIGINAL_LAYER_NAMES:
            path = path.replace(f".{diffusers_name}.", f".{original}.")
        return f"{cls.comfyui_prefixes[module_name]}.{path[1:-1]}"

    # ----- validation ------------------------------------------------------------------------
    def build_pipeline(self, *, denoiser=None, text_encoders=None, scheduler=None):
        comps = self.pipeline_components(denoiser=denoiser, text_encoders=text_encoders)
        if scheduler is not None:
            comps["scheduler"] = scheduler
        return pipeline_class()(**comps)

    @classmethod
    def lora_loader_class(cls):
        return pipeline_class()

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        kwargs["max_sequence_length"] = text_length(self.cfg)
        return kwargs


FAMILY = Cosmos2ImageFamily
