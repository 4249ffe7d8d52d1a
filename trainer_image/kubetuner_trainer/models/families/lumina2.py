"""Lumina Image 2.0: a DiT on Gemma 2's penultimate hidden states (with their mask), rectified flow
in Lumina's reversed time, Flux's 16-channel VAE.

Conditioning as ``Lumina2Pipeline.encode_prompt``: each caption is prefixed with the pipeline's
system prompt and ``" <Prompt Start> "``, padded to ``--tokenizer_max_length`` tokens (256 by
default; SimpleTuner cuts values above 512 to 512), and encoded with the token mask; the
transformer gets the second-to-last hidden states and the mask. Lumina's transformer runs time the
other way: it is given ``t = 1 − σ`` (1 = clean image) and predicts ``x₀ − ε``, so the prediction
is negated into the velocity ``ε − x₀`` the flow objective compares with (as the pipeline negates
it before its scheduler step). ``--pretrained_gemma_model_name_or_path`` relocates Gemma.

``--lora_format comfyui`` writes ``diffusion_model.<layer>`` keys in the original Lumina 2 names, which ComfyUI's
Lumina2 model keeps; the q, k and v LoRAs become one LoRA on its fused ``attention.qkv`` (stacked, exact), so they
train together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ._text_transformer import ATTENTION_LORA_TARGETS, FlowTextTransformerFamily

#: Gemma tokens per prompt when --tokenizer_max_length is unset, and the most SimpleTuner allows
GEMMA_MAX_LENGTH = 256
GEMMA_LIMIT = 512
#: diffusers' Lumina 2 layer names → Alpha-VLLM's original ones (dot-separated segments, applied in order): the
#: names ComfyUI's Lumina2 model uses (comfy/ldm/lumina/model.py; q, k and v fused into ``attention.qkv``), the
#: inverse of the renames in diffusers' single-file converter ``convert_lumina2_to_diffusers``
ORIGINAL_LAYER_NAMES = (
    ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_caption_embed.caption_embedder", "cap_embedder"),
    ("attn", "attention"), ("to_out.0", "out"), ("to_q", "qkv"), ("to_k", "qkv"), ("to_v", "qkv"), ("to_qkv", "qkv"),
    ("feed_forward.linear_1", "feed_forward.w1"), ("feed_forward.linear_2", "feed_forward.w2"),
    ("feed_forward.linear_3", "feed_forward.w3"), ("norm1.linear", "adaLN_modulation.1"),
    ("norm_out.linear_1", "final_layer.adaLN_modulation.1"), ("norm_out.linear_2", "final_layer.linear"),
)
#: what Lumina2Pipeline puts between its system prompt and the user's prompt
PROMPT_START = " <Prompt Start> "


class Lumina2Family(FlowTextTransformerFamily):
    family = "lumina2"
    pipeline_class = "Lumina2Pipeline"
    # SimpleTuner 3.1.6's Lumina 2 flavours; 2.0 is its default
    flavours = {"2.0": "Alpha-VLLM/Lumina-Image-2.0", "neta-lumina": "terminusresearch/neta-lumina-v1"}
    default_flavour = "2.0"
    denoiser_class_name = "Lumina2Transformer2DModel"
    text_encoder_location_options = {"pretrained_gemma_model_name_or_path": "text_encoder"}
    default_lora_targets = ATTENTION_LORA_TARGETS + ("to_qkv",)  # to_qkv: fused checkpoints only
    slider_lora_targets = ATTENTION_LORA_TARGETS
    modelspec_architecture = "lumina-2"
    comfyui_loads_lora = True
    comfyui_prefixes = {"transformer": "diffusion_model"}
    comfyui_fused_parts = ("to_q", "to_k", "to_v")  # ComfyUI's Lumina 2 attention holds them as one qkv weight

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import Gemma2Model

        return (Gemma2Model,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_lumina2(folder, seed=seed)

    @classmethod
    def comfyui_key(cls, module_name: str, module_path: str, trained: Sequence[str]) -> str:
        """``diffusion_model.<layer>`` in Alpha-VLLM's original Lumina 2 names, which ComfyUI's Lumina2 model keeps
        (:data:`ORIGINAL_LAYER_NAMES`); ``to_q``/``to_k``/``to_v`` all name the fused ``attention.qkv``, which the
        export fills with one stacked LoRA."""
        path = f".{module_path}."
        for diffusers_name, original in ORIGINAL_LAYER_NAMES:
            path = path.replace(f".{diffusers_name}.", f".{original}.")
        return f"{cls.comfyui_prefixes[module_name]}.{path[1:-1]}"

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        """ComfyUI's fused ``attention.qkv`` takes q, k and v trained together, as plain LoRA."""
        problems = super().config_problems(cfg)
        if cfg.lora_format != "comfyui" or cfg.model_type != "lora":
            return problems
        from ...training.lora import parse_target_modules

        try:
            named = {t.rsplit(".", 1)[-1] for t in parse_target_modules(cfg.peft_lora_target_modules, ())}
        except ValueError:
            return problems  # preflight reports the malformed list itself
        fused = set(cls.comfyui_fused_parts)
        if named & fused and not fused <= named:
            problems.append(Problem("peft_lora_target_modules", cfg.peft_lora_target_modules,
                                    "with lora_format=comfyui, name to_q, to_k and to_v together: ComfyUI's Lumina 2 "
                                    "holds them as one fused attention.qkv weight"))
        if cfg.use_dora:
            problems.append(Problem("use_dora", True, "has no ComfyUI form for Lumina 2's fused attention.qkv; use "
                                                      "lora_format=diffusers"))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = super().config_warnings(cfg)
        if (cfg.tokenizer_max_length or 0) > GEMMA_LIMIT:
            warnings.append(Problem("tokenizer_max_length", cfg.tokenizer_max_length,
                                    f"is cut to {GEMMA_LIMIT}, Lumina 2's longest prompt (as SimpleTuner does)"))
        return warnings

    @property
    def max_sequence_length(self) -> int:
        return min(int(self.cfg.tokenizer_max_length or GEMMA_MAX_LENGTH), GEMMA_LIMIT)

    @cached_property
    def system_prompt(self) -> str:
        """The system prompt ``Lumina2Pipeline`` prefixes to every prompt (read from the pipeline)."""
        return self.build_pipeline().system_prompt

    def text_cache_identity(self) -> dict[str, Any]:
        return {**super().text_cache_identity(), "system_prompt": self.system_prompt}

    def tokenize(self, prompts, max_length):
        return super().tokenize([self.system_prompt + PROMPT_START + p for p in prompts], max_length)

    def run_text_encoder(self, encoder, ids, mask):
        """Gemma's second-to-last hidden states ``[B, L, D]``."""
        return encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """The velocity ``ε − x₀`` ``[B, 16, h, w]``: the transformer sees ``1 − σ`` and predicts ``x₀ − ε``."""
        embeds, mask = self.text_inputs(text, noisy_latents)
        lumina_time = (1.0 - timesteps / 1000.0).to(noisy_latents.device, noisy_latents.dtype)
        out = denoiser(hidden_states=noisy_latents, timestep=lumina_time, encoder_hidden_states=embeds,
                       encoder_attention_mask=mask, return_dict=False)[0]
        return -out


def write_gemma_tokenizer(folder: Path) -> None:
    """A Gemma tokenizer (``<bos>`` first, right padding) over single characters with and without ``▁``."""
    import string

    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for token in ["\u2581" + c for c in chars] + list(chars) + ["\n"]:
        vocab.setdefault(token, len(vocab))
    GemmaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True, padding_side="right").save_pretrained(folder)


def tiny_gemma2(hidden_size: int = 32):
    """A two-layer ``Gemma2Model`` whose vocabulary fits :func:`write_gemma_tokenizer`."""
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=256, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2))


def tiny_lumina2_transformer_config(cap_feat_dim: int = 32) -> dict[str, Any]:
    """Two blocks and one refiner of each kind, 16-channel latents, rotary axes summing to the head size."""
    return dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
                num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
                axes_lens=(1024, 64, 64), cap_feat_dim=cap_feat_dim)


def tiny_flux_vae_8x():
    """A 16-channel VAE with Flux's shift and scale that downsamples 8× (Lumina2Pipeline assumes 8×)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.3611,
                         shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_lumina2(folder: Path, *, seed: int = 0) -> Path:
    """A Lumina-2-shaped pipeline folder: Gemma 2 with its tokenizer, the DiT, an 8× 16-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel

    from ..tiny import _add_index, _save

    torch.manual_seed(seed)
    folder = _save(folder, "Lumina2Pipeline", {
        "transformer": Lumina2Transformer2DModel(**tiny_lumina2_transformer_config()),
        "vae": tiny_flux_vae_8x(), "text_encoder": tiny_gemma2(32),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0),
    })
    write_gemma_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "GemmaTokenizerFast")
    return folder


FAMILY = Lumina2Family
