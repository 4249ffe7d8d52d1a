"""Cosmos-Predict2 text-to-image on a tiny real model: the EDM objective and its preconditioning, T5
conditioning, training, exact resume, LoRA export and loading into the pipeline's transformer, the trainer CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import InMemoryData, assert_lora_resume_is_exact, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training.preflight import all_warnings, check

LENGTH = 24


def _cfg(make_cfg, **overrides):
    values = dict(tokenizer_max_length=LENGTH, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("cosmos2image", **values)


def test_flavours_and_refusals(make_cfg):
    from kubetuner_trainer.models.families.cosmos2image import guardrail_available

    cls = family_class("cosmos2image")
    assert resolve_source(cls, _cfg(make_cfg, pretrained_model_name_or_path=None)).model == \
        "nvidia/Cosmos-Predict2-2B-Text2Image"
    assert cls.flavours["14b"] == "nvidia/Cosmos-Predict2-14B-Text2Image"
    refusals = [({"train_text_encoder": True}, "train_text_encoder"),
                ({"prediction_type": "flow_matching"}, "prediction_type")]
    for changes, option in refusals:
        with pytest.raises(ConfigError) as info:
            check(_cfg(make_cfg, **changes))
        assert option in {p.option for p in info.value.problems}, (changes, info.value)
    # without NVIDIA's guardrail package validation renders run unscreened, and the start says so
    warned = [w for w in all_warnings(_cfg(make_cfg, validation_prompt_library=True)) if "cosmos_guardrail" in w.message]
    assert [w.option for w in warned] == ([] if guardrail_available() else ["validation_prompt_library"])
    assert not [w for w in all_warnings(_cfg(make_cfg)) if "cosmos_guardrail" in w.message]


def test_edm_preconditioning_turns_the_true_velocity_into_the_clean_latent(make_cfg):
    family = load_family(_cfg(make_cfg))
    objective = family.objective
    assert (objective.sigma_min, objective.sigma_max, objective.sigma_data) == (0.002, 80.0, 1.0)  # the pipeline's
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigmas = torch.tensor([0.01, 1.0, 30.0])
    noisy = objective.noisy_latents(x0, noise, sigmas)
    seen = {}

    def velocity(hidden_states, timestep, **kwargs):
        # the pipeline's model input: x_t = (1 - t) x0 + t noise at t = sigma / (sigma + 1)
        seen["t"] = timestep
        t = timestep.view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(hidden_states, (1 - t) * x0.unsqueeze(2) + t * noise.unsqueeze(2))
        return ((noise - x0).unsqueeze(2),)

    torch.testing.assert_close(family.predict(velocity, noisy, sigmas, {"prompt_embeds": torch.zeros(3, 2, 32)},
                                              None), x0)
    torch.testing.assert_close(seen["t"], sigmas / (sigmas + 1))
    draws = objective.sample_timesteps(torch.zeros(4000, 1), torch.Generator().manual_seed(0))
    assert abs(float(draws.log().mean())) < 0.1 and abs(float(draws.log().std()) - 1.0) < 0.1
    assert float(draws.min()) >= 0.002 and float(draws.max()) <= 80.0
    assert objective.eval_timesteps(2) == pytest.approx([float(torch.tensor(-0.6745).exp()),
                                                         float(torch.tensor(0.6745).exp())], rel=1e-3)


def test_t5_conditioning_zeroes_padding(make_cfg):
    family = load_family(_cfg(make_cfg))
    embeds = family.encode_text(["a red cat", "a dog"])["prompt_embeds"]
    assert embeds.shape == (2, LENGTH, 32)
    tokens = len(family.tokenizers[0]("a red cat").input_ids)
    assert torch.count_nonzero(embeds[0, tokens:]) == 0 and torch.count_nonzero(embeds[0, :tokens]) > 0


@torch.no_grad()
def _fixed_edm_loss(family, data: InMemoryData) -> float:
    gen = torch.Generator().manual_seed(123)
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for sigma in (0.3, 0.8, 1.5, 3.0):
        noise = torch.randn(data.latents.shape, generator=gen)
        steps = torch.full((data.latents.shape[0],), sigma)
        pred = family.predict(family.denoiser, family.objective.noisy_latents(data.latents, noise, steps), steps,
                              text, None)
        total += float(family.objective.loss(family.cfg, pred, data.latents, steps))
    return total / 4


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(make_cfg, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _cfg(make_cfg, model_type=model_type, max_train_steps=20, lora_rank=8,
               learning_rate=1e-2 if model_type == "lora" else 1e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = _fixed_edm_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = _fixed_edm_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == 20
    assert after < before * 0.9, (before, after)


def test_lora_resume_is_exact(make_cfg, tmp_path):
    assert_lora_resume_is_exact(lambda **kw: _cfg(make_cfg, max_train_steps=4, learning_rate=1e-3, gradient_checkpointing=True, **kw), tmp_path)


def test_saved_lora_loads_into_the_pipelines_transformer_and_changes_it(make_cfg, tiny_model, tmp_path):
    from kubetuner_trainer.models.families.cosmos2image import pipeline_class

    result, family, _ = train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "d"), max_train_steps=2,
                                              learning_rate=5e-2, lora_alpha=8))
    assert result.exit_code == ExitCode.SUCCESS
    plain = load_file(str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    assert plain and {k.split(".", 1)[0] for k in plain} == {"transformer"}
    pipe = pipeline_class().from_pretrained(str(tiny_model("cosmos2image")))
    inputs = dict(hidden_states=torch.randn(1, 16, 1, 4, 4), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 3, 32), padding_mask=torch.zeros(1, 1, 4, 4), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(tmp_path / "d"))  # diffusers' transformer-only loader on the pipeline
        assert (pipe.transformer(**inputs)[0] - base).abs().max() > 1e-4
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8


def test_comfyui_export_names_nvidias_original_layers(make_cfg, tmp_path):
    """ComfyUI loads ``diffusion_model.<layer>`` keys in the original Cosmos-Predict2 names (its CosmosPredict2
    model keeps them); diffusers' single-file converter maps those names back onto exactly the trained layers."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    targets = '["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear_1", "norm3.linear_2", ' \
              '"patch_embed.proj", "time_embed.t_embedder.linear_1", "norm_out.linear_2", "proj_out"]'
    cfg = _cfg(make_cfg, max_train_steps=1, lora_format="comfyui", lora_alpha=2, peft_lora_target_modules=targets)
    result, family, _ = train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=2, size=16))
    assert result.exit_code == ExitCode.SUCCESS
    tensors = load_file(str(result.final_path / "pytorch_lora_weights.safetensors"))
    layers = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert {"diffusion_model.blocks.0.self_attn.q_proj", "diffusion_model.blocks.1.cross_attn.output_proj",
            "diffusion_model.blocks.0.mlp.layer1", "diffusion_model.x_embedder.proj.1",
            "diffusion_model.final_layer.linear", "diffusion_model.t_embedder.1.linear_1"} <= layers
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert all(float(tensors[f"{layer}.alpha"]) == 2.0 for layer in layers)
    original = {f"net.{layer.removeprefix('diffusion_model.')}.weight": torch.zeros(1) for layer in layers}
    converted = {k.removesuffix(".weight") for k in convert_cosmos_transformer_checkpoint_to_diffusers(original)}
    trained = {name for name, module in family.denoiser.named_modules() if hasattr(module, "lora_A")}
    assert converted == trained and len(trained) == len(layers)


def test_cosmos_trains_through_kubetuner_train_and_renders_validation(tiny_model, tmp_path, caplog):
    from PIL import Image

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.models.families.cosmos2image import guardrail_available
    from kubetuner_trainer.tiny import build_tiny_dataset

    images = build_tiny_dataset(tmp_path / "images", count=4, sizes=((64, 64),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(images),
                                     "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
                                     "cache_dir_vae": str(tmp_path / "cache" / "vae")},
                                    {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
                                     "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {"model_family": "cosmos2image", "model_type": "full", "pretrained_model_name_or_path":
              str(tiny_model("cosmos2image")), "data_backend_config": str(datasets), "output_dir": str(tmp_path / "out"),
              "train_batch_size": 2, "max_train_steps": 2, "checkpoint_step_interval": 1, "mixed_precision": "no",
              "tokenizer_max_length": LENGTH, "learning_rate": 1e-4, "seed": 1, "validation_prompt": "a red circle",
              "validation_step_interval": 2, "validation_resolution": "32x32", "validation_num_inference_steps": 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "transformer" / "config.json").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Cosmos2TextToImagePipeline" and index["safety_checker"] == [None, None]
    rendered = sorted((out / "validation" / "step-2").glob("*.png"))
    assert rendered and Image.open(rendered[0]).size == (32, 32)
    assert np.asarray(Image.open(rendered[0])).std() > 0
    if not guardrail_available():  # said at start (config warning) and at the first unscreened render
        assert sum("cosmos_guardrail" in r.getMessage() for r in caplog.records) >= 2
