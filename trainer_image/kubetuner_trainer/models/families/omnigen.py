"""OmniGen v1: one LLM-style transformer (Phi-3 layers) reads the prompt's tokens and the image latents together.

There is no text encoder: the conditioning is the token ids OmniGen's processor builds
(``OmniGenMultiModalProcessor.process_multi_modal_prompt``: the prompt inside OmniGen's
instruction template), left-padded to ``--tokenizer_max_length`` (512 when unset) with the
processor's pad id, plus their mask. For a batch, the columns that are padding in every sample
are dropped and OmniGen's collator builds the position ids and the attention mask (causal over the
text, bidirectional over the image) exactly as the pipeline does.

OmniGen's flow runs the other way round: ``t = 1`` is the clean image, the model sees
``x_t = t·x₀ + (1−t)·ε`` at timestep ``t`` in ``[0, 1]`` (its scheduler: ``invert_sigmas``, one
train timestep) and predicts ``x₀ − ε``. With the shared objective's ``σ = 1 − t``, ``predict``
feeds ``t = 1 − σ`` and returns the negated output, so the usual target ``ε − x₀`` applies.

diffusers' OmniGen transformer and pipeline carry no LoRA support; as for PixArt, subclasses add
diffusers' PEFT methods and its transformer-only LoRA loader, saved under the upstream class
names. diffusers' processor builds its image transforms with torchvision, which the trainer does
not install: without it, text-to-image works and input images are refused. ComfyUI has no OmniGen
v1 LoRA loader, so ``--lora_format comfyui`` is refused. The flavour is SimpleTuner 3.1.6's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import ModelFamily
from .pixart_sigma import _as_upstream

#: prompt tokens (template included) when ``--tokenizer_max_length`` is unset
OMNIGEN_MAX_LENGTH = 512
ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
#: self-attention, the output-image patch embedding, the output projection and the timestep embedding
SLIDER_TARGETS = ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v", "self_attn.to_out.0",
                  "patch_embedding.output_image_proj", "proj_out", "t_embedder.linear_1", "t_embedder.linear_2")
#: Phi-3's chat markers in OmniGen's instruction template (special tokens of its tokenizer)
TEMPLATE_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>", "<|diffusion|>")


def text_length(cfg: Any) -> int:
    """``--tokenizer_max_length`` or :data:`OMNIGEN_MAX_LENGTH`."""
    return int(getattr(cfg, "tokenizer_max_length", None) or OMNIGEN_MAX_LENGTH)


class _NoImageTransforms:
    """Stands in for ``torchvision.transforms`` in diffusers' OmniGen processor when torchvision is absent:
    the processor is built, and only processing an input image fails (with this message)."""

    class Compose:
        def __init__(self, steps: Any):
            pass

        def __call__(self, image: Any) -> Any:
            raise ValueError("OmniGen input images need torchvision, which this trainer does not install; "
                             "kubetuner trains and validates OmniGen text-to-image")

    @staticmethod
    def Lambda(function: Any) -> Any:
        return function

    @staticmethod
    def ToTensor() -> None:
        return None

    @staticmethod
    def Normalize(**kwargs: Any) -> None:
        return None


def _processor_module() -> Any:
    """diffusers' OmniGen processor module, usable without torchvision (the pipeline module imports the
    processor only when torchvision is installed; without it both get what they need from here)."""
    from diffusers.pipelines.omnigen import pipeline_omnigen, processor_omnigen

    if not hasattr(processor_omnigen, "transforms"):  # torchvision missing
        processor_omnigen.transforms = _NoImageTransforms
    if not hasattr(pipeline_omnigen, "OmniGenMultiModalProcessor"):
        pipeline_omnigen.OmniGenMultiModalProcessor = processor_omnigen.OmniGenMultiModalProcessor
    return processor_omnigen


@cache
def peft_transformer_class() -> type:
    """``OmniGenTransformer2DModel`` with diffusers' PEFT methods; saved files name the upstream class."""
    from diffusers import OmniGenTransformer2DModel
    from diffusers.loaders import PeftAdapterMixin

    class PeftOmniGenTransformer2DModel(OmniGenTransformer2DModel, PeftAdapterMixin):
        """OmniGen's transformer with LoRA support."""

    return _as_upstream(PeftOmniGenTransformer2DModel, OmniGenTransformer2DModel)


@cache
def lora_pipeline_class() -> type:
    """``OmniGenPipeline`` with diffusers' transformer-only LoRA loader (``load_lora_weights``)."""
    from diffusers import OmniGenPipeline
    from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

    _processor_module()

    class OmniGenLoraPipeline(OmniGenPipeline, SanaLoraLoaderMixin):
        """OmniGen plus ``load_lora_weights``/``save_lora_weights`` for ``transformer.*`` LoRA keys."""

    return _as_upstream(OmniGenLoraPipeline, OmniGenPipeline)


class OmniGenFamily(ModelFamily):
    family = "omnigen"
    pipeline_class = "OmniGenPipeline"
    flavours = {"v1": "Shitao/OmniGen-v1-diffusers"}
    default_flavour = "v1"
    denoiser_name = "transformer"
    denoiser_class_name = "OmniGenTransformer2DModel"
    transformer_block_lists = ("layers",)
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    text_encoder_names = ()
    tokenizer_names = ("tokenizer",)
    prediction_types = ("flow_matching",)
    default_lora_targets = ATTENTION
    slider_lora_targets = SLIDER_TARGETS
    modelspec_architecture = "omnigen-v1"
    swappable_validation_scheduler = False

    @classmethod
    def denoiser_class(cls) -> type:
        return peft_transformer_class()

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        return ()

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import AutoTokenizer

        return (AutoTokenizer,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        """An OmniGen-shaped pipeline: a 2-layer Phi-3-style transformer (su-scaled RoPE), a 4-channel 8×
        VAE, OmniGen's inverted one-step-scale scheduler, a local byte-level tokenizer with Phi-3's markers."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer

        from ..tiny_llm import write_fast_bpe_tokenizer

        folder = Path(folder)
        template = _processor_module().OmniGenMultiModalProcessor.add_prefix_instruction(None, "")
        ids = write_fast_bpe_tokenizer(folder / "tokenizer", bos="<s>", eos="<|endoftext|>", pad="</s>",
                                       extra=TEMPLATE_TOKENS, corpus=[template])
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        torch.manual_seed(seed)
        heads, hidden = 4, 32
        half = hidden // heads // 2
        transformer = peft_transformer_class()(
            in_channels=4, patch_size=2, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
            intermediate_size=48, num_layers=2, pad_token_id=ids["</s>"], vocab_size=len(tokenizer),
            max_position_embeddings=4096, original_max_position_embeddings=1024,
            rope_scaling={"short_factor": [1.0] * half, "long_factor": [1.0] * half, "type": "su"},
            pos_embed_max_size=32, time_step_dim=32)
        pipe = lora_pipeline_class()(
            # 8× like SDXL's VAE (OmniGen's processor counts 16-pixel image tokens), SDXL's latent scale
            transformer=transformer, vae=AutoencoderKL(
                latent_channels=4, block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8, sample_size=32,
                scaling_factor=0.13025),
            scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1),
            tokenizer=tokenizer)
        pipe.save_pretrained(folder)
        return folder

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", True, "OmniGen has no separate text encoder (its "
                                                                "transformer reads the tokens); leave it off"))
        if cfg.lora_format == "comfyui":
            problems.append(Problem("lora_format", "comfyui", "ComfyUI has no OmniGen v1 model (only OmniGen 2), hence no LoRA loader for it; use diffusers"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        if cfg.validation_noise_scheduler:
            return [Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                            "has no effect for OmniGen: validation uses its own flow-matching scheduler")]
        return []

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        return FlowMatchingObjective(self.cfg, self.noise_scheduler.config)

    # ----- text ----------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        return {"text_length": text_length(self.cfg)}

    def _processor(self) -> Any:
        return _processor_module().OmniGenMultiModalProcessor(self.tokenizers[0])

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """``input_ids [B, L]`` (long) and ``attention_mask [B, L]``, left-padded as OmniGen's collator pads.

        Raises ValueError when a prompt needs more than ``--tokenizer_max_length`` tokens.
        """
        processor = self._processor()
        length = text_length(self.cfg)
        pad = processor.collator.pad_token_id
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = processor.process_multi_modal_prompt(prompt, None)["input_ids"]
            if len(tokens) > length:
                raise ValueError(f"a caption needs {len(tokens)} OmniGen tokens; raise tokenizer_max_length "
                                 f"(now {length}) or shorten it: {prompt[:80]!r}")
            ids[row, length - len(tokens):] = torch.tensor(tokens)
            mask[row, length - len(tokens):] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    # ----- training ------------------------------------------------------------------------
    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

        b, _, h, w = noisy_latents.shape
        config = getattr(denoiser, "config", None) or self.denoiser.config
        ids, mask = text["input_ids"].long(), text["attention_mask"].long().cpu()
        keep = int(mask.sum(dim=1).max())  # the batch's longest prompt; the rest is padding everywhere
        ids, mask = ids[:, -keep:], mask[:, -keep:]
        image_tokens = [(h // config.patch_size) * (w // config.patch_size)] * b
        collator = OmniGenCollator()
        positions = collator.create_position(mask, image_tokens)
        attention, _ = collator.create_mask(mask, image_tokens)
        device, dtype = noisy_latents.device, noisy_latents.dtype
        t = 1.0 - timesteps.to(device, dtype) / 1000.0  # OmniGen's t: 1 is the clean image
        out = denoiser(hidden_states=noisy_latents, timestep=t, input_ids=ids.to(device), input_img_latents=[],
                       input_image_sizes={}, attention_mask=attention.to(device), position_ids=positions.to(device),
                       return_dict=False)[0]
        return -out  # OmniGen predicts x₀ − ε

    # ----- validation ------------------------------------------------------------------------
    def build_pipeline(self, *, denoiser=None, text_encoders=None, scheduler=None):
        comps = self.pipeline_components(denoiser=denoiser, text_encoders=text_encoders)
        if scheduler is not None:
            comps["scheduler"] = scheduler
        return lora_pipeline_class()(**comps)

    @classmethod
    def lora_loader_class(cls):
        return lora_pipeline_class()

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """OmniGenPipeline's arguments: its own negative prompt and CFG; no guidance rescale."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        kwargs.pop("negative_prompt", None)
        return kwargs


FAMILY = OmniGenFamily
