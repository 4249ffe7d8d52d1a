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

Flavours and hub ids are SimpleTuner 3.1.6's: ``v1.0`` (text-to-image) and the edit flavours
``edit-v1`` (Qwen-Image-Edit, :class:`QwenImageEditFamily`) and ``edit-v2`` (Qwen-Image-Edit-2509, several
reference images, :class:`QwenImageEditPlusFamily`); see the edit classes for what differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...config import Problem
from ..family import DiffusersClass, ModelFamily
from .flux import pack_latents, unpack_latents

#: text tokens per prompt when ``--tokenizer_max_length`` is unset (QwenImagePipeline's max_sequence_length)
QWEN_MAX_LENGTH = 512
#: the most the pipeline accepts (QwenImagePipeline.check_inputs)
QWEN_LIMIT = 1024
ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
#: image-stream attention, patch embedding, output projection and timestep embedding (as SD3's sliders)
SLIDER_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_in", "proj_out",
                  "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")
#: pixels of the image Qwen2.5-VL reads in QwenImageEditPipeline (its ``__call__`` resizes to this area)
EDIT_PROMPT_IMAGE_AREA = 1024 * 1024
#: edge of the black image an edit prompt without a reference image is read with (SimpleTuner's dummy image)
BLANK_REFERENCE_SIZE = 224
#: the tiny edit models' processor reads images of at most this many pixels (a few vision patches)
TINY_PROCESSOR_PIXELS = 112 * 112
#: the conditioning_type values the edit flavours read (reference images; SimpleTuner refuses the others)
REFERENCE_TYPES = ("reference_strict", "reference_loose")
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


def _pipeline_class_name(location: str) -> str | None:
    """``_class_name`` of a local diffusers folder's ``model_index.json`` (None: not a readable local folder)."""
    try:
        return json.loads((Path(location) / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _tiny_components(folder: Path, templates: Sequence[str], seed: int) -> dict[str, Any]:
    """The tiny Qwen-Image components (see :meth:`QwenImageFamily.build_tiny`); the tokenizer is learnt from
    ``templates`` so that the pipelines' prompt templates split as with Qwen's tokenizer."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from ..tiny_llm import write_qwen2_tokenizer

    ids = write_qwen2_tokenizer(folder / "tokenizer", templates)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"]))
    return dict(
        transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                attention_head_dim=16, num_attention_heads=2,
                                                joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                   temperal_downsample=[False, True]),
        # Qwen-Image's scheduler settings (dynamic exponential shift, terminal 0.02)
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True),
        text_encoder=encoder, tokenizer=tokenizer,
    )


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
    qkv_fusion = False  # its attention processor calls the separate projections
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    vae_class = DiffusersClass("AutoencoderKLQwenImage")
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    prediction_types = ("flow_matching",)
    default_lora_targets = ATTENTION
    slider_lora_targets = SLIDER_TARGETS
    modelspec_architecture = "qwen-image"
    swappable_validation_scheduler = False  # validation samples with the model's FlowMatchEulerDiscreteScheduler
    controlnet_class_name = "QwenImageControlNetModel"
    controlnet_pipeline_class = "QwenImageControlNetPipeline"
    controlnet_constructor = "from_transformer"
    controlnet_input = "latents"
    controlnet_image_argument = "control_image"
    #: the ControlNet's zero-initialised input embedder and per-block output projections
    controlnet_lora_targets = ("controlnet_x_embedder", *(f"controlnet_blocks.{i}" for i in range(64)))

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
        from diffusers import QwenImagePipeline

        template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
        QwenImagePipeline(**_tiny_components(folder, [template], seed)).save_pretrained(folder)
        return folder

    # ----- flavour layouts (the edit classes are chosen by flavour) ----------------------------
    #: reference images one sample reads: 0 for text-to-image, 1 for Qwen-Image-Edit, None: any number
    reference_images: ClassVar[int | None] = 0

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        """The edit class of an edit flavour; no flavour named, the one whose hub id or (local folder)
        ``model_index.json`` pipeline class ``location`` names; else text-to-image."""
        layouts = {"edit-v1": QwenImageEditFamily, "edit-v2": QwenImageEditPlusFamily}
        if not flavour and location:
            flavour = next((name for name, hub in cls.flavours.items() if hub == location), None)
            if flavour is None:
                pipeline = _pipeline_class_name(location)
                flavour = next((name for name, layout in layouts.items() if layout.pipeline_class == pipeline), None)
        return layouts.get(flavour or "", QwenImageFamily)

    @classmethod
    def edits(cls, cfg: Any) -> bool:
        """Whether ``cfg`` trains an edit flavour (paired reference images)."""
        return cls.for_flavour(cfg.model_flavour, cfg.pretrained_model_name_or_path).reference_images != 0

    @classmethod
    def requires_conditioning(cls, cfg: Any) -> bool:
        """The edit flavours train on paired reference images: a conditioning dataset is required (as for a
        ControlNet, the default's case)."""
        return cls.edits(cfg) or super().requires_conditioning(cfg)

    @classmethod
    def conditioning_types(cls, cfg: Any) -> tuple[str, ...] | None:
        """Reference images only for the edit flavours (SimpleTuner's rule); else the default's."""
        return REFERENCE_TYPES if cls.edits(cfg) else super().conditioning_types(cfg)

    @classmethod
    def text_uses_conditioning_images(cls, cfg: Any) -> bool:
        """The edit prompts are encoded together with the reference images (Qwen2.5-VL sees them)."""
        return cls.edits(cfg) or super().text_uses_conditioning_images(cfg)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
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

    # ----- ControlNet ---------------------------------------------------------------------------
    @classmethod
    def controlnet_init_kwargs(cls, components: Any) -> dict[str, Any]:
        """The transformer's own head layout (``from_transformer`` would otherwise assume Qwen-Image's 24 × 128)."""
        config = components.denoiser.config
        return {"attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_attention_heads}

    def controlnet_residuals(self, controlnet, control, args, kwargs):
        """QwenImageControlNetModel on the packed control latents (normalised like the targets, as
        QwenImageControlNetPipeline encodes its control image): one residual per transformer block."""
        hidden = kwargs["hidden_states"]
        names = ("encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes")
        samples = controlnet(hidden_states=hidden, controlnet_cond=pack_latents(control.to(hidden.dtype)),
                             **{k: kwargs[k] for k in names}, return_dict=False)
        return {"controlnet_block_samples": samples}

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


@cache
def _image_only_processor_class() -> type:
    """``Qwen2VLProcessor`` without its video processor: transformers' video processor needs torchvision,
    which the trainer does not install (its PyPI wheel links CUDA); the edit pipelines pass images only."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def load_processor(cfg: Any, components: Any) -> Any:
    """The edit pipelines' Qwen2-VL processor: the image processor of the model's ``processor/`` folder (the
    PIL implementation, which needs no torchvision) with the loaded tokenizer (the same files in Qwen's repos).

    Raises :class:`~kubetuner_trainer.config.ConfigError` naming ``pretrained_model_name_or_path`` when the
    folder or hub id has no ``processor/``.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..loading import MODEL_OPTION, load_part

    src = components.source
    images = load_part(Qwen2VLImageProcessorPil, src.model, src, subfolder="processor", option=MODEL_OPTION,
                       what="a Qwen-Image-Edit pipeline folder (with processor/)", use_variant=False)
    return _image_only_processor_class()(image_processor=images, tokenizer=components.tokenizers[0])


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit (``edit-v1``): one reference image per sample, from a conditioning dataset.

    * Text: Qwen2.5-VL reads the caption together with the reference image, through the pipeline's own
      ``encode_prompt`` with its edit template and drop index; the image is first resized as the pipeline
      resizes its prompt image (``calculate_dimensions`` to :data:`EDIT_PROMPT_IMAGE_AREA`, 32-px multiples;
      the processor then applies its own pixel limits). The embedding therefore depends on the image: the
      data pipeline keys its text cache on (caption, reference files) (``text_uses_conditioning_images``)
      and encodes once, before training; SimpleTuner's edit-v1 caches per file the same way (its edit-v2
      re-encodes every step, which gives the same tensors at a much higher cost). Rows carry the image's
      vision tokens plus ``--tokenizer_max_length`` text tokens (longer captions are cut there, as the
      text-to-image pipeline cuts them), zero-padded with a mask.
    * Denoiser: the reference latents (cached like the targets, normalised the same way) are packed 2×2
      and appended to the noisy target tokens; ``img_shapes`` lists the target's grid, then each
      reference's, as the pipelines do. The prediction is cut back to the target tokens, so the loss covers
      the target only (SimpleTuner and the pipelines slice the same way).
    * Validation: ``QwenImageEditPipeline`` with the validation sample's reference image; LoRA files are the
      text-to-image family's (the same transformer; ComfyUI loads Qwen-Image-Edit LoRAs by the same keys).
    """

    pipeline_class = "QwenImageEditPipeline"
    modelspec_architecture = "qwen-image-edit"
    reference_images = 1
    controlnet_class_name = None  # diffusers' Qwen-Image ControlNet pipeline is text-to-image only
    controlnet_pipeline_class = None

    @classmethod
    def for_flavour(cls, flavour: str | None, location: str | None = None) -> type[ModelFamily]:
        return cls

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        """The tiny Qwen-Image pipeline (:meth:`QwenImageFamily.build_tiny`) as this flavour's edit pipeline,
        with a ``processor/`` folder as Qwen's edit repositories ship (an image processor capped at
        :data:`TINY_PROCESSOR_PIXELS` so the tiny vision tower sees a few patches)."""
        import diffusers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pipeline_class = getattr(diffusers, cls.pipeline_class)
        templates = [diffusers.QwenImagePipeline(None, None, None, None, None).prompt_template_encode,
                     pipeline_class(None, None, None, None, None, None).prompt_template_encode]
        components = _tiny_components(folder, templates, seed)
        diffusers.QwenImagePipeline(**components).save_pretrained(folder)
        processor = folder / "processor"
        Qwen2VLImageProcessorPil(min_pixels=TINY_PROCESSOR_PIXELS // 4,
                                 max_pixels=TINY_PROCESSOR_PIXELS).save_pretrained(processor)
        components["tokenizer"].save_pretrained(processor)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index.update(_class_name=cls.pipeline_class, processor=["transformers", "Qwen2VLProcessor"])
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, cfg: Any, *, device: torch.device | str = "cpu",
             weight_dtype: torch.dtype = torch.float32) -> ModelFamily:
        """The text-to-image components plus the edit pipeline's ``processor``."""
        family = super().load(cfg, device=device, weight_dtype=weight_dtype)
        family.components.extra["processor"] = load_processor(cfg, family.components)
        return family

    def extra_pipeline_components(self) -> dict[str, Any]:
        return {"processor": self.components.extra["processor"]}

    def text_cache_identity(self) -> dict[str, Any]:
        return {**super().text_cache_identity(), "pipeline": self.pipeline_class}

    # ----- text ----------------------------------------------------------------------------
    def _text_pipeline(self, encoder: torch.nn.Module) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class)(
            scheduler=None, vae=None, text_encoder=encoder, tokenizer=self.tokenizers[0],
            processor=self.components.extra["processor"], transformer=None)

    def prompt_image(self, pipe: Any, image: torch.Tensor) -> Any:
        """A reference image ``[3, H, W]`` in ``[-1, 1]`` → the PIL image the pipeline hands Qwen2.5-VL
        (resized to the pipeline's prompt-image area, aspect kept, edges in multiples of 32)."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

        picture = pipe.image_processor.postprocess(image[None].float().cpu(), output_type="pil")[0]
        width, height = pipeline_qwenimage_edit.calculate_dimensions(self.prompt_image_area(),
                                                                      picture.width / picture.height)[:2]
        return pipe.image_processor.resize(picture, int(height), int(width))

    @classmethod
    def prompt_image_area(cls) -> int:
        """Pixels of the image Qwen2.5-VL reads (:data:`EDIT_PROMPT_IMAGE_AREA`)."""
        return EDIT_PROMPT_IMAGE_AREA

    def _vision_tokens(self, pictures: Sequence[Any]) -> int:
        processor = self.components.extra["processor"].image_processor
        patches = sum(processor.get_number_of_image_patches(p.height, p.width) for p in pictures)
        return patches // processor.merge_size**2

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """Captions with no reference image of their own read with a black :data:`BLANK_REFERENCE_SIZE` image,
        SimpleTuner's stand-in for edit prompts without one; training reads :meth:`encode_text_with_images`."""
        blank = torch.full((3, BLANK_REFERENCE_SIZE, BLANK_REFERENCE_SIZE), -1.0)
        return self._encode(prompts, [[blank] for _ in prompts], text_encoders)

    def encode_text_with_images(self, prompts: Sequence[str], images: Sequence[Sequence[torch.Tensor]],
                                text_encoders=None) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, L, D]`` and ``attention_mask [B, L]`` of each caption read with its reference
        images (``images[i]``: one ``[3, H, W]`` tensor in ``[-1, 1]`` per conditioning slot; Qwen-Image-Edit
        reads the first). ``L`` = the longest row's vision tokens + ``--tokenizer_max_length``.

        Raises ``ValueError`` when a caption has no reference image.
        """
        if any(not refs for refs in images):
            raise ValueError(f"{self.pipeline_class} encodes each caption with its reference image; one has none")
        return self._encode(prompts, images, text_encoders)

    def _encode(self, prompts: Sequence[str], images: Sequence[Sequence[torch.Tensor]],
                text_encoders) -> dict[str, torch.Tensor]:
        encoder = (text_encoders or self.text_encoders)[0]
        pipe = self._text_pipeline(encoder)
        rows, lengths = [], []
        for prompt, refs in zip(prompts, images, strict=True):
            pictures = [self.prompt_image(pipe, r) for r in list(refs)[:self.reference_images]]
            embeds, _ = pipe.encode_prompt([prompt], image=pictures or None, device=self.device)
            lengths.append(self._vision_tokens(pictures) + text_length(self.cfg))
            rows.append(embeds[0, :lengths[-1]])
        padded = [pad_tokens(row[None], None, max(lengths)) for row in rows]
        return {"prompt_embeds": torch.cat([e for e, _ in padded]), "attention_mask": torch.cat([m for _, m in padded])}

    # ----- training ------------------------------------------------------------------------
    def reference_latents(self, batch: Any) -> list[torch.Tensor]:
        """The batch's reference latents, one ``[B, C, h, w]`` per conditioning slot this flavour reads.

        Raises ``ValueError`` when the batch carries none (a dataset without a conditioning link).
        """
        slots = list(getattr(batch, "conditioning_latents", None) or [])
        if not slots:
            raise ValueError(f"model_flavour {self.cfg.model_flavour or 'edit'} trains on reference images, but the "
                             "batch has no conditioning latents: link a conditioning dataset (conditioning_data)")
        return slots[:self.reference_images] if self.reference_images else slots

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        b, _, h, w = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        references = [r.to(device, dtype) for r in self.reference_latents(batch)]
        tokens = torch.cat([pack_latents(noisy_latents)] + [pack_latents(r) for r in references], dim=1)
        shapes = [(1, h // 2, w // 2)] + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references]
        out = denoiser(
            hidden_states=tokens, timestep=timesteps.to(dtype) / 1000.0,
            encoder_hidden_states=text["prompt_embeds"].to(device, dtype),
            encoder_hidden_states_mask=text["attention_mask"].to(device),
            img_shapes=[shapes] * b, return_dict=False,
        )[0]
        return unpack_latents(out[:, :(h // 2) * (w // 2)], h, w)

    # ----- validation ------------------------------------------------------------------------
    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The text-to-image arguments plus the validation sample's reference ``image`` (Qwen-Image-Edit: the
        first of several). Raises ``ValueError`` without one: edit validation renders dataset samples."""
        kwargs = super().pipeline_call_kwargs(kwargs)
        image = kwargs.get("image")
        if image is None or (isinstance(image, list) and not image):
            raise ValueError(f"{self.pipeline_class} renders from a reference image; validation prompts without "
                             "one (no conditioning dataset sample) cannot be rendered")
        if isinstance(image, list) and self.reference_images:
            kwargs["image"] = image[0] if self.reference_images == 1 else image[:self.reference_images]
        return kwargs


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-2509 (``edit-v2``): any number of reference images per sample, one per conditioning slot
    (``--conditioning_multidataset_sampling combined`` gives several), each named "Picture N" in the prompt
    and read at the pipeline's ``CONDITION_IMAGE_SIZE``; otherwise as :class:`QwenImageEditFamily`."""

    pipeline_class = "QwenImageEditPlusPipeline"
    modelspec_architecture = "qwen-image-edit-plus"
    reference_images = None

    @classmethod
    def prompt_image_area(cls) -> int:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

        return CONDITION_IMAGE_SIZE


FAMILY = QwenImageFamily
