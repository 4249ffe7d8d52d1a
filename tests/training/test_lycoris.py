"""LyCORIS (``--lora_type lycoris``) on a tiny SDXL: learning, exact resume, the saved file, validation strength."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.training import checkpoints as ckpt
from kubetuner_trainer.training.lycoris import (
    LycorisConfigError,
    lycoris_problems,
    network_from_file,
    parse_lycoris_config,
)

# SimpleTuner's sdxl.lycoris-lokr example lycoris_config.json (its values, as a user would pass them)
SDXL_LOKR = {"bypass_mode": True, "algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1,
             "factor": 12, "apply_preset": {"target_module": ["Attention"],
                                            "module_algo_map": {"Attention": {"factor": 12}}}}
LOHA = {"algo": "loha", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2,
        "apply_preset": {"target_module": ["Attention", "FeedForward"]}}
CONFIGS = {"lokr": SDXL_LOKR, "loha": LOHA}
# a parameter of each algorithm's layers, as LyCORIS names it in files
ALGO_KEYS = {"lokr": ".lokr_w1", "loha": ".hada_w1_a"}


def _config_file(tmp_path: Path, algo: str) -> str:
    path = tmp_path / f"lycoris_{algo}.json"
    path.write_text(json.dumps(CONFIGS[algo]))
    return str(path)


def _sdxl_inputs(family, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    text = family.encode_text(["a tiny photo"])
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    cond = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": time_ids}
    return latents, text["prompt_embeds"], cond


@torch.no_grad()
def _unet_out(unet, inputs) -> torch.Tensor:
    latents, embeds, cond = inputs
    return unet(latents, torch.tensor([500]), encoder_hidden_states=embeds, added_cond_kwargs=cond).sample


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_training_lowers_the_loss_and_exports_lycoris_keys(make_cfg, tmp_path, algo):
    from test_loop import fixed_eval_loss

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = make_cfg("sdxl", lora_type="lycoris", lycoris_config=_config_file(tmp_path, algo), max_train_steps=20,
                   lr_scheduler="constant", learning_rate=1e-2 if algo == "lokr" else 3e-2)
    from accelerate import Accelerator

    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = fixed_eval_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = fixed_eval_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert after < before * 0.9, (before, after)

    path = Path(cfg.output_dir) / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(path))
    assert tensors and all(k.startswith("lycoris_") for k in tensors)
    assert any(k.endswith(ALGO_KEYS[algo]) for k in tensors) and any(k.endswith(".alpha") for k in tensors)
    assert any(k.startswith("lycoris_down_blocks_") and k.endswith("_attn1_to_q" + ALGO_KEYS[algo]) for k in tensors)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["lycoris_config"])["algo"] == algo
    assert header["modelspec.architecture"].endswith("/lora")

    # A fresh base model plus the file alone (what other tools do) gives the trained outputs.
    inputs = _sdxl_inputs(family)
    trained = _unet_out(family.denoiser, inputs)
    fresh = load_family(cfg)
    base = _unet_out(fresh.denoiser, inputs)
    network_from_file(fresh.denoiser, path)
    reloaded = _unet_out(fresh.denoiser, inputs)
    assert not torch.allclose(base, trained)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


def test_lycoris_resume_is_bitwise_identical_to_a_straight_run(make_cfg, tmp_path):
    common = dict(lora_type="lycoris", lycoris_config=_config_file(tmp_path, "lokr"), max_train_steps=4,
                  learning_rate=1e-3, noise_offset=0.05, init_lokr_norm=1e-3)
    straight_cfg = make_cfg("sdxl", output_dir=str(tmp_path / "straight"), **common)
    straight, _, straight_data = train_in_process(straight_cfg)
    assert straight.exit_code == ExitCode.SUCCESS

    split_cfg = make_cfg("sdxl", output_dir=str(tmp_path / "split"), **common)
    events = RecordingEvents(stop_after=2)
    first, _, first_data = train_in_process(split_cfg, events=events)
    assert first.exit_code == ExitCode.INTERRUPTED
    resume_from = ckpt.find_resume_checkpoint(tmp_path / "split", "latest")
    assert resume_from is not None and resume_from.name == "checkpoint-2"
    assert any(k.endswith(".lokr_w2") for k in load_file(str(resume_from / "pytorch_lora_weights.safetensors")))
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"),
                                              resume=resume_from)
    assert second.exit_code == ExitCode.SUCCESS

    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_lokr_norm_starts_from_a_perturbed_normal(make_cfg, tmp_path):
    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.trainable import build_trainable

    cfg = make_cfg("sdxl", lora_type="lycoris", lycoris_config=_config_file(tmp_path, "lokr"), init_lokr_norm=1e-3)
    family = load_family(cfg)
    inputs = _sdxl_inputs(family)
    base = _unet_out(family.denoiser, inputs)
    trainable = build_trainable(family, cfg)
    trainable.attach()
    layer = trainable.network.loras[0]
    original = layer._current_weight()
    assert torch.all(layer.lokr_w1 == 1.0)
    assert layer.lokr_w2.std().item() == pytest.approx(original.std().item() * 1e-3, rel=0.05)
    assert not torch.equal(_unet_out(family.denoiser, inputs), base)  # a small, non-zero start


def test_validation_strength_scales_the_network_only_while_validating(make_cfg, tmp_path):
    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.trainable import build_trainable

    cfg = make_cfg("sdxl", lora_type="lycoris", lycoris_config=_config_file(tmp_path, "lokr"), init_lokr_norm=0.5,
                   validation_lycoris_strength=0.0)
    family = load_family(cfg)
    inputs = _sdxl_inputs(family)
    base = _unet_out(family.denoiser, inputs)
    trainable = build_trainable(family, cfg)
    trainable.attach()
    applied = _unet_out(family.denoiser, inputs)
    assert not torch.allclose(applied, base)
    with trainable.validation_context():
        torch.testing.assert_close(_unet_out(family.denoiser, inputs), base)  # strength 0: the base model
    torch.testing.assert_close(_unet_out(family.denoiser, inputs), applied)


def _example_images(folder: Path, count: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"🟫 picture {i}")


def test_simpletuners_sdxl_lokr_example_trains(tiny_model, tmp_path):
    """SimpleTuner's sdxl.lycoris-lokr example config.json with its paths swapped (and a short budget)."""
    from kubetuner_trainer.events import NullEvents
    from kubetuner_trainer.train import run

    _example_images(tmp_path / "images")
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "dreambooth", "type": "local", "instance_data_dir": str(tmp_path / "images"),
                                     "caption_strategy": "textfile"}]))
    example = {
        "aspect_bucket_rounding": 2, "caption_dropout_probability": 0.1, "checkpoint_step_interval": 50,
        "checkpoints_total_limit": 5, "disable_benchmark": False, "gradient_checkpointing": True,
        "hub_model_id": "simpletuner-example-sdxl-peft-lora", "learning_rate": 3e-7, "lora_type": "lycoris",
        "loss_type": "huber", "lr_scheduler": "constant", "max_train_steps": 100, "minimum_image_size": 0,
        "mixed_precision": "bf16", "model_family": "sdxl", "model_type": "lora", "num_train_epochs": 0,
        "optimizer": "adamw_bf16", "push_checkpoints_to_hub": False, "push_to_hub": False, "resolution": 1024,
        "resolution_type": "pixel_area", "resume_from_checkpoint": "latest", "seed": 42, "train_batch_size": 1,
        "use_ema": False, "validation_guidance": 4.2, "validation_guidance_rescale": 0.0,
        "validation_num_inference_steps": 20, "validation_prompt": "🟫 is holding a sign that says hello world from sdxl",
        "validation_resolution": "1024x1024", "validation_seed": 42, "validation_steps": 50,
        "validation_torch_compile": False,
    }
    lycoris_file = tmp_path / "lycoris_config.json"
    lycoris_file.write_text(json.dumps(SDXL_LOKR))
    swapped = {"data_backend_config": str(datasets), "lycoris_config": str(lycoris_file),
               "output_dir": str(tmp_path / "output"), "pretrained_model_name_or_path": str(tiny_model("sdxl")),
               "cache_dir": str(tmp_path / "cache")}
    # CI budget: two steps at 32 px instead of 100 at 1024 px (validation falls after the last step; the
    # example's disable_benchmark false renders the base model once at start, here 2 steps at 32 px)
    budget = {"max_train_steps": 2, "resolution": 0.001024, "resolution_type": "area",
              "validation_resolution": "32", "validation_num_inference_steps": 2}
    cfg = TrainerConfig.from_mapping({**example, **swapped, **budget})
    assert run(cfg, NullEvents()) == ExitCode.SUCCESS
    assert [p.name for p in (tmp_path / "output" / "validation" / "benchmark").iterdir()] == ["validation-32x32-0.png"]
    tensors = load_file(str(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith(".lokr_w1") for k in tensors)


def test_lycoris_config_problems_name_the_option(make_cfg, tmp_path):
    bad_algo = tmp_path / "bad.json"
    bad_algo.write_text(json.dumps({"algo": "lokx"}))
    with pytest.raises(LycorisConfigError, match="algo 'lokx' is not one of"):
        parse_lycoris_config(str(bad_algo))
    with pytest.raises(LycorisConfigError, match="apply_preset keys \\['target_modules'\\]"):
        parse_lycoris_config({"algo": "lokr", "apply_preset": {"target_modules": ["Attention"]}})
    with pytest.raises(LycorisConfigError, match="is required"):
        parse_lycoris_config(None)
    cfg = make_cfg("sdxl", lora_type="lycoris", lycoris_config=json.dumps(LOHA), init_lokr_norm=1e-3,
                   train_text_encoder=True)
    assert {p[0] for p in lycoris_problems(cfg)} == {"init_lokr_norm", "train_text_encoder"}
    assert lycoris_problems(make_cfg("sdxl", lora_type="lycoris", lycoris_config=json.dumps(SDXL_LOKR))) == []


def test_validation_renders_with_the_network_and_its_ema(tiny_model, tmp_path):
    from kubetuner_trainer.events import NullEvents
    from kubetuner_trainer.train import run

    _example_images(tmp_path / "images")
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "set", "type": "local", "instance_data_dir": str(tmp_path / "images"),
                                     "caption_strategy": "textfile"}]))
    cfg = TrainerConfig.from_mapping({
        "model_family": "sdxl", "model_type": "lora", "lora_type": "lycoris",
        "lycoris_config": json.dumps(SDXL_LOKR), "init_lokr_norm": 0.5, "validation_lycoris_strength": 0.0,
        "pretrained_model_name_or_path": str(tiny_model("sdxl")), "output_dir": str(tmp_path / "out"),
        "data_backend_config": str(datasets), "cache_dir": str(tmp_path / "cache"), "resolution": 0.001024,
        "resolution_type": "area", "max_train_steps": 2, "learning_rate": 1e-3, "use_ema": True, "optimizer": "adamw_bf16",
        "ema_validation": "comparison", "validation_step_interval": 2, "validation_prompt": "🟫 picture",
        "validation_resolution": "32", "validation_num_inference_steps": 1, "seed": 3, "mixed_precision": "no",
    })
    assert run(cfg, NullEvents()) == ExitCode.SUCCESS
    folder = Path(cfg.output_dir) / "validation" / "step-2"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["ema-validation-32x32-0.png", "validation-32x32-0.png"]
