"""AuraFlow: an MMDiT on UMT5 (Pile-T5) hidden states, rectified flow, SDXL's 4-channel VAE.

Conditioning as ``AuraFlowPipeline.encode_prompt``: tokens padded to ``--tokenizer_max_length``
(SimpleTuner's AuraFlow default 120, 768 for the pony flavour; longer values are cut back to that
unless ``--i_know_what_i_am_doing``, as SimpleTuner does), the encoder run with the token mask and
the padding states zeroed by it. The transformer takes no mask. It sees the flow time ``σ`` in
``[0, 1]`` (1 = noise), i.e. the objective's timestep divided by 1000, and predicts the velocity.
LoRA files use diffusers names, which ``AuraFlowPipeline.load_lora_weights`` and ComfyUI's AuraFlow
rule read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import RoutedTokens
from ._text_transformer import ATTENTION_LORA_TARGETS, FlowTextTransformerFamily

#: SimpleTuner's AuraFlow prompt lengths: the default and the longest it trains without i_know_what_i_am_doing
T5_MAX_LENGTH = 120
PONY_T5_MAX_LENGTH = 768
JOINT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class AuraFlowFamily(FlowTextTransformerFamily):
    family = "auraflow"
    pipeline_class = "AuraFlowPipeline"
    # SimpleTuner 3.1.6's AuraFlow flavours; v0.3 is its default
    flavours = {
        "pony": "purplesmartai/pony-v7-base",
        "v0.3": "terminusresearch/auraflow-v0.3",
        "v0.2": "fal/AuraFlow-v0.2",
        "v0.1": "fal/AuraFlow",
    }
    default_flavour = "v0.3"
    denoiser_class_name = "AuraFlowTransformer2DModel"
    transformer_block_lists = ("joint_transformer_blocks", "single_transformer_blocks")
    #: joint blocks return ``(encoder_hidden_states, hidden_states)``; single blocks carry
    #: ``[registers + text | image]`` in one sequence
    routed_tokens = (RoutedTokens(output=1), RoutedTokens(trailing=True))
    text_encoder_location_options = {"pretrained_t5_model_name_or_path": "text_encoder"}
    # SimpleTuner's AuraFlow targets: both streams' attention (to_qkv exists only in fused checkpoints)
    default_lora_targets = ATTENTION_LORA_TARGETS + JOINT_ATTENTION + ("to_qkv",)
    slider_lora_targets = ATTENTION_LORA_TARGETS
    modelspec_architecture = "auraflow"
    comfyui_loads_lora = True

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import UMT5EncoderModel

        return (UMT5EncoderModel,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_auraflow(folder, seed=seed)

    @staticmethod
    def length_limit(cfg: Any) -> int:
        """The longest prompt SimpleTuner trains AuraFlow on (and its default length)."""
        return PONY_T5_MAX_LENGTH if cfg.model_flavour == "pony" else T5_MAX_LENGTH

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        warnings = super().config_warnings(cfg)
        limit = cls.length_limit(cfg)
        if (cfg.tokenizer_max_length or 0) > limit and not getattr(cfg, "i_know_what_i_am_doing", False):
            warnings.append(Problem("tokenizer_max_length", cfg.tokenizer_max_length,
                                    f"is cut to {limit} for AuraFlow (as SimpleTuner does); set "
                                    "i_know_what_i_am_doing to train longer prompts"))
        return warnings

    @property
    def max_sequence_length(self) -> int:
        limit = self.length_limit(self.cfg)
        asked = int(self.cfg.tokenizer_max_length or limit)
        return asked if asked <= limit or getattr(self.cfg, "i_know_what_i_am_doing", False) else limit

    def run_text_encoder(self, encoder, ids, mask):
        """Hidden states with the padding positions zeroed (``AuraFlowPipeline.encode_prompt``)."""
        embeds = encoder(ids, attention_mask=mask)[0]
        return embeds * mask.unsqueeze(-1).to(embeds.dtype)

    def image_token_count(self, arguments: Any) -> int:
        """Patches of the latents ``[B, C, h, w]`` the transformer was called with."""
        patch = self.denoiser.config.patch_size
        height, width = arguments["hidden_states"].shape[-2:]
        return (height // patch) * (width // patch)

    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """The velocity ``[B, 4, h, w]``; the transformer takes ``σ = timestep / 1000``."""
        embeds, _ = self.text_inputs(text, noisy_latents)
        sigma = (timesteps / 1000.0).to(noisy_latents.device, noisy_latents.dtype)
        return denoiser(noisy_latents, encoder_hidden_states=embeds, timestep=sigma, return_dict=False)[0]


def tiny_auraflow_transformer_config(joint_attention_dim: int = 32) -> dict[str, Any]:
    """One joint and one single block; positions for latents up to 64×64."""
    return dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                caption_projection_dim=16, out_channels=4, pos_embed_max_size=1024)


def tiny_umt5_encoder(d_model: int = 32):
    """A two-layer ``UMT5EncoderModel`` whose vocabulary fits the tiny T5 tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=200, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
                                       eos_token_id=1, decoder_start_token_id=0))


def build_tiny_auraflow(folder: Path, *, seed: int = 0) -> Path:
    """An AuraFlow-shaped pipeline folder: UMT5 with a SentencePiece-style tokenizer, the MMDiT, a 4-channel VAE."""
    from diffusers import AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from ..tiny import _add_index, _save, _tiny_vae, write_t5_tokenizer

    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(**tiny_auraflow_transformer_config())
    with torch.no_grad():  # freshly initialised adaLN modulations almost close every gate (trained ones do not)
        for name, param in transformer.named_parameters():
            if name.endswith((".norm1.linear.weight", ".norm1_context.linear.weight")):
                param.mul_(10.0)
    vae = _tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)  # AuraFlow uses SDXL's VAE
    folder = _save(folder, "AuraFlowPipeline", {
        "transformer": transformer,
        "vae": vae, "text_encoder": tiny_umt5_encoder(32),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.73),
    })
    write_t5_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "T5TokenizerFast")
    return folder


FAMILY = AuraFlowFamily
