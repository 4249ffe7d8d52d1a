"""Flux on a tiny real FLUX.1-shaped model: packing, conditioning, guidance, masks, LoRA export and loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_helpers import InMemoryData, RecordingEvents, tiny_run_values, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import load_family
from kubetuner_trainer.models.families.flux import image_ids, pack_latents, unpack_latents
from kubetuner_trainer.training.preflight import check

FAST = {"tokenizer_max_length": 16}  # a short T5 sequence keeps CPU steps quick


def test_packing_and_image_ids_match_the_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), latents)
    assert torch.equal(image_ids(6, 8, latents.device, torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 4, latents.device, torch.float32))


def test_encoders_give_16_channel_latents_and_masked_t5_embeddings(make_cfg):
    family = load_family(make_cfg("flux", tokenizer_max_length=24))
    encoders = family.encoders()
    latents = encoders.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert latents.shape == (2, 16, 16, 16)
    text = encoders.encode_prompts(["a red cat", "a blue dog now"])
    assert {k: tuple(v.shape) for k, v in text[0].items()} == {
        "prompt_embeds": (24, 32), "pooled_prompt_embeds": (32,), "attention_mask": (24,)}
    assert 0 < int(text[0]["attention_mask"].sum()) < int(text[1]["attention_mask"].sum()) < 24
    zeroed = load_family(make_cfg("flux", tokenizer_max_length=24, t5_padding="zero")).encoders()
    z = zeroed.encode_prompts(["a red cat"])[0]
    padding = z["attention_mask"] == 0
    assert z["prompt_embeds"][padding].abs().sum() == 0 and text[0]["prompt_embeds"][padding].abs().sum() > 0
    assert zeroed.cache_key != encoders.cache_key  # cached embeddings differ, so must their cache


def _predict(family, **cfg_changes):
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 8, 8)
    text = family.encode_text(["a red cat", "a blue dog on a white background"])
    with torch.no_grad():
        return family.predict(family.denoiser, latents, torch.tensor([300.0, 700.0]), text, None)


def test_guidance_modes_and_attention_mask_reach_the_transformer(make_cfg):
    constant = load_family(make_cfg("flux", tokenizer_max_length=24, flux_guidance_value=1.0))
    assert constant.guidance(3, constant.denoiser).tolist() == [1.0, 1.0, 1.0]
    stronger = load_family(make_cfg("flux", tokenizer_max_length=24, flux_guidance_value=4.0))
    assert not torch.allclose(_predict(constant), _predict(stronger))
    ranged = load_family(make_cfg("flux", flux_guidance_mode="random-range", flux_guidance_min=2.0,
                                  flux_guidance_max=3.0))
    ranged.denoiser.train()
    draws = ranged.guidance(1000, ranged.denoiser)
    assert draws.min() >= 2.0 and draws.max() <= 3.0 and draws.std() > 0.2
    ranged.denoiser.eval()
    assert ranged.guidance(2, ranged.denoiser).tolist() == [2.5, 2.5]  # deterministic for evaluation
    masked = load_family(make_cfg("flux", tokenizer_max_length=24, flux_guidance_value=1.0,
                                  flux_attention_masked_training=True))
    out = _predict(masked)
    assert out.shape == (2, 16, 8, 8) and not torch.allclose(out, _predict(constant))


def test_flux_options_are_checked_before_loading(make_cfg):
    for changes, option in (({"flux_lora_target": "controlnet"}, "flux_lora_target"),
                            ({"model_flavour": "schnell"}, "model_flavour"),
                            ({"flow_schedule_auto_shift": True, "flow_schedule_shift": 3.0}, "flow_schedule_shift"),
                            ({"prediction_type": "epsilon"}, "prediction_type"),
                            ({"pretrained_unet_model_name_or_path": "/x"}, "pretrained_unet_model_name_or_path")):
        with pytest.raises(ConfigError) as info:
            check(make_cfg("flux", **changes))
        assert option in {p.option for p in info.value.problems}, (changes, info.value)
    check(make_cfg("flux", model_flavour="schnell", flux_fast_schedule=True, flux_lora_target="all+ffs"))


def test_lora_presets_pick_the_documented_layers(make_cfg):
    result, family, _ = train_in_process(make_cfg("flux", flux_lora_target="context", max_train_steps=1, **FAST),
                                         data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    assert result.exit_code == ExitCode.SUCCESS
    wrapped = {n.rsplit(".", 1)[-1] for n, m in family.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"}


# ComfyUI's Flux LoRA loader (comfy/lora.py model_lora_keys_unet + comfy/utils.py flux_to_diffusers) accepts
# "lora_transformer_<diffusers layer path, dots as underscores>" for these diffusers layers of each block,
# with ".lora_down.weight", ".lora_up.weight" and ".alpha" tensors (its "regular" LoRA layout).
COMFY_DOUBLE_BLOCK_LAYERS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
)
COMFY_SINGLE_BLOCK_LAYERS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")
COMFY_GLOBAL_LAYERS = (
    "proj_out", "x_embedder", "context_embedder", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
)


def comfyui_flux_layer_names(num_layers: int, num_single_layers: int) -> set[str]:
    paths = list(COMFY_GLOBAL_LAYERS)
    paths += [f"transformer_blocks.{i}.{p}" for i in range(num_layers) for p in COMFY_DOUBLE_BLOCK_LAYERS]
    paths += [f"single_transformer_blocks.{i}.{p}" for i in range(num_single_layers) for p in COMFY_SINGLE_BLOCK_LAYERS]
    return {"lora_transformer_" + p.replace(".", "_") for p in paths}


def test_comfyui_export_uses_the_keys_comfyuis_flux_loader_maps(make_cfg):
    from safetensors.torch import load_file

    cfg = make_cfg("flux", flux_lora_target="all+ffs+embedder", lora_format="comfyui", max_train_steps=1, **FAST)
    result, family, _ = train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    assert result.exit_code == ExitCode.SUCCESS
    tensors = load_file(str(result.final_path / "pytorch_lora_weights.safetensors"))
    config = family.denoiser.config
    allowed = comfyui_flux_layer_names(config.num_layers, config.num_single_layers)
    layers = {}
    for key in tensors:
        layer, _, suffix = key.partition(".")
        layers.setdefault(layer, set()).add(suffix)
    assert layers and set(layers) <= allowed, sorted(set(layers) - allowed)
    assert all(s == {"lora_down.weight", "lora_up.weight", "alpha"} for s in layers.values())
    # the preset's image/context attention, feed-forward and embedder layers are all there
    for expected in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff_context.net.2",
                     "single_transformer_blocks.0.proj_mlp", "x_embedder"):
        assert "lora_transformer_" + expected.replace(".", "_") in layers


def _render(pipe) -> np.ndarray:
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_lora_loads_into_the_flux_pipeline_and_changes_its_output(make_cfg, tiny_model):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    cfg = make_cfg("flux", max_train_steps=3, learning_rate=5e-2, lora_alpha=8, train_text_encoder=True, **FAST)
    result, _, _ = train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=2, batch_size=2))
    with safe_open(str(result.final_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    # the CLIP encoder trains with --train_text_encoder; T5 stays frozen (FluxPipeline loads no T5 LoRA)
    assert {k.split(".", 1)[0] for k in keys} == {"transformer", "text_encoder"}
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    pipe = FluxPipeline.from_pretrained(str(tiny_model("flux")))
    base = _render(pipe)
    pipe.load_lora_weights(str(result.final_path))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8


def test_flux_trains_through_the_trainer_with_real_data_and_validation(tmp_path, tiny_model):
    from PIL import Image

    from kubetuner_trainer.config import TrainerConfig
    from kubetuner_trainer.train import run

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(folder),
                                     "caption_strategy": "textfile"}]))
    cfg = TrainerConfig.from_mapping(tiny_run_values(
        tiny_model("flux"), tmp_path, datasets, model_family="flux", max_train_steps=2, checkpoint_step_interval=1,
        flux_guidance_mode="random-range", flux_attention_masked_training=True, t5_padding="zero",
        validation_prompt="a red circle", validation_step_interval=2, validation_resolution="32",
        validation_num_inference_steps=2, **FAST))
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.SUCCESS
    assert [c.step for c in events.checkpoints] == [1, 2]  # the interval falls on the last step too
    assert all(np.isfinite(r.loss) for r in events.steps)
    (step, images), = events.validations
    assert step == 2 and [Image.open(p).size for p in images] == [(32, 32)]
