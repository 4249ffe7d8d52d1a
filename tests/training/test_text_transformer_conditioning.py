"""What each text-transformer family feeds its transformer, its own options, and its LoRA key names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import InMemoryData, train_in_process

from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training.preflight import core_problems, core_warnings

COMMON = {"aspect_bucket_alignment": 16, "lr_scheduler": "constant"}
PROMPTS = ["a red cat", "a blue dog on a white background"]


def _family(make_cfg, name: str, **overrides):
    return load_family(make_cfg(name, **{**COMMON, **overrides}))


def _mask_is_respected(family, embeds_key: str, mask_key: str) -> None:
    """Changing the states of padding tokens leaves the prediction alone; changing a real token's does not."""
    text = family.encode_text(PROMPTS)
    mask = text[mask_key]
    assert mask.dtype in (torch.long, torch.int64, torch.int32, torch.bool)
    assert 0 < int(mask[0].sum()) < int(mask[1].sum()) < mask.shape[1]
    latents = torch.randn(2, family.denoiser.config.in_channels, 8, 8)
    steps = torch.tensor([300, 700]).to(family.objective.timestep_dtype)
    with torch.no_grad():
        base = family.predict(family.denoiser, latents, steps, text, None)
        padded = dict(text)
        padded[embeds_key] = text[embeds_key] + 5.0 * (1 - mask).unsqueeze(-1).to(text[embeds_key].dtype)
        torch.testing.assert_close(family.predict(family.denoiser, latents, steps, padded, None), base)
        token = dict(text)
        token[embeds_key] = text[embeds_key] + 5.0 * mask.unsqueeze(-1).to(text[embeds_key].dtype)
        assert not torch.allclose(family.predict(family.denoiser, latents, steps, token, None), base)
    assert base.shape == latents.shape


def _comfyui_keys(make_cfg, tmp_path, name: str) -> dict[str, torch.Tensor]:
    cfg = make_cfg(name, **COMMON, max_train_steps=1, lora_alpha=2, lora_format="comfyui",
                   output_dir=str(tmp_path / "comfy"))
    train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    return load_file(str(tmp_path / "comfy" / "pytorch_lora_weights.safetensors"))


# ----- PixArt Sigma ---------------------------------------------------------------------------------

def test_pixart_flavours_and_options(make_cfg):
    cls = family_class("pixart_sigma")
    cfg = make_cfg("pixart_sigma", pretrained_model_name_or_path=None, model_flavour="600M-512")
    assert resolve_source(cls, cfg).model == "PixArt-alpha/PixArt-Sigma-XL-2-512-MS"
    assert cls.flavours[cls.default_flavour] == "terminusresearch/pixart-900m-1024-ft-v0.6"
    stage = make_cfg("pixart_sigma", model_flavour="900M-1024-v0.7-stage1")
    assert core_problems(stage) == []  # the stage experts train (test_pixart_stages.py)
    assert [p.option for p in core_problems(make_cfg("pixart_sigma", train_text_encoder=True))] == [
        "train_text_encoder"]
    warned = {p.option for p in core_warnings(make_cfg("pixart_sigma", tokenizer_max_length=77,
                                                       aspect_bucket_alignment=32))}
    assert {"tokenizer_max_length", "max_grad_norm", "aspect_bucket_alignment"} <= warned


def test_pixart_conditioning_is_t5_with_its_mask_and_the_learned_sigma_is_dropped(make_cfg):
    family = _family(make_cfg, "pixart_sigma")
    text = family.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape == (2, 300, 32) and text["prompt_attention_mask"].shape == (2, 300)
    _mask_is_respected(family, "prompt_embeds", "prompt_attention_mask")
    zeroed = _family(make_cfg, "pixart_sigma", t5_padding="zero")
    z = zeroed.encode_text(PROMPTS)
    padding = z["prompt_attention_mask"] == 0
    assert z["prompt_embeds"][padding].abs().sum() == 0 and text["prompt_embeds"][padding].abs().sum() > 0
    assert zeroed.cache_key != family.cache_key
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        raw = family.denoiser(latents, encoder_hidden_states=text["prompt_embeds"],
                              encoder_attention_mask=text["prompt_attention_mask"], timestep=torch.tensor([10, 900]),
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        pred = family.predict(family.denoiser, latents, torch.tensor([10, 900]), text, None)
    assert raw.shape[1] == 8 and torch.equal(pred, raw[:, :4])
    assert family.prediction_type == "epsilon"


def test_pixart_comfyui_export_uses_the_diffusers_names_comfyui_maps(make_cfg, tmp_path):
    comfy = _comfyui_keys(make_cfg, tmp_path, "pixart_sigma")
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    # ComfyUI's PixArt rule: "transformer." + the diffusers layer name, kohya's lora_down/lora_up and alpha
    assert layers == {f"transformer.transformer_blocks.{b}.{attn}.{proj}" for b in (0, 1) for attn in ("attn1", "attn2")
                      for proj in ("to_q", "to_k", "to_v", "to_out.0")}
    assert all(f"{layer}.lora_down.weight" in comfy and float(comfy[f"{layer}.alpha"]) == 2.0 for layer in layers)


# ----- AuraFlow -------------------------------------------------------------------------------------

def test_auraflow_flavours_and_prompt_length(make_cfg):
    cls = family_class("auraflow")
    assert resolve_source(cls, make_cfg("auraflow", pretrained_model_name_or_path=None)).model == \
        "terminusresearch/auraflow-v0.3"
    assert _family(make_cfg, "auraflow").max_sequence_length == 120
    long = make_cfg("auraflow", **COMMON, tokenizer_max_length=300)
    assert "tokenizer_max_length" in {p.option for p in core_warnings(long)}
    assert load_family(long).max_sequence_length == 120  # cut back, as SimpleTuner does
    assert _family(make_cfg, "auraflow", tokenizer_max_length=300,
                   i_know_what_i_am_doing=True).max_sequence_length == 300
    assert _family(make_cfg, "auraflow", tokenizer_max_length=16).max_sequence_length == 16


def test_auraflow_conditioning_zeroes_padding_and_the_transformer_sees_sigma(make_cfg):
    family = _family(make_cfg, "auraflow", tokenizer_max_length=40)
    text = family.encode_text(PROMPTS)
    mask = text["prompt_attention_mask"]
    assert text["prompt_embeds"].shape == (2, 40, 32) and 0 < int(mask[0].sum()) < int(mask[1].sum()) < 40
    assert text["prompt_embeds"][mask == 0].abs().sum() == 0 and text["prompt_embeds"][mask == 1].abs().sum() > 0
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        pred = family.predict(family.denoiser, latents, torch.tensor([250.0, 750.0]), text, None)
        raw = family.denoiser(latents, encoder_hidden_states=text["prompt_embeds"],
                              timestep=torch.tensor([0.25, 0.75]), return_dict=False)[0]
    torch.testing.assert_close(pred, raw)
    assert family.prediction_type == "flow_matching"


def test_auraflow_comfyui_export_uses_the_diffusers_names_comfyui_maps(make_cfg, tmp_path):
    comfy = _comfyui_keys(make_cfg, tmp_path, "auraflow")
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    # ComfyUI's AuraFlow rule maps these diffusers layers (auraflow_to_diffusers) under "transformer."
    joint = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    assert layers == ({f"transformer.joint_transformer_blocks.0.attn.{p}" for p in joint}
                      | {f"transformer.single_transformer_blocks.0.attn.{p}" for p in joint[:4]})
    assert all(f"{layer}.lora_up.weight" in comfy and float(comfy[f"{layer}.alpha"]) == 2.0 for layer in layers)


# ----- Lumina 2 -------------------------------------------------------------------------------------

def test_lumina2_flavours_options_and_prompt_length(make_cfg):
    cls = family_class("lumina2")
    assert resolve_source(cls, make_cfg("lumina2", pretrained_model_name_or_path=None,
                                        model_flavour="neta-lumina")).model == "terminusresearch/neta-lumina-v1"
    assert _family(make_cfg, "lumina2").max_sequence_length == 256
    long = make_cfg("lumina2", **COMMON, tokenizer_max_length=600)
    assert "tokenizer_max_length" in {p.option for p in core_warnings(long)}
    assert {p.option for p in core_problems(make_cfg("sana", lora_format="comfyui"))} == {"lora_format"}
    assert core_problems(make_cfg("lumina2", lora_format="comfyui")) == []
    # ComfyUI's fused attention.qkv: q, k and v train together, as plain LoRA
    split = make_cfg("lumina2", lora_format="comfyui", peft_lora_target_modules='["to_q", "to_v"]', use_dora=True)
    assert {p.option for p in core_problems(split)} == {"peft_lora_target_modules", "use_dora"}
    assert {p.option for p in core_problems(make_cfg("lumina2", train_text_encoder=True))} == {"train_text_encoder"}


def test_lumina2_comfyui_export_names_the_original_layers_with_q_k_v_fused_exactly(make_cfg, tmp_path):
    """ComfyUI loads ``diffusion_model.<layer>`` keys in Alpha-VLLM's original Lumina 2 names; diffusers' single-file
    converter maps them back onto the trained layers, and the stacked qkv LoRA is the three LoRAs' sum, exactly."""
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    targets = '["to_q", "to_k", "to_v", "to_out.0", "linear_1", "linear_3", "norm1.linear", "x_embedder"]'
    cfg = make_cfg("lumina2", **COMMON, max_train_steps=1, lora_alpha=2, lora_format="comfyui", learning_rate=5e-2,
                   peft_lora_target_modules=targets, output_dir=str(tmp_path / "comfy"))
    result, family, _ = train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    comfy = load_file(str(tmp_path / "comfy" / "pytorch_lora_weights.safetensors"))
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert {"diffusion_model.layers.0.attention.qkv", "diffusion_model.noise_refiner.0.attention.out",
            "diffusion_model.context_refiner.0.feed_forward.w1", "diffusion_model.layers.1.adaLN_modulation.1",
            "diffusion_model.t_embedder.mlp.0", "diffusion_model.final_layer.adaLN_modulation.1",
            "diffusion_model.x_embedder"} <= layers
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in comfy)
    # the converter splits qkv at Lumina-Image-2.0's real sizes (2304 + 768 + 768 rows); names are what it checks
    original = {f"{layer.removeprefix('diffusion_model.')}.weight": torch.zeros(3840 if layer.endswith("qkv") else 1)
                for layer in layers}
    converted = {k.removesuffix(".weight") for k in convert_lumina2_to_diffusers(original)}
    trained = {name for name, module in family.denoiser.named_modules() if hasattr(module, "lora_A")}
    assert converted == trained
    # ComfyUI applies (alpha / rank) · up · down to the fused weight: the q, k and v deltas stacked as q; k; v rows
    qkv = "diffusion_model.layers.0.attention.qkv"
    down, up = comfy[f"{qkv}.lora_down.weight"], comfy[f"{qkv}.lora_up.weight"]
    assert down.shape[0] == 3 * 4 and float(comfy[f"{qkv}.alpha"]) == 3 * 2.0  # rank 4, alpha 2 per part
    fused = float(comfy[f"{qkv}.alpha"]) / down.shape[0] * up @ down
    parts = [family.denoiser.get_submodule(f"layers.0.attn.{p}") for p in ("to_q", "to_k", "to_v")]
    deltas = [m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight for m in parts]
    assert fused.shape == (32 + 16 + 16, 32) and deltas[1].abs().sum() > 0
    torch.testing.assert_close(fused, torch.cat(deltas).detach())


def test_lumina2_conditioning_is_gemma_with_the_system_prompt_and_time_runs_backwards(make_cfg):
    from diffusers import Lumina2Pipeline

    family = _family(make_cfg, "lumina2")
    text = family.encode_text(PROMPTS)
    assert text["prompt_embeds"].shape == (2, 256, 32)
    # exactly what Lumina2Pipeline.encode_prompt builds (system prompt, mask, penultimate hidden states)
    pipe = Lumina2Pipeline(**family.pipeline_components())
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=256)
    torch.testing.assert_close(text["prompt_embeds"], embeds)
    assert torch.equal(text["prompt_attention_mask"], mask)
    family.tokenizers[0].padding_side = "left"  # a tokenizer padding on the left is followed, as by the pipeline
    left = family.encode_text(PROMPTS)
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=256)
    assert torch.equal(left["prompt_attention_mask"], mask) and int(mask[0, 0]) == 0
    torch.testing.assert_close(left["prompt_embeds"], embeds)
    family.tokenizers[0].padding_side = "right"
    _mask_is_respected(family, "prompt_embeds", "prompt_attention_mask")
    latents = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        pred = family.predict(family.denoiser, latents, torch.tensor([250.0, 750.0]), text, None)
        raw = family.denoiser(hidden_states=latents, timestep=torch.tensor([0.75, 0.25]),
                              encoder_hidden_states=text["prompt_embeds"],
                              encoder_attention_mask=text["prompt_attention_mask"], return_dict=False)[0]
    torch.testing.assert_close(pred, -raw)


def test_pretrained_gemma_location_relocates_the_text_encoder(make_cfg, tiny_model, tmp_path):
    import shutil

    from kubetuner_trainer.config import ConfigError

    gemma = tmp_path / "gemma"
    shutil.copytree(tiny_model("lumina2") / "text_encoder", gemma)
    family = _family(make_cfg, "lumina2", pretrained_gemma_model_name_or_path=str(gemma))
    assert dict(family.components.source.text_encoders) == {"text_encoder": str(gemma)}
    with pytest.raises(ConfigError) as refused:
        _family(make_cfg, "lumina2", pretrained_gemma_model_name_or_path=str(tmp_path / "missing"))
    assert refused.value.problems[0].option == "pretrained_gemma_model_name_or_path"


# ----- Sana -----------------------------------------------------------------------------------------

def test_sana_flavours_instruction_option_and_schedule(make_cfg, tmp_path):
    from kubetuner_trainer.models.families.sana import default_instruction, parse_instruction

    cls = family_class("sana")
    assert resolve_source(cls, make_cfg("sana", pretrained_model_name_or_path=None)).model == \
        "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers"
    assert parse_instruction(None) == default_instruction() and len(default_instruction()) > 3
    assert parse_instruction("None") is None
    assert parse_instruction('["first line", "second"]') == ["first line", "second"]
    (tmp_path / "instruction.txt").write_text("line one\n\nline two\n")
    assert parse_instruction(str(tmp_path / "instruction.txt")) == ["line one", "line two"]
    assert {p.option for p in core_problems(make_cfg("sana", sana_complex_human_instruction="[1, 2]"))} == {
        "sana_complex_human_instruction"}
    warned = {p.option for p in core_warnings(make_cfg("sana", flow_schedule_shift=1.0, flow_use_beta_schedule=True))}
    assert {"flow_schedule_shift", "flow_use_beta_schedule"} <= warned
    family = _family(make_cfg, "sana", flow_use_beta_schedule=True)
    assert (family.objective.schedule.kind, family.objective.schedule.shift) == ("uniform", 3.0)


def test_sana_conditioning_matches_the_pipeline_with_its_instruction(make_cfg):
    from diffusers import SanaPipeline

    family = _family(make_cfg, "sana")
    text = family.encode_text(PROMPTS)
    pipe = SanaPipeline(**family.pipeline_components())
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=300,
                                            complex_human_instruction=family.instruction)
    assert text["prompt_embeds"].shape == (2, 300, 32)
    torch.testing.assert_close(text["prompt_embeds"], embeds)
    assert torch.equal(text["prompt_attention_mask"], mask)
    plain = _family(make_cfg, "sana", sana_complex_human_instruction="None")
    assert plain.cache_key != family.cache_key
    short = plain.encode_text(PROMPTS)
    assert 0 < int(short["prompt_attention_mask"][0].sum()) < int(short["prompt_attention_mask"][1].sum()) < 300
    _mask_is_respected(plain, "prompt_embeds", "prompt_attention_mask")
    latents = family.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    expected = family.vae.encode(torch.zeros(1, 3, 32, 32)).latent * family.vae.config.scaling_factor
    assert latents.shape == (2, 8, 16, 16)
    torch.testing.assert_close(family.encode_images(torch.zeros(1, 3, 32, 32)), expected)
