"""HiDream-I1 on a tiny real model: four-encoder conditioning, the training-mode output layout, the
load-balancing loss, flow-matching training, exact resume, LoRA export and loading into HiDreamImagePipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import (
    InMemoryData,
    assert_lora_resume_is_exact,
    fixed_flow_loss,
    train_in_process,
)

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training.preflight import all_warnings, check

LENGTH = 24


def _cfg(make_cfg, **overrides):
    values = dict(tokenizer_max_length=LENGTH, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("hidream", **values)


def test_flavours_refusals_and_the_separate_llama(make_cfg, tiny_model):
    cls = family_class("hidream")
    assert resolve_source(cls, _cfg(make_cfg, pretrained_model_name_or_path=None)).model == "HiDream-ai/HiDream-I1-Full"
    assert cls.flavours["fast"] == "HiDream-ai/HiDream-I1-Fast"
    for changes, option in (({"train_text_encoder": True}, "train_text_encoder"),
                            ({"prediction_type": "epsilon"}, "prediction_type")):
        with pytest.raises(ConfigError) as info:
            check(_cfg(make_cfg, **changes))
        assert option in {p.option for p in info.value.problems}, (changes, info.value)
    warned = all_warnings(_cfg(make_cfg, hidream_load_balancing_loss_weight=0.5))
    assert "hidream_load_balancing_loss_weight" in {w.option for w in warned}
    from kubetuner_trainer.models.loading import _separate_source

    # a hub model takes its Llama from SimpleTuner's repository; a local folder holding one keeps its own
    assert _separate_source(cls, "HiDream-ai/HiDream-I1-Dev", "text_encoder_4").endswith("Llama-3.1-8B-Instruct")
    assert _separate_source(cls, str(tiny_model("hidream")), "tokenizer_4") is None


def test_conditioning_shapes_and_the_training_layout(make_cfg):
    family = load_family(_cfg(make_cfg))
    text = family.encode_text(["a red cat", ""])
    assert {k: tuple(v.shape) for k, v in text.items()} == {
        "pooled_prompt_embeds": (2, 32), "t5_prompt_embeds": (2, LENGTH, 32), "llama_prompt_embeds": (2, 2, LENGTH, 32)}
    assert not torch.allclose(text["llama_prompt_embeds"][:, 0], text["llama_prompt_embeds"][:, 1])
    for h, w in ((8, 8), (8, 12)):  # square, and non-square (padded to the transformer's max_seq)
        latents = torch.randn(2, 16, h, w)
        steps = torch.tensor([250.0, 750.0])
        with torch.no_grad():
            family.denoiser.eval()
            inference = family.predict(family.denoiser, latents, steps, text, None)
            family.denoiser.train()
            training = family.predict(family.denoiser, latents, steps, text, None)
        assert training.shape == latents.shape
        torch.testing.assert_close(training, inference, atol=1e-5, rtol=1e-4)
    family.denoiser.eval()


def test_load_balancing_loss_reaches_the_gates(make_cfg):
    from diffusers.models.transformers.transformer_hidream_image import MoEGate

    plain = load_family(_cfg(make_cfg, model_type="full"))
    balanced = load_family(_cfg(make_cfg, model_type="full", hidream_use_load_balancing_loss=True,
                                hidream_load_balancing_loss_weight=2.0))
    latents, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    steps = torch.tensor([300.0, 600.0])
    losses = []
    for family in (plain, balanced):
        family.denoiser.train().requires_grad_(True)
        text = family.encode_text(["a red cat", "a dog"])
        pred = family.predict(family.denoiser, family.objective.noisy_latents(latents, noise, steps), steps, text, None)
        loss = family.objective.loss(family.cfg, pred, family.objective.target(latents, noise, steps), steps)
        loss.backward()
        gate = next(m for m in family.denoiser.modules() if isinstance(m, MoEGate))
        losses.append((loss.item(), gate.weight.grad.clone()))
        assert not family.balance_terms  # consumed by the loss
    (plain_loss, plain_grad), (balanced_loss, balanced_grad) = losses
    # the same weights and inputs: only the weighted balance term (> 0: Σ Pᵢ·fᵢ ≥ 1 per gate) differs
    assert balanced_loss > plain_loss + 1.0
    assert not torch.allclose(plain_grad, balanced_grad)


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(make_cfg, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _cfg(make_cfg, model_type=model_type, max_train_steps=20, lora_rank=8,
               learning_rate=1e-2 if model_type == "lora" else 1e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2, size=16)
    family.denoiser.eval()
    before = fixed_flow_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    family.denoiser.eval()
    after = fixed_flow_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == 20
    assert after < before * 0.9, (before, after)


def test_lora_resume_is_exact_with_the_balancing_loss(make_cfg, tmp_path):
    assert_lora_resume_is_exact(
        lambda **kw: _cfg(make_cfg, max_train_steps=4, learning_rate=1e-3, gradient_checkpointing=True, hidream_use_load_balancing_loss=True, **kw), tmp_path,
        data_factory=lambda enc: InMemoryData(enc, size=16))


def _render(pipe) -> np.ndarray:
    pipe.default_sample_size = 8  # the pipeline renders at this canvas area (× the VAE factor); keep it tiny
    return pipe("a photo of thing 1", num_inference_steps=2, height=16, width=16, max_sequence_length=LENGTH,
                guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_lora_loads_into_the_pipeline_and_comfyui_names_match_its_layers(make_cfg, tiny_model, tmp_path):
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    common = dict(max_train_steps=2, learning_rate=5e-2, lora_alpha=8)
    data = lambda enc: InMemoryData(enc, count=2, size=16)  # noqa: E731
    result, family, _ = train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "d"), **common), data_factory=data)
    assert result.exit_code == ExitCode.SUCCESS
    plain = load_file(str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".", 1)[0] for k in plain} == {"transformer"}
    assert any(".attn1.to_out." in k for k in plain)
    pipe = HiDreamImagePipeline.from_pretrained(str(tiny_model("hidream")))
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "d"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    # validation builds the same pipeline around the trained modules
    assert type(family.build_pipeline()).__name__ == "HiDreamImagePipeline"

    # ComfyUI maps "transformer.<diffusers layer path>" onto HiDream (comfy/lora.py model_lora_keys_unet)
    train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "c"), lora_format="comfyui", **common), data_factory=data)
    comfy = load_file(str(tmp_path / "c" / "pytorch_lora_weights.safetensors"))
    fresh = HiDreamImageTransformer2DModel.from_pretrained(str(tiny_model("hidream")), subfolder="transformer")
    linear_layers = {f"transformer.{n}" for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)}
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert bases and bases <= linear_layers, sorted(bases - linear_layers)[:5]
    assert len(comfy) == len(plain) + len(bases)


def test_hidream_trains_through_kubetuner_train(tiny_model, tmp_path):
    from kubetuner_trainer.cli import main
    from kubetuner_trainer.tiny import build_tiny_dataset

    images = build_tiny_dataset(tmp_path / "images", count=4, sizes=((64, 64), (64, 48)))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(images),
                                     "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
                                     "cache_dir_vae": str(tmp_path / "cache" / "vae")},
                                    {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
                                     "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {"model_family": "hidream", "model_type": "lora", "pretrained_model_name_or_path":
              str(tiny_model("hidream")), "data_backend_config": str(datasets), "output_dir": str(tmp_path / "out"),
              "aspect_bucket_alignment": 16, "train_batch_size": 1, "max_train_steps": 2,
              "checkpoint_step_interval": 1, "mixed_precision": "no", "tokenizer_max_length": LENGTH,
              "learning_rate": 1e-3, "lora_rank": 4, "hidream_use_load_balancing_loss": True, "seed": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
