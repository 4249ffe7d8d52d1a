"""DeepFloyd IF (stages I and II) on tiny real models: pixel space, the ε half of the learned-variance output,
LoRA/full training, exact resume, LoRA loading into IFPipeline / IFSuperResolutionPipeline, kubetuner-train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.families.deepfloyd import DeepFloydStageIIFamily
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training import checkpoints as ckpt
from kubetuner_trainer.training import preflight

STAGE_II = "ii-medium-450m"


@pytest.fixture
def if_cfg(make_cfg, tiny_model):
    def make(flavour: str = "i-medium-400m", **overrides):
        values = dict(pretrained_model_name_or_path=str(tiny_model("deepfloyd", flavour if flavour == STAGE_II else None)),
                      model_flavour=flavour, lr_scheduler="constant")
        values.update(overrides)
        return make_cfg("deepfloyd", **values)

    return make


def test_flavours_name_simpletuners_hub_ids_and_what_deepfloyd_refuses(if_cfg):
    cls = family_class("deepfloyd")
    assert cls.flavours["i-xlarge-4.3b"] == "DeepFloyd/IF-I-XL-v1.0" and cls.flavours[STAGE_II] == "DeepFloyd/IF-II-M-v1.0"
    assert cls.for_flavour("ii-large-1.2b") is DeepFloydStageIIFamily and cls.for_flavour("i-large-900m") is cls
    assert resolve_source(cls, if_cfg("i-large-900m", pretrained_model_name_or_path=None)).model == "DeepFloyd/IF-I-L-v1.0"
    assert resolve_source(cls, if_cfg(None, pretrained_model_name_or_path=None)).model == "DeepFloyd/IF-I-XL-v1.0"
    for overrides, option in ((dict(train_text_encoder=True), "train_text_encoder"),
                              (dict(lora_format="comfyui"), "lora_format"),
                              (dict(tokenizer_max_length=120), "tokenizer_max_length")):
        with pytest.raises(ConfigError) as refused:
            preflight.check(if_cfg(**overrides))
        assert [p.option for p in refused.value.problems] == [option]
    preflight.check(if_cfg(tokenizer_max_length=120, i_know_what_i_am_doing=True))
    preflight.check(if_cfg(train_text_encoder=True, model_type="full"))  # T5 trains with the UNet (below)


def test_full_training_with_train_text_encoder_trains_and_saves_t5(if_cfg, tiny_model, tmp_path):
    from transformers import T5EncoderModel

    result, _, _ = train_in_process(if_cfg(model_type="full", train_text_encoder=True, max_train_steps=2))
    assert result.exit_code == ExitCode.SUCCESS
    before = T5EncoderModel.from_pretrained(str(tiny_model("deepfloyd")), subfolder="text_encoder").state_dict()
    after = T5EncoderModel.from_pretrained(str(tmp_path / "out"), subfolder="text_encoder").state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_pixel_space_no_vae_and_the_epsilon_half_of_the_output(if_cfg, tiny_model):
    family = load_family(if_cfg())
    assert family.vae is None and family.latent_downscale == 1 and "vae" not in family.pipeline_components()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(family.encoders().encode_images(pixels), pixels)  # the cache stores the pixels
    text = family.encode_text(["a red cube", "a blue ball"])
    assert tuple(text["prompt_embeds"].shape) == (2, 77, 32)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        full = family.denoiser(pixels, t, encoder_hidden_states=text["prompt_embeds"]).sample
        eps = family.predict(family.denoiser, pixels, t, text, None)
    assert full.shape == (2, 6, 32, 32) and torch.equal(eps, full[:, :3])
    # stage II: a local super-resolution folder is recognised; its UNet sees the image twice and a class label
    stage_ii = load_family(if_cfg(STAGE_II, model_flavour=None))
    assert isinstance(stage_ii, DeepFloydStageIIFamily) and stage_ii.denoiser.config.in_channels == 6
    with torch.no_grad():
        out = stage_ii.predict(stage_ii.denoiser, pixels, t, text, None)
        other = stage_ii.predict(stage_ii.denoiser, pixels, torch.tensor([10, 10]), text, None)
    assert out.shape == pixels.shape and not torch.allclose(out[1], other[1])


@torch.no_grad()
def _fixed_loss(family, data: InMemoryData) -> float:
    gen = torch.Generator().manual_seed(123)
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for step in (100, 300, 500, 700):
        noise = torch.randn(data.latents.shape, generator=gen)
        t = torch.full((data.count,), step)
        noisy = family.objective.noisy_latents(data.latents, noise, t)
        total += float(torch.nn.functional.mse_loss(family.predict(family.denoiser, noisy, t, text, None), noise))
    return total / 4


@pytest.mark.parametrize("flavour, model_type", [("i-medium-400m", "lora"), ("i-medium-400m", "full"),
                                                 (STAGE_II, "lora"), (STAGE_II, "full")])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(if_cfg, flavour, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    steps = 10 if model_type == "lora" else 6
    cfg = if_cfg(flavour, model_type=model_type, max_train_steps=steps, lora_rank=8,
                 learning_rate=2e-2 if model_type == "lora" else 3e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = _fixed_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = _fixed_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == steps
    assert after < before * 0.9, (before, after)


def test_lora_resume_is_exact(if_cfg, tmp_path):
    common = dict(max_train_steps=4, learning_rate=1e-3)
    straight, _, straight_data = train_in_process(if_cfg(output_dir=str(tmp_path / "a"), **common))
    split_cfg = if_cfg(output_dir=str(tmp_path / "b"), **common)
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2))
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume)
    assert second.exit_code == ExitCode.SUCCESS
    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flavour", ["i-medium-400m", STAGE_II])
def test_saved_lora_loads_into_the_if_pipeline_and_changes_its_output(if_cfg, tiny_model, tmp_path, flavour):
    import diffusers
    from PIL import Image

    result, family, _ = train_in_process(if_cfg(flavour, max_train_steps=2, learning_rate=5e-2))
    assert result.exit_code == ExitCode.SUCCESS
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet"}
        assert f.metadata()["modelspec.architecture"] == f"{family.modelspec_architecture}/lora"
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        str(tiny_model("deepfloyd", flavour if flavour == STAGE_II else None)))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, clean_caption=False, output_type="np")
    if flavour == STAGE_II:
        kwargs["image"] = Image.new("RGB", (8, 8), (128, 128, 128))

    def render():
        return pipe("a photo of thing 1", generator=torch.Generator().manual_seed(0), **kwargs).images[0]

    base = render()
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - render()).max() > 1e-3


def test_a_simpletuner_deepfloyd_config_trains_and_validates_through_kubetuner_train(tiny_model, tmp_path):
    """A SimpleTuner-style DeepFloyd LoRA config (paths swapped, sizes tiny): the cache holds pixels, a checkpoint
    is written and validation renders through IFPipeline."""
    from accelerate.state import AcceleratorState
    from PIL import Image

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.tiny import build_tiny_dataset

    images = build_tiny_dataset(tmp_path / "images", count=4, sizes=((32, 32),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([
        {"id": "subject", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": 0.001024, "resolution_type": "area", "minimum_image_size": 0,  # 32x32 buckets
         "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {
        "model_family": "deepfloyd", "model_flavour": "i-medium-400m", "model_type": "lora", "lora_rank": 4,
        "optimizer": "adamw_bf16", "learning_rate": 1e-4, "lr_scheduler": "constant", "mixed_precision": "no",
        "snr_gamma": 5.0, "use_soft_min_snr": True, "train_batch_size": 2, "seed": 42, "report_to": "none",
        "validation_prompt": "a red circle", "validation_guidance": 4.0, "validation_seed": 42,
        "pretrained_model_name_or_path": str(tiny_model("deepfloyd")), "data_backend_config": str(datasets),
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
    assert any(p.is_file() for p in (tmp_path / "cache" / "vae").rglob("*"))
    rendered = sorted((out / "validation" / "step-2").glob("*.png"))
    assert rendered and Image.open(rendered[0]).size == (32, 32)
