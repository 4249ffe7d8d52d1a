"""Sana: a linear-attention DiT on Gemma 2 hidden states (with their mask), rectified flow, the DC-AE.

Conditioning as ``SanaPipeline.encode_prompt``: the complex human instruction (its lines joined by
newlines) is put in front of each caption, the text is padded to the instruction's tokens plus 298
and encoded with the token mask, and the first token plus the last 299 are kept (300 states and
their mask, which the transformer gets as ``encoder_attention_mask``). ``--sana_complex_human_instruction``
replaces the instruction: a JSON list of lines, a file holding them, or plain text (one line per
line); ``None`` turns it off; unset uses ``SanaPipeline``'s own default instruction.

Latents come from the deep-compression autoencoder (``AutoencoderDC``, 32× for the released
models) times its scaling factor. Noise levels follow SimpleTuner's Sana recipe: σ uniform in
``[0, 1]``, shifted by the model scheduler's own ``shift``; the ``--flow_*`` schedule options have
no effect (SimpleTuner ignores them for Sana too). The transformer gets ``1000·σ`` times its
``timestep_scale``. ``--pretrained_gemma_model_name_or_path`` relocates Gemma.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...config import Problem
from ..family import DiffusersClass
from ._text_transformer import FlowTextTransformerFamily

#: Gemma tokens kept per prompt (SanaPipeline's max_sequence_length; SimpleTuner ignores --tokenizer_max_length)
GEMMA_LENGTH = 300
#: what --sana_complex_human_instruction says to turn the instruction off
NO_INSTRUCTION = "None"


def default_instruction() -> list[str]:
    """The complex human instruction ``SanaPipeline.__call__`` uses by default (read from diffusers)."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def parse_instruction(value: Any) -> list[str] | None:
    """``--sana_complex_human_instruction`` as lines: a JSON list, a file of lines, or text; ``None`` for off;
    unset → :func:`default_instruction`. Raises ValueError for JSON that is not a list of strings."""
    if value is None:
        return default_instruction()
    if isinstance(value, (list, tuple)):
        lines = [str(v).strip() for v in value if str(v).strip() and str(v) != NO_INSTRUCTION]
        return lines or None
    text = str(value).strip()
    if not text or text == NO_INSTRUCTION:
        return None
    path = Path(text).expanduser()
    if "\n" not in text and len(text) < 4096 and path.is_file():
        return parse_instruction(path.read_text(encoding="utf-8"))
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON ({exc.msg}); give a JSON list of lines, a file, or plain text") from None
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ValueError("must be a JSON list of strings (one per instruction line)")
        return parse_instruction(parsed)
    return [line.strip() for line in text.splitlines() if line.strip()]


class SanaFamily(FlowTextTransformerFamily):
    family = "sana"
    pipeline_class = "SanaPipeline"
    # SimpleTuner 3.1.6's Sana flavours; sana1.5-4.8b-1024 is its default
    flavours = {
        "sana1.5-4.8b-1024": "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers",
        "sana1.5-1.6b-1024": "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
        "sana1.0-1.6b-2048": "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers",
        "sana1.0-1.6b-1024": "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers",
        "sana1.0-600m-1024": "Efficient-Large-Model/Sana_600M_1024px_diffusers",
        "sana1.0-600m-512": "Efficient-Large-Model/Sana_600M_512px_diffusers",
    }
    default_flavour = "sana1.5-4.8b-1024"
    qkv_fusion = False  # its attention processor calls the separate projections
    denoiser_class_name = "SanaTransformer2DModel"
    vae_class = DiffusersClass("AutoencoderDC")
    pad_right = True  # SanaPipeline sets the tokenizer's padding side to the right
    text_encoder_location_options = {"pretrained_gemma_model_name_or_path": "text_encoder"}
    slider_lora_targets = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    modelspec_architecture = "sana"
    controlnet_class_name = "SanaControlNetModel"
    controlnet_pipeline_class = "SanaControlNetPipeline"
    controlnet_input = "latents"
    controlnet_image_argument = "control_image"
    #: the ControlNet's zero-initialised input block and per-block output projections
    controlnet_lora_targets = ("input_block", *(f"controlnet_blocks.{i}" for i in range(64)))

    @classmethod
    def controlnet_builder(cls) -> Any:
        return sana_controlnet_from_transformer

    @classmethod
    def controlnet_init_kwargs(cls, components: Any) -> dict[str, Any]:
        return {}

    def controlnet_residuals(self, controlnet, control, args, kwargs):
        """SanaControlNetModel on the control latents (DC-AE latents times the scaling factor, as
        SanaControlNetPipeline encodes its control image): one residual per transformer block."""
        hidden = kwargs["hidden_states"]
        samples = controlnet(hidden, encoder_hidden_states=kwargs["encoder_hidden_states"],
                             encoder_attention_mask=kwargs.get("encoder_attention_mask"), timestep=kwargs["timestep"],
                             controlnet_cond=control.to(hidden.dtype), return_dict=False)[0]
        return {"controlnet_block_samples": tuple(samples)}

    @classmethod
    def text_encoder_classes(cls) -> tuple[type, ...]:
        from transformers import Gemma2Model

        return (Gemma2Model,)

    @classmethod
    def build_tiny(cls, folder: Path, *, seed: int = 0) -> Path:
        return build_tiny_sana(folder, seed=seed)

    @classmethod
    def config_problems(cls, cfg: Any) -> list[Problem]:
        problems = super().config_problems(cfg)
        try:
            parse_instruction(cfg.sana_complex_human_instruction)
        except (ValueError, OSError) as exc:
            problems.append(Problem("sana_complex_human_instruction", cfg.sana_complex_human_instruction, str(exc)))
        return problems

    @classmethod
    def config_warnings(cls, cfg: Any) -> list[Problem]:
        from ...training.preflight import FLOW_OPTIONS, _asks_for_something

        warnings = super().config_warnings(cfg)
        if cfg.tokenizer_max_length:
            warnings.append(Problem("tokenizer_max_length", cfg.tokenizer_max_length,
                                    f"has no effect: Sana keeps {GEMMA_LENGTH} Gemma tokens (as SimpleTuner)"))
        warnings += [Problem(option, getattr(cfg, option), "has no effect for sana: σ is drawn uniformly and shifted "
                                                           "by the model scheduler's shift (SimpleTuner's Sana recipe)")
                     for option in FLOW_OPTIONS
                     if hasattr(cfg, "is_set") and cfg.is_set(option) and _asks_for_something(cfg, option)]
        return warnings

    def make_objective(self) -> Any:
        """Flow matching with σ ~ U(0, 1) shifted by the scheduler's ``shift``, whatever the ``--flow_*`` options say."""
        from ...training.objectives import FlowMatchingObjective
        from ...training.timesteps import FlowSchedule

        objective = FlowMatchingObjective(self.cfg, self.noise_scheduler.config)
        shift = float(getattr(self.noise_scheduler.config, "shift", 1.0) or 1.0)
        objective.schedule = FlowSchedule(kind="uniform", shift=shift if shift != 1.0 else None)
        return objective

    # ----- latents --------------------------------------------------------------------------------
    @property
    def latent_downscale(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in ``[-1, 1]`` → DC-AE latents times the scaling factor (the encoder is deterministic)."""
        vae = self.vae
        latents = vae.encode(pixels.to(self.device, dtype=next(vae.parameters()).dtype)).latent
        return (latents * vae.config.scaling_factor).float()

    # ----- text -----------------------------------------------------------------------------------
    @property
    def max_sequence_length(self) -> int:
        return GEMMA_LENGTH

    @property
    def instruction(self) -> list[str] | None:
        return parse_instruction(self.cfg.sana_complex_human_instruction)

    def text_cache_identity(self) -> dict[str, Any]:
        return {**super().text_cache_identity(), "instruction": self.instruction}

    def encode_text(self, prompts, text_encoders=None) -> dict[str, torch.Tensor]:
        """``prompt_embeds [B, 300, D]`` and ``prompt_attention_mask [B, 300]`` (see the module docstring)."""
        encoder = (text_encoders or self.text_encoders)[0]
        prompts, length = list(prompts), GEMMA_LENGTH
        lines = self.instruction
        if lines:
            instruction = "\n".join(lines)
            prompts = [instruction + p for p in prompts]
            length = len(self.tokenizers[0].encode(instruction)) + GEMMA_LENGTH - 2
        inputs = self.tokenize(prompts, length)
        mask = inputs.attention_mask.to(self.device)
        embeds = encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        keep = [0, *range(-GEMMA_LENGTH + 1, 0)]  # the first token and the prompt's last 299
        return {self.embeds_key: embeds[:, keep], self.mask_key: mask[:, keep]}

    # ----- training -------------------------------------------------------------------------------
    def predict(self, denoiser, noisy_latents, timesteps, text, batch):
        """The velocity ``[B, C, h, w]``; the transformer gets ``timestep · timestep_scale``."""
        embeds, mask = self.text_inputs(text, noisy_latents)
        config = getattr(denoiser, "config", None) or self.denoiser.config
        scaled = (timesteps * float(getattr(config, "timestep_scale", 1.0))).to(noisy_latents.device)
        out = denoiser(hidden_states=noisy_latents, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                       timestep=scaled, return_dict=False)[0]
        return self.without_learned_sigma(out, noisy_latents.shape[1])

    def pipeline_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The trained instruction, at the asked size (no resolution binning), uncleaned captions."""
        kwargs = super().pipeline_call_kwargs(kwargs)
        kwargs.update(complex_human_instruction=self.instruction, use_resolution_binning=False, clean_caption=False)
        return kwargs


def sana_controlnet_from_transformer(transformer: torch.nn.Module, num_layers: int = 7) -> torch.nn.Module:
    """A ``SanaControlNetModel`` copying ``transformer``'s embedders and its first ``num_layers`` blocks (diffusers has
    no ``from_transformer`` for Sana; 7 is SanaControlNetModel's default depth, that of the released Sana ControlNets).
    The input block and the output projections start at zero, so the untrained ControlNet changes nothing."""
    import inspect

    from diffusers import SanaControlNetModel

    accepted = inspect.signature(SanaControlNetModel.__init__).parameters
    config = {k: v for k, v in transformer.config.items() if k in accepted}
    controlnet = SanaControlNetModel.from_config({**config, "num_layers": num_layers})
    for part in ("patch_embed", "time_embed", "caption_projection", "caption_norm"):
        getattr(controlnet, part).load_state_dict(getattr(transformer, part).state_dict())
    controlnet.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
    return controlnet.to(transformer.dtype)


def tiny_sana_transformer_config(caption_channels: int = 32, latent_channels: int = 8) -> dict[str, Any]:
    """Two linear-attention blocks with cross-attention, patch size 1 (as released Sana)."""
    return dict(in_channels=latent_channels, out_channels=latent_channels, num_attention_heads=2, attention_head_dim=8,
                num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                caption_channels=caption_channels, mlp_ratio=2.5, sample_size=16, patch_size=1)


def tiny_dc_ae(latent_channels: int = 8):
    """A two-stage ``AutoencoderDC`` (2× instead of 32×) with Sana's scaling factor."""
    from diffusers import AutoencoderDC

    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
                         encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                         encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                         scaling_factor=0.41407)


def build_tiny_sana(folder: Path, *, seed: int = 0) -> Path:
    """A Sana-shaped pipeline folder: Gemma 2 with its tokenizer, the DiT, a DC-AE, the flow scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    from ..tiny import _add_index, _save
    from .lumina2 import tiny_gemma2, write_gemma_tokenizer

    torch.manual_seed(seed)
    folder = _save(folder, "SanaPipeline", {
        "transformer": SanaTransformer2DModel(**tiny_sana_transformer_config()), "vae": tiny_dc_ae(),
        "text_encoder": tiny_gemma2(32),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    })
    write_gemma_tokenizer(folder / "tokenizer")
    _add_index(folder, "tokenizer", "transformers", "GemmaTokenizerFast")
    return folder


FAMILY = SanaFamily
