"""SD3 on a tiny real model: conditioning, flow-matching training, resume, LoRA export and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training import checkpoints as ckpt

CLIP_TOKENS = 77


def _sd3_cfg(make_cfg, **overrides):
    values = dict(tokenizer_max_length=16, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("sd3", **values)


def _parts(embeds: torch.Tensor, clip_width: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP part [B, 77, clip_width], T5 part [B, L, d]) of SD3 prompt embeddings."""
    return embeds[:, :CLIP_TOKENS, :clip_width], embeds[:, CLIP_TOKENS:]


def test_flavours_name_simpletuners_sd3_hub_ids(make_cfg):
    cls = family_class("sd3")
    assert cls.default_flavour == "medium"
    src = resolve_source(cls, _sd3_cfg(make_cfg, pretrained_model_name_or_path=None, model_flavour="large"))
    assert src.model == "stabilityai/stable-diffusion-3.5-large"
    problems = cls.config_problems(_sd3_cfg(make_cfg, tokenizer_max_length=300))
    assert [p.option for p in problems] == ["tokenizer_max_length"]
    assert not cls.config_problems(_sd3_cfg(make_cfg, tokenizer_max_length=300, i_know_what_i_am_doing=True))


def test_conditioning_shapes_padding_and_uncond_behaviours(make_cfg):
    family = load_family(_sd3_cfg(make_cfg))
    prompts = ["a red cat", ""]
    text = family.encode_text(prompts)
    assert text["prompt_embeds"].shape == (2, CLIP_TOKENS + 16, 48)
    assert text["pooled_prompt_embeds"].shape == (2, 40)
    clip, t5 = _parts(text["prompt_embeds"])
    assert torch.count_nonzero(text["prompt_embeds"][:, :CLIP_TOKENS, 40:]) == 0  # CLIP padded up to the T5 width
    assert torch.count_nonzero(t5[0, 12:]) > 0  # unmodified: T5 padding positions keep their states

    zeroed = load_family(_sd3_cfg(make_cfg, t5_padding="zero")).encode_text(prompts)
    _, t5_zero = _parts(zeroed["prompt_embeds"])
    tokens = len(family.tokenizers[2]("a red cat").input_ids)  # with </s>
    assert torch.count_nonzero(t5_zero[0, tokens:]) == 0 and torch.count_nonzero(t5_zero[0, :tokens]) > 0
    torch.testing.assert_close(t5_zero[0, :tokens], t5[0, :tokens])

    cases = {("zero", None): (True, True), ("zero", "empty_string"): (True, False),
             ("empty_string", "zero"): (False, True), ("empty_string", None): (False, False)}
    for (clip_rule, t5_rule), (clip_zero, t5_zero_expected) in cases.items():
        out = load_family(_sd3_cfg(make_cfg, sd3_clip_uncond_behaviour=clip_rule,
                                   sd3_t5_uncond_behaviour=t5_rule)).encode_text(prompts)
        clip_u, t5_u = _parts(out["prompt_embeds"])
        assert (torch.count_nonzero(clip_u[1]) == 0) == clip_zero, (clip_rule, t5_rule)
        assert (torch.count_nonzero(out["pooled_prompt_embeds"][1]) == 0) == clip_zero
        assert (torch.count_nonzero(t5_u[1]) == 0) == t5_zero_expected, (clip_rule, t5_rule)
        torch.testing.assert_close(out["prompt_embeds"][0], text["prompt_embeds"][0])  # captions untouched


@torch.no_grad()
def _fixed_flow_loss(family, data: InMemoryData) -> float:
    """Mean velocity loss over the training images at fixed sigmas and fixed noise."""
    gen = torch.Generator().manual_seed(123)
    latents = data.latents
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for sigma in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.full((latents.shape[0],), sigma * 1000.0)
        noisy = family.objective.noisy_latents(latents, noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, text, None)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(latents, noise, steps)))
    return total / 4


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(make_cfg, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _sd3_cfg(make_cfg, model_type=model_type, max_train_steps=20, lora_rank=8,
                   learning_rate=1e-2 if model_type == "lora" else 1e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = _fixed_flow_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = _fixed_flow_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == 20
    assert after < before * 0.9, (before, after)


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_resume_is_exact(make_cfg, tmp_path, model_type):
    common = dict(model_type=model_type, max_train_steps=4, learning_rate=1e-3, use_ema=model_type == "full",
                  train_text_encoder=model_type == "lora", gradient_checkpointing=True)
    straight, _, straight_data = train_in_process(_sd3_cfg(make_cfg, output_dir=str(tmp_path / "a"), **common))
    split_cfg = _sd3_cfg(make_cfg, output_dir=str(tmp_path / "b"), **common)
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2))
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume)
    assert second.exit_code == ExitCode.SUCCESS
    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    name = "pytorch_lora_weights.safetensors" if model_type == "lora" else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def _render(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, generator=gen,
                max_sequence_length=16, output_type="np").images[0]


def test_saved_lora_loads_into_the_sd3_pipeline_and_changes_its_output(make_cfg, tiny_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cfg = _sd3_cfg(make_cfg, max_train_steps=3, learning_rate=5e-2, lora_alpha=8, train_text_encoder=True)
    result, _, _ = train_in_process(cfg)
    assert result.exit_code == ExitCode.SUCCESS
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}  # never T5

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_model("sd3")))
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8
    assert "default_0" in pipe.text_encoder_2.peft_config
