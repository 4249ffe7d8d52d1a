"""The SDXL refiner flavour and refiner training on tiny real models: layout, timestep range, aesthetic-score
conditioning, LoRA/full training, exact resume, LoRA loading into the img2img pipeline, kubetuner-train."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.families.sdxl import SDXLRefinerFamily, refiner_time_ids
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training import checkpoints as ckpt
from kubetuner_trainer.training import preflight

REFINER = "refiner-1.0"


@pytest.fixture
def refiner_cfg(make_cfg, tiny_model):
    def make(**overrides):
        values = dict(pretrained_model_name_or_path=str(tiny_model("sdxl", REFINER)), model_flavour=REFINER,
                      lr_scheduler="constant")
        values.update(overrides)
        return make_cfg("sdxl", **values)

    return make


def test_refiner_flavours_name_simpletuners_hub_ids_and_load_the_refiner_layout(refiner_cfg, tiny_model):
    sdxl = family_class("sdxl")
    assert {f: sdxl.flavours[f] for f in ("refiner-1.0", "refiner-0.9")} == {
        "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
        "refiner-0.9": "stabilityai/stable-diffusion-xl-refiner-0.9"}
    assert sdxl.for_flavour("refiner-0.9") is SDXLRefinerFamily and sdxl.for_flavour("base-1.0") is sdxl
    src = resolve_source(SDXLRefinerFamily, refiner_cfg(pretrained_model_name_or_path=None))
    assert src.model == "stabilityai/stable-diffusion-xl-refiner-1.0"
    # a local refiner folder is recognised without a flavour (its model_index.json asks for aesthetic scores)
    family = load_family(refiner_cfg(model_flavour=None))
    assert isinstance(family, SDXLRefinerFamily) and family.text_encoder_names == ("text_encoder_2",)
    assert sdxl.for_flavour(None, str(tiny_model("sdxl"))) is sdxl
    text = family.encode_text(["a red cube", "a blue ball"])
    assert {k: tuple(v.shape) for k, v in text.items()} == {"prompt_embeds": (2, 77, 32),
                                                            "pooled_prompt_embeds": (2, 32)}


def test_aesthetic_score_time_ids_reach_the_unet(refiner_cfg):
    family = load_family(refiner_cfg())
    latents = torch.randn(2, 4, 16, 16)
    batch = SimpleNamespace(original_sizes=[(64, 48), (32, 32)], crop_coords=[(4, 2), (0, 0)], target_sizes=None)
    assert family.time_ids(batch, latents).tolist() == [[64, 48, 4, 2, 7.0], [32, 32, 0, 0, 7.0]]
    text = family.encode_text(["x", "x"])
    t = torch.tensor([50, 50])
    with torch.no_grad():
        seven = family.predict(family.denoiser, latents, t, text, batch)
        family.cfg = family.cfg.replace(data_aesthetic_score=2.5)
        low = family.predict(family.denoiser, latents, t, text, batch)
    assert refiner_time_ids(batch, latents, 2, 2.5)[:, 4].tolist() == [2.5, 2.5]
    assert not torch.allclose(seven, low)


def _drawn(family, count: int = 512, batch: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.cat([family.objective.sample_timesteps(torch.zeros(batch, 1), gen) for _ in range(count // batch)])


def test_refiner_timesteps_stay_in_the_refiner_range(refiner_cfg, make_cfg):
    family = load_family(refiner_cfg())
    refiner = _drawn(family)  # the refiner trains the last 20 % of denoising by default
    assert family.objective.eval_timesteps(4) == [25, 75, 125, 175]  # evaluation loss over the trained range
    assert refiner.min() >= 0 and refiner.max() < 200 and refiner.max() > 150
    # segmented sampling stratifies inside the range: one draw per quarter of [0, 200) in every batch
    assert all(sorted(int(t) // 50 for t in chunk) == [0, 1, 2, 3] for chunk in refiner.view(-1, 4))
    inverted = _drawn(load_family(refiner_cfg(refiner_training_strength=0.35, refiner_training_invert_schedule=True)))
    assert inverted.min() >= 350 and inverted.max() <= 999 and inverted.min() < 400
    full = _drawn(load_family(refiner_cfg(sdxl_refiner_uses_full_range=True)))
    assert full.min() < 100 and full.max() > 900
    # --refiner_training makes any DDPM family train one stage of a two-expert split (the base: inverted)
    base = _drawn(load_family(make_cfg("sd1x", refiner_training=True, refiner_training_strength=0.5,
                                       refiner_training_invert_schedule=True, disable_segmented_timestep_sampling=True)))
    assert base.min() >= 500 and base.max() > 900
    plain = load_family(make_cfg("sd1x"))
    assert _drawn(plain).min() < 100 and plain.objective.eval_timesteps(4) == [125, 375, 625, 875]


def test_an_empty_refiner_range_is_refused_and_flow_matching_warns(make_cfg):
    with pytest.raises(ConfigError, match="refiner_training_strength.*leaves no timestep"):
        preflight.check(make_cfg("sdxl", refiner_training=True, refiner_training_strength=0.0))
    warnings = preflight.all_warnings(make_cfg("sd3", refiner_training=True))
    assert any(w.option == "refiner_training" for w in warnings)
    base = make_cfg("sdxl", sdxl_refiner_uses_full_range=True, data_aesthetic_score=5.0)
    assert {w.option for w in preflight.all_warnings(base)} >= {"sdxl_refiner_uses_full_range", "data_aesthetic_score"}
    refiner = base.replace(model_flavour="refiner-1.0")
    assert not {w.option for w in preflight.all_warnings(refiner)} & {"sdxl_refiner_uses_full_range",
                                                                     "data_aesthetic_score"}


@torch.no_grad()
def _fixed_loss(family, data: InMemoryData) -> float:
    """Mean ε loss over the training images at fixed refiner-range timesteps and fixed noise."""
    gen = torch.Generator().manual_seed(123)
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    batch = SimpleNamespace(original_sizes=data.sizes, crop_coords=[(0, 0)] * data.count, target_sizes=None)
    total = 0.0
    for step in (20, 60, 120, 180):
        noise = torch.randn(data.latents.shape, generator=gen)
        t = torch.full((data.count,), step)
        noisy = family.objective.noisy_latents(data.latents, noise, t)
        total += float(torch.nn.functional.mse_loss(family.predict(family.denoiser, noisy, t, text, batch), noise))
    return total / 4


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(refiner_cfg, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    steps = 15 if model_type == "lora" else 5
    cfg = refiner_cfg(model_type=model_type, max_train_steps=steps, lora_rank=8,
                      learning_rate=1e-2 if model_type == "lora" else 1e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = _fixed_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = _fixed_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == steps
    assert after < before * 0.9, (before, after)


def test_lora_resume_is_exact(refiner_cfg, tmp_path):
    common = dict(max_train_steps=4, learning_rate=1e-3, train_text_encoder=True)
    straight, _, straight_data = train_in_process(refiner_cfg(output_dir=str(tmp_path / "a"), **common))
    split_cfg = refiner_cfg(output_dir=str(tmp_path / "b"), **common)
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2))
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume)
    assert second.exit_code == ExitCode.SUCCESS
    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def _render(pipe) -> np.ndarray:
    from PIL import Image

    return pipe("a photo of thing 1", image=Image.new("RGB", (32, 32), (128, 128, 128)), strength=1.0,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_lora_loads_into_the_img2img_pipeline_and_changes_its_output(refiner_cfg, tiny_model, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    result, family, _ = train_in_process(refiner_cfg(max_train_steps=2, learning_rate=5e-2, train_text_encoder=True))
    assert result.exit_code == ExitCode.SUCCESS
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner/lora"
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder_2"}
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_model("sdxl", REFINER)))
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert "default_0" in pipe.text_encoder_2.peft_config
    # ComfyUI names the refiner's lone OpenCLIP encoder lora_te (its SDXL-refiner CLIP rule)
    assert family.comfyui_prefix("text_encoder_2", ["unet", "text_encoder_2"]) == "lora_te"


def test_a_simpletuner_refiner_config_trains_and_validates_through_kubetuner_train(tiny_model, tmp_path):
    """A SimpleTuner-style refiner LoRA config (paths swapped, sizes tiny): trains, checkpoints, renders
    validation images through the img2img pipeline."""
    from accelerate.state import AcceleratorState
    from PIL import Image

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.tiny import build_tiny_dataset

    images = build_tiny_dataset(tmp_path / "images", count=4, sizes=((64, 64),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([
        {"id": "subject", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {
        "model_family": "sdxl", "model_flavour": REFINER, "model_type": "lora", "lora_rank": 4,
        "refiner_training": True, "refiner_training_strength": 0.35, "data_aesthetic_score": 6.0,
        "optimizer": "adamw_bf16", "learning_rate": 1e-4, "lr_scheduler": "constant", "mixed_precision": "no",
        "train_batch_size": 2, "seed": 42, "report_to": "none", "validation_prompt": "a red circle",
        "validation_guidance": 4.0, "validation_seed": 42,
        "pretrained_model_name_or_path": str(tiny_model("sdxl", REFINER)), "data_backend_config": str(datasets),
        "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "checkpoint_step_interval": 1,
        "validation_steps": 2, "validation_resolution": "32x32", "validation_num_inference_steps": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    try:
        assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    finally:
        AcceleratorState._reset_state()
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    rendered = sorted((out / "validation" / "step-2").glob("*.png"))
    assert rendered and Image.open(rendered[0]).size == (32, 32)
