"""FLUX.1: CLIP-L pooled + T5 sequence conditioning, a rectified-flow transformer on packed 2×2 latents.

Latents from the 16-channel VAE (shift and scale applied by ``encode_images``) are cut into 2×2
patches — ``[B, 16, H, W]`` → ``[B, H/2·W/2, 64]`` — with one position id (0, row, column) per patch;
text tokens get zero ids. Guidance-distilled checkpoints (``guidance_embeds``) take the guidance
value as an input: ``--flux_guidance_mode constant`` (``--flux_guidance_value``) or
``random-range`` (uniform in ``[--flux_guidance_min, --flux_guidance_max]`` per sample).
``--flux_attention_masked_training`` hides T5 padding tokens from attention; ``--t5_padding zero``
zeroes their embeddings. Flavours and hub ids follow SimpleTuner's release (3.1.6).

``kontext`` (FLUX.1 Kontext, :class:`FluxKontextFamily`) edits images: each training image comes with a
conditioning image (``conditioning_data``, see ``data/conditioning.py``) whose packed latents are appended
to the image tokens with position ids whose first coordinate is 1, as ``FluxKontextPipeline`` does; the
loss is taken on the target's tokens only. Several conditioning images (``combined`` sampling) are placed
side by side in position space (SimpleTuner's and ComfyUI's offsets). Validation renders dataset samples:
the caption of a training image with its conditioning image as FluxKontextPipeline's ``image``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import ModelFamily, RoutedTokens

#: T5 sequence length when ``--tokenizer_max_length`` is unset (FluxPipeline's ``max_sequence_length``)
T5_MAX_LENGTH = 512
SCHNELL_T5_MAX_LENGTH = 256
ATTENTION = ("to_k", "to_q", "to_v", "to_qkv", "to_out.0")
CONTEXT = ("add_k_proj", "add_q_proj", "add_v_proj", "add_qkv_proj", "to_add_out")
CONTEXT_FFS = ("ff_context.net.0.proj", "ff_context.net.2")
IMAGE_FFS = ("ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out")
#: SimpleTuner's ``controlnet`` preset: the FluxControlNetModel's input embedder and output projections
CONTROLNET_TARGETS = ("controlnet_x_embedder", *(f"controlnet_blocks.{i}" for i in range(4)),
                      *(f"controlnet_single_blocks.{i}" for i in range(10)))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, H/2·W/2, 4C]``: each 2×2 patch becomes one token (row-major)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height × width``."""
    b, _, dim = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, dim // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, dim // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype, *, flag: int = 0,
              row: int = 0, col: int = 0) -> torch.Tensor:
    """``[H/2·W/2, 3]`` position ids (flag, row, column) of the packed tokens of an ``H × W`` latent.

    The target image has flag 0; Kontext's conditioning images flag 1, shifted by ``row``/``col`` tokens.
    """
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2) + row
    cols = torch.arange(width // 2, device=device).repeat(height // 2) + col
    return torch.stack([torch.full_like(rows, flag), rows, cols], dim=1).to(dtype)


def reference_tokens(latents: Sequence[torch.Tensor], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Kontext's conditioning tokens: each ``[B, C, h, w]`` latent packed (``[B, h/2·w/2, 4C]``) and its ids.

    The first image sits at the origin with flag 1 (FluxKontextPipeline's ids); each further image is placed
    right of or below the ones before, whichever keeps the larger of the two extents smaller (the offsets of
    SimpleTuner's ``build_kontext_inputs``, which follow ComfyUI's), so multi-image LoRAs behave alike there.
    Returns tokens ``[B, S, 4C]`` and ids ``[S, 3]``.
    """
    tokens, ids = [], []
    right = below = 0  # extent covered so far, in latent pixels
    for latent in latents:
        _, _, h, w = latent.shape
        row = col = 0
        if h + below > w + right:
            col = right
        else:
            row = below
        tokens.append(pack_latents(latent.to(device, dtype)))
        ids.append(image_ids(h, w, device, dtype, flag=1, row=row // 2, col=col // 2))
        right, below = max(right, w + col), max(below, h + row)
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


class FluxFamily(ModelFamily):
    family = "flux"
    pipeline_class = "FluxPipeline"
    img2img_pipeline_class = "FluxImg2ImgPipeline"
    flavours = {
        "dev": "black-forest-labs/flux.1-dev",
        "krea": "black-forest-labs/flux.1-krea-dev",
        "schnell": "black-forest-labs/flux.1-schnell",
        "kontext": "black-forest-labs/flux.1-kontext-dev",
        "fluxbooru": "terminusresearch/fluxbooru-v0.3",
        "libreflux": "jimmycarter/LibreFlux-SimpleTuner",
    }
    default_flavour = "krea"
    denoiser_name = "transformer"
    transformer_block_lists = ("transformer_blocks", "single_transformer_blocks")
    #: both lists take the image tokens as ``hidden_states`` and return ``(encoder_hidden_states, hidden_states)``
    routed_tokens = (RoutedTokens(output=1), RoutedTokens(output=1))
    denoiser_class_name = "FluxTransformer2DModel"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_encoder_location_options = {"pretrained_t5_model_name_or_path": "text_encoder_2"}
    trainable_text_encoder_names = ("text_encoder",)  # CLIP: FluxPipeline.load_lora_weights loads no T5 LoRA
    prediction_types = ("flow_matching",)
    default_lora_targets = ATTENTION
    lora_target_option = "flux_lora_target"
    lora_target_presets = {
        "mmdit": ATTENTION,
        "all": ATTENTION + CONTEXT,
        "context": CONTEXT,
        "context+ffs": CONTEXT + CONTEXT_FFS,
        "all+ffs": ATTENTION + CONTEXT + IMAGE_FFS[:2] + CONTEXT_FFS + IMAGE_FFS[2:],
        "all+ffs+embedder": ("x_embedder",) + ATTENTION + CONTEXT + IMAGE_FFS[:2] + CONTEXT_FFS + IMAGE_FFS[2:],
        "ai-toolkit": ATTENTION + CONTEXT + IMAGE_FFS[:2] + CONTEXT_FFS
        + ("norm.linear", "norm1.linear", "norm1_context.linear") + IMAGE_FFS[2:],
        "tiny": ("single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"),
        "nano": ("single_transformer_blocks.7.proj_out",),
    }
    modelspec_architecture = "flux-1-dev"
    # SimpleTuner 3.1.6's quanto exclusions for Flux: norms, the output/input projections, the text embedder
    quantization_exclude = ("*.norm", "*.norm1", "*.norm2", "*.norm2_context", "proj_out", "x_embedder", "norm_out",
                            "context_embedder")
    comfyui_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    swappable_validation_scheduler = False  # validation samples with the model's FlowMatchEulerDiscreteScheduler
    controlnet_class_name = "FluxControlNetModel"
    controlnet_pipeline_class = "FluxControlNetPipeline"
    controlnet_constructor = "from_transformer"
    controlnet_input = "latents"
    controlnet_image_argument = "control_image"
    controlnet_lora_targets = CONTROLNET_TARGETS

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModel, T5EncoderModel

        return (CLIPTextModel, T5EncoderModel)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTokenizer, T5TokenizerFast

        return (CLIPTokenizer, T5TokenizerFast)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny_flux

        return build_tiny_flux(folder, seed=seed)

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        return FluxKontextFamily if flavour == KONTEXT else cls

    @classmethod
    def requires_conditioning(cls, cfg: Any) -> bool:
        """Kontext trains on (conditioning image, edited image) pairs, as in SimpleTuner (and any flavour does
        with ``--controlnet``)."""
        return cfg.model_flavour == KONTEXT or super().requires_conditioning(cfg)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []  # the ControlNet presets are refused by the option registry
        if cfg.model_flavour == "schnell" and not cfg.flux_fast_schedule:
            problems.append(Problem("model_flavour", "schnell", "needs flux_fast_schedule=true (as in SimpleTuner)"))
        if cfg.flux_guidance_mode == "random-range" and cfg.flux_guidance_min > cfg.flux_guidance_max:
            problems.append(Problem("flux_guidance_min", cfg.flux_guidance_min,
                                    f"must not exceed flux_guidance_max ({cfg.flux_guidance_max})"))
        length = cfg.tokenizer_max_length
        if length is not None and not 1 <= length <= T5_MAX_LENGTH:
            problems.append(Problem("tokenizer_max_length", length, f"must be between 1 and {T5_MAX_LENGTH} for Flux"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = []
        if cfg.validation_noise_scheduler:
            warnings.append(Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                                    "has no effect for Flux: validation uses FlowMatchEulerDiscreteScheduler"))
        real = cfg.validation_guidance_real
        if real is not None and real > 1.0 and cfg.validation_negative_prompt:
            # SimpleTuner's own Flux pipeline skips the negative pass for the first
            # --validation_no_cfg_until_timestep (2) steps; diffusers' FluxPipeline has no such argument, and its
            # step callback can change the latents and prompt embeddings but not the negative pass
            warnings.append(Problem("validation_guidance_real", real,
                                    "real CFG runs from the first sampling step; SimpleTuner 3.1.6 skips it for the "
                                    "first --validation_no_cfg_until_timestep steps (2), which kubetuner does not "
                                    "implement"))
        return warnings

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler  # flow matching draws its own sigmas; the scheduler is kept for validation

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        return FlowMatchingObjective(self.cfg, self.noise_scheduler.config)

    # ----- text ----------------------------------------------------------------------------
    @property
    def t5_max_length(self) -> int:
        if self.cfg.tokenizer_max_length:
            return int(self.cfg.tokenizer_max_length)
        return SCHNELL_T5_MAX_LENGTH if self.cfg.model_flavour == "schnell" else T5_MAX_LENGTH

    def text_cache_identity(self) -> dict[str, Any]:
        return {"t5_max_length": self.t5_max_length, "t5_padding": self.cfg.t5_padding}

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """CLIP's pooled output, T5's last hidden state ``[B, L, D]`` and its token mask ``[B, L]``.

        As FluxPipeline.encode_prompt: CLIP padded to 77 tokens, T5 to ``tokenizer_max_length``
        (512 by default, 256 for schnell), T5 run without an attention mask.
        """
        clip, t5 = text_encoders or self.text_encoders
        clip_tok, t5_tok = self.tokenizers
        prompts = list(prompts)
        clip_ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        t5_inputs = t5_tok(prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                           return_tensors="pt")
        mask = t5_inputs.attention_mask.to(self.device)
        embeds = t5(t5_inputs.input_ids.to(self.device), output_hidden_states=False)[0]
        if self.cfg.t5_padding == "zero":
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "attention_mask": mask}

    # ----- training ------------------------------------------------------------------------
    def guidance(self, batch_size: int, denoiser: torch.nn.Module) -> torch.Tensor:
        """Per-sample guidance values ``[B]`` (``random-range``: uniform draws while training, the middle
        of the range in eval mode so evaluation stays deterministic)."""
        cfg = self.cfg
        if cfg.flux_guidance_mode == "random-range":
            low, high = float(cfg.flux_guidance_min), float(cfg.flux_guidance_max)
            if denoiser.training:
                return low + (high - low) * torch.rand(batch_size)
            return torch.full((batch_size,), (low + high) / 2)
        return torch.full((batch_size,), float(cfg.flux_guidance_value))

    def extra_tokens(self, batch: Any, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Tokens appended after the image tokens (and their ids); none for the text-to-image flavours."""
        return None

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        b, _, h, w = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        embeds = text["prompt_embeds"].to(device, dtype)
        config = getattr(denoiser, "config", None) or self.denoiser.config
        tokens, ids = pack_latents(noisy_latents), image_ids(h, w, device, dtype)
        extra = self.extra_tokens(batch, device, dtype)
        if extra is not None:
            tokens, ids = torch.cat([tokens, extra[0]], dim=1), torch.cat([ids, extra[1]], dim=0)
        kwargs: dict[str, Any] = {}
        if config.guidance_embeds:
            kwargs["guidance"] = self.guidance(b, denoiser).to(device, dtype)
        if self.cfg.flux_attention_masked_training:
            text_mask = text["attention_mask"].to(device).bool()
            image_mask = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=device)
            # text tokens come first in Flux's joint attention; [B, 1, 1, S] broadcasts over heads and queries
            kwargs["joint_attention_kwargs"] = {"attention_mask": torch.cat([text_mask, image_mask], 1)[:, None, None]}
        out = denoiser(
            hidden_states=tokens, timestep=timesteps.to(dtype) / 1000.0,
            pooled_projections=text["pooled_prompt_embeds"].to(device, dtype), encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=ids, return_dict=False, **kwargs,
        )[0]
        # the loss is the target's: the conditioning tokens' outputs are dropped
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w)

    def route_block_inputs(self, block_list: str, arguments: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """The rotary embedding rows (``(cos, sin)``, each ``[S_text + S_image, D]``) and the attention mask
        (``[B, 1, 1, S_text + S_image]``) of the text tokens and the kept image tokens."""
        text = arguments["encoder_hidden_states"].shape[1]
        rows = torch.cat([torch.arange(text, device=keep.device), keep + text])
        rope = arguments.get("image_rotary_emb")
        if rope is not None:
            arguments["image_rotary_emb"] = tuple(r.index_select(0, rows.to(r.device)) for r in rope)
        extra = arguments.get("joint_attention_kwargs")
        if extra and extra.get("attention_mask") is not None:
            mask = extra["attention_mask"]
            arguments["joint_attention_kwargs"] = {**extra, "attention_mask": mask.index_select(-1, rows.to(mask.device))}
        return arguments

    # ----- ControlNet ---------------------------------------------------------------------------
    @classmethod
    def controlnet_init_kwargs(cls, components: Any) -> dict[str, Any]:
        """The transformer's own head layout (``from_transformer`` would otherwise assume FLUX.1's 24 × 128)."""
        config = components.denoiser.config
        return {"attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_attention_heads}

    def controlnet_lora_target_list(self, cfg: Any) -> tuple[str, ...]:
        """``--flux_lora_target all+ffs+embedder+controlnet`` adds the ``all+ffs+embedder`` layers of the ControlNet's
        transformer blocks; any other preset trains the ``controlnet`` ones (SimpleTuner switches to it)."""
        if cfg.flux_lora_target == "all+ffs+embedder+controlnet":
            return self.lora_target_presets["all+ffs+embedder"] + CONTROLNET_TARGETS
        return CONTROLNET_TARGETS

    def controlnet_residuals(self, controlnet, control, args, kwargs):
        """FluxControlNetModel on the packed control latents: per-block residuals of both block lists."""
        hidden = kwargs["hidden_states"]
        names = ("encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance",
                 "joint_attention_kwargs")
        blocks, single = controlnet(hidden_states=hidden, controlnet_cond=pack_latents(control.to(hidden.dtype)),
                                    **{k: kwargs[k] for k in names if k in kwargs}, return_dict=False)
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single}

    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module, interval: int | None = None) -> None:
        from ...training.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(denoiser, interval)

    # ----- validation ------------------------------------------------------------------------
    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"image_encoder": None, "feature_extractor": None}

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """FluxPipeline's arguments: the training T5 length; real CFG only with ``--validation_guidance_real``."""
        kwargs = super().pipeline_call_kwargs(kwargs)
        kwargs.pop("guidance_rescale", None)
        kwargs["max_sequence_length"] = self.t5_max_length
        real = self.cfg.validation_guidance_real
        if real is not None and real > 1.0 and kwargs.get("negative_prompt") is not None:
            kwargs["true_cfg_scale"] = float(real)
        else:
            kwargs.pop("negative_prompt", None)
        return kwargs


KONTEXT = "kontext"


class FluxKontextFamily(FluxFamily):
    """FLUX.1 Kontext (``--model_flavour kontext``): image editing on conditioning datasets."""

    pipeline_class = "FluxKontextPipeline"
    controlnet_class_name = None  # diffusers has no Kontext ControlNet pipeline
    controlnet_pipeline_class = None

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        return cls

    def extra_tokens(self, batch: Any, device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's conditioning latents as Kontext reference tokens (:func:`reference_tokens`); a batch
        without them (e.g. an evaluation dataset) trains text-to-image, as the pipeline does without ``image``."""
        latents = getattr(batch, "conditioning_latents", None)
        if not latents:
            return None
        return reference_tokens(latents, device, dtype)

    def build_pipeline(self, **modules: Any) -> Any:
        """FluxKontextPipeline, whose reference image reaches the VAE in the VAE's own dtype.

        The pipeline casts the image to the text embeddings' dtype before ``vae.encode``; with a bf16
        transformer beside an fp32 VAE (kubetuner keeps the VAE in fp32) that fails in the first conv.
        """
        pipeline = super().build_pipeline(**modules)
        encode = pipeline._encode_vae_image

        def encode_in_vae_dtype(image: torch.Tensor, generator: Any) -> torch.Tensor:
            return encode(image.to(pipeline.vae.dtype), generator).to(image.dtype)

        pipeline._encode_vae_image = encode_in_vae_dtype
        return pipeline

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """FluxKontextPipeline's arguments: the conditioning image as given (at its training size, no snapping
        to Kontext's preferred resolutions), one image per call, and the output at the asked size (the pipeline
        otherwise rescales it to ``max_area``, one megapixel)."""
        kwargs = super().pipeline_call_kwargs(kwargs)
        if isinstance(kwargs.get("image"), list):
            kwargs["image"] = kwargs["image"][0]
        kwargs["_auto_resize"] = False
        if kwargs.get("width") and kwargs.get("height"):
            kwargs["max_area"] = int(kwargs["width"]) * int(kwargs["height"])
        return kwargs


FAMILY = FluxFamily
