"""HiDream-I1: four text encoders and a sparse mixture-of-experts diffusion transformer, trained with rectified flow.

Conditioning is what ``HiDreamImagePipeline.encode_prompt`` returns (the pipeline is called for it):

* ``pooled_prompt_embeds [B, d_l + d_g]`` — the projected pooled outputs of the two (long-context)
  CLIP encoders, concatenated;
* ``t5_prompt_embeds [B, L, d_t5]`` — T5's last hidden state (run with its attention mask);
* ``llama_prompt_embeds [B, n, L, d_llama]`` — the hidden states of Llama 3.1 after each decoder
  layer the transformer reads (its ``llama_layers``, each layer once, ascending): the transformer
  feeds one such layer to each block.

``L`` is ``--tokenizer_max_length`` (the pipeline's ``max_sequence_length``, 128 when unset); CLIP
gets ``min(L, 218)`` tokens, as in the pipeline. The transformer predicts the negated velocity
(the pipeline negates its output), so ``predict`` returns ``-output`` and the usual flow-matching
target ``ε − x₀`` applies. In training mode the transformer returns patch-major tokens
``[B, C, S, p²]``; they are put back into ``[B, C, H, W]`` here.

``--hidream_use_load_balancing_loss`` adds the experts' load-balancing term (DeepSeek-MoE's
``Σ Pᵢ·fᵢ`` per gate, summed over gates) times ``--hidream_load_balancing_loss_weight`` (unset:
diffusers' ``MoEGate`` default ``aux_loss_alpha``) to the loss; it is read from every gate with a
forward hook. Without the option the gates skip computing it.

Flavours and hub ids are SimpleTuner 3.1.6's; as there, the Llama encoder and its tokenizer come
from their own repository unless a local model folder holds ``text_encoder_4/``/``tokenizer_4/``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import ModelFamily

#: tokens per prompt when ``--tokenizer_max_length`` is unset (HiDreamImagePipeline's max_sequence_length)
HIDREAM_MAX_LENGTH = 128
#: the attention projections of every HiDream block (image stream; ``to_out`` is a plain Linear in diffusers)
ATTENTION = ("to_k", "to_q", "to_v", "to_out")
#: image-stream attention, patch embedding, final layer and timestep embedding (as SD3's slider targets)
SLIDER_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "x_embedder.proj",
                  "final_layer.linear", "t_embedder.timestep_embedder.linear_1",
                  "t_embedder.timestep_embedder.linear_2")
#: SimpleTuner's Llama 3.1 repository for HiDream (the HiDream repositories do not ship it)
LLAMA_REPOSITORY = "terminusresearch/HiDream-I1-Llama-3.1-8B-Instruct"


def text_length(cfg: Any) -> int:
    """``--tokenizer_max_length`` or :data:`HIDREAM_MAX_LENGTH`."""
    return int(getattr(cfg, "tokenizer_max_length", None) or HIDREAM_MAX_LENGTH)


def default_balance_weight() -> float:
    """diffusers' ``MoEGate`` default ``aux_loss_alpha`` (the weight HiDream's gates were built with)."""
    from diffusers.models.transformers.transformer_hidream_image import MoEGate

    return float(inspect.signature(MoEGate.__init__).parameters["aux_loss_alpha"].default)


def spatial(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Training-mode output ``[B, C, S, p²]`` (``S ≥ H/p·W/p`` patches, row-major, padded for non-square
    latents) → ``[B, C, H, W]``."""
    b, c = tokens.shape[:2]
    rows, cols = height // patch, width // patch
    grid = tokens[:, :, : rows * cols].reshape(b, c, rows, cols, patch, patch)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, height, width)


class HiDreamFamily(ModelFamily):
    family = "hidream"
    pipeline_class = "HiDreamImagePipeline"
    flavours = {
        "dev": "HiDream-ai/HiDream-I1-Dev",
        "full": "HiDream-ai/HiDream-I1-Full",
        "fast": "HiDream-ai/HiDream-I1-Fast",
    }
    default_flavour = "full"
    denoiser_name = "transformer"
    denoiser_class_name = "HiDreamImageTransformer2DModel"
    transformer_block_lists = ("double_stream_blocks", "single_stream_blocks")
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4")
    text_encoder_location_options = {"pretrained_t5_model_name_or_path": "text_encoder_3"}
    separate_sources = {"text_encoder_4": LLAMA_REPOSITORY, "tokenizer_4": LLAMA_REPOSITORY}
    prediction_types = ("flow_matching",)
    default_lora_targets = ATTENTION
    slider_lora_targets = SLIDER_TARGETS
    modelspec_architecture = "hidream-i1"
    swappable_validation_scheduler = False  # validation samples with the model's flow-matching scheduler

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import CLIPTextModelWithProjection, LlamaForCausalLM, T5EncoderModel

        return (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel, LlamaForCausalLM)

    @classmethod
    def tokenizer_classes(cls) -> tuple[type, ...]:
        from transformers import AutoTokenizer, CLIPTokenizer

        return (CLIPTokenizer, CLIPTokenizer, AutoTokenizer, AutoTokenizer)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        """A HiDream-I1-shaped pipeline: two long-context CLIPs with projections, T5, a 2-layer Llama,
        one double- and one single-stream MoE block (4 experts, 2 active), a 16-channel VAE."""
        from diffusers import (
            FlowMatchEulerDiscreteScheduler,
            HiDreamImagePipeline,
            HiDreamImageTransformer2DModel,
        )
        from transformers import (
            AutoTokenizer,
            CLIPTextConfig,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            LlamaConfig,
            LlamaForCausalLM,
            T5TokenizerFast,
        )

        from ..tiny import _tiny_flow_vae, tiny_t5_encoder, write_clip_tokenizer, write_t5_tokenizer
        from ..tiny_llm import write_fast_bpe_tokenizer

        folder = Path(folder)
        clip_positions = 248  # HiDream's CLIP encoders are long-context (the pipeline pads them to 218)
        for name in ("tokenizer", "tokenizer_2"):
            write_clip_tokenizer(folder / name, max_length=clip_positions)
        write_t5_tokenizer(folder / "tokenizer_3")
        ids = write_fast_bpe_tokenizer(folder / "tokenizer_4", bos="<|begin_of_text|>", eos="<|eot_id|>",
                                       model_max_length=131072)
        torch.manual_seed(seed)

        def clip() -> CLIPTextModelWithProjection:
            return CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=520, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=clip_positions, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                projection_dim=16))

        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(AutoTokenizer.from_pretrained(folder / "tokenizer_4")), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"]))
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(48, 48), llama_layers=[0, 1])
        pipe = HiDreamImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=_tiny_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE, as HiDream uses
            text_encoder=clip(), tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder_2=clip(), tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
            text_encoder_3=tiny_t5_encoder(32), tokenizer_3=T5TokenizerFast.from_pretrained(folder / "tokenizer_3"),
            text_encoder_4=llama, tokenizer_4=AutoTokenizer.from_pretrained(folder / "tokenizer_4"),
            transformer=transformer,
        )
        pipe.save_pretrained(folder)
        return folder

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = []
        if cfg.train_text_encoder:
            problems.append(Problem("train_text_encoder", True, "HiDream's text encoders cannot be trained "
                                    "(HiDreamImagePipeline.load_lora_weights loads transformer LoRAs only)"))
        weight = getattr(cfg, "hidream_load_balancing_loss_weight", None)
        if weight is not None and weight < 0:
            problems.append(Problem("hidream_load_balancing_loss_weight", weight, "must be 0 or more"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = []
        if cfg.validation_noise_scheduler:
            warnings.append(Problem("validation_noise_scheduler", cfg.validation_noise_scheduler,
                                    "has no effect for HiDream: validation uses the model's flow-matching scheduler"))
        if getattr(cfg, "hidream_load_balancing_loss_weight", None) is not None and \
                not getattr(cfg, "hidream_use_load_balancing_loss", False):
            warnings.append(Problem("hidream_load_balancing_loss_weight", cfg.hidream_load_balancing_loss_weight,
                                    "has no effect without hidream_use_load_balancing_loss"))
        return warnings

    @classmethod
    def training_scheduler(cls, scheduler: Any, cfg: Any) -> Any:
        return scheduler

    def __init__(self, cfg: Any, components: Any, **kwargs: Any):
        self.balance_terms: list[torch.Tensor] = []  # filled by the gates' hooks during a forward pass
        super().__init__(cfg, components, **kwargs)
        self._watch_gates(components.denoiser)

    def make_objective(self) -> Any:
        from ...training.objectives import FlowMatchingObjective

        family = self

        class LoadBalancedFlowMatching(FlowMatchingObjective):
            """Flow matching plus the weighted load-balancing terms of the last forward pass (if enabled)."""

            def loss(self, cfg, pred, target, timesteps, mask=None):
                loss = super().loss(cfg, pred, target, timesteps, mask)
                terms, family.balance_terms = family.balance_terms, []
                if terms and family.balance_weight:
                    loss = loss + family.balance_weight * torch.stack([t.float() for t in terms]).sum()
                return loss

        return LoadBalancedFlowMatching(self.cfg, self.noise_scheduler.config)

    @property
    def balance_weight(self) -> float:
        """The load-balancing weight in effect (0 when the option is off)."""
        if not getattr(self.cfg, "hidream_use_load_balancing_loss", False):
            return 0.0
        weight = getattr(self.cfg, "hidream_load_balancing_loss_weight", None)
        return float(default_balance_weight() if weight is None else weight)

    def _watch_gates(self, denoiser: torch.nn.Module) -> None:
        """Gates compute the unweighted balance term only when it is used (``alpha`` 1, else 0) and a
        hook collects it."""
        from diffusers.models.transformers.transformer_hidream_image import MoEGate

        alpha = 1.0 if self.balance_weight else 0.0
        for module in denoiser.modules():
            if isinstance(module, MoEGate):
                module.alpha = alpha
                module.register_forward_hook(self._collect_balance_term)

    def _collect_balance_term(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if output[2] is not None:
            self.balance_terms.append(output[2])

    # ----- text ----------------------------------------------------------------------------
    def text_cache_identity(self) -> dict[str, Any]:
        return {"text_length": text_length(self.cfg), "llama_layers": self.llama_layers}

    @property
    def llama_layers(self) -> list[int]:
        """The Llama layers the transformer reads, each once, ascending."""
        return sorted(set(self.denoiser.config.llama_layers))

    def encode_text(self, prompts: Sequence[str], text_encoders=None) -> dict[str, torch.Tensor]:
        """Pooled CLIP, T5 and per-layer Llama states for ``prompts`` (see the module docstring)."""
        from diffusers import HiDreamImagePipeline

        encoders = list(text_encoders or self.text_encoders)
        parts: dict[str, Any] = {"scheduler": None, "vae": None, "transformer": None}
        for name, module in zip(self.text_encoder_names, encoders, strict=True):
            parts[name] = module
        parts.update(zip(self.tokenizer_names, self.tokenizers, strict=True))
        t5, _, llama, _, pooled, _ = HiDreamImagePipeline(**parts).encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=text_length(self.cfg))
        llama = llama[self.llama_layers].transpose(0, 1)  # [B, layers, L, D]
        return {"pooled_prompt_embeds": pooled, "t5_prompt_embeds": t5, "llama_prompt_embeds": llama}

    # ----- training ------------------------------------------------------------------------
    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        self.balance_terms = []  # drop what a recomputation (gradient checkpointing) left behind
        _, _, h, w = noisy_latents.shape
        dtype, device = noisy_latents.dtype, noisy_latents.device
        config = getattr(denoiser, "config", None) or self.denoiser.config
        patches, limit = (h // config.patch_size) * (w // config.patch_size), self.denoiser.max_seq
        if patches > limit:
            raise ValueError(f"a {h}×{w} latent has {patches} patches; HiDream's transformer takes at most {limit} "
                             f"(its max_resolution {list(config.max_resolution)} latents): lower the resolution")
        per_layer = text["llama_prompt_embeds"].to(device, dtype)
        llama: list[torch.Tensor | None] = [None] * (max(self.llama_layers) + 1)
        for index, layer in enumerate(self.llama_layers):
            llama[layer] = per_layer[:, index]
        out = denoiser(hidden_states=noisy_latents, timesteps=timesteps.to(dtype),
                       encoder_hidden_states_t5=text["t5_prompt_embeds"].to(device, dtype),
                       encoder_hidden_states_llama3=llama,
                       pooled_embeds=text["pooled_prompt_embeds"].to(device, dtype), return_dict=False)[0]
        if denoiser.training and not config.force_inference_output:
            out = spatial(out, h, w, config.patch_size)
        return -out  # HiDream predicts x₀ − ε (HiDreamImagePipeline negates it)

    # ----- validation ------------------------------------------------------------------------
    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """HiDreamImagePipeline's arguments: the trained text length; no guidance rescale."""
        kwargs = dict(kwargs)
        kwargs.pop("guidance_rescale", None)
        kwargs["max_sequence_length"] = text_length(self.cfg)
        return kwargs

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """ComfyUI reads HiDream LoRAs by their diffusers layer path under ``transformer.`` (its
        ``model_lora_keys_unet`` for HiDream), with kohya's ``lora_down``/``lora_up``/``alpha``."""
        return f"{module_name}.{module_path}"


FAMILY = HiDreamFamily
