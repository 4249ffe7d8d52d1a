"""Loop options on a tiny model: each one has an observable effect."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.training.preflight import check


def test_init_lora_starts_from_an_existing_file(make_cfg, tmp_path):
    train_in_process(make_cfg(output_dir=str(tmp_path / "first"), max_train_steps=2, learning_rate=5e-2))
    first = tmp_path / "first" / "pytorch_lora_weights.safetensors"
    from accelerate import Accelerator

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.lora import attach_lora, lora_state_dicts

    cfg = make_cfg(output_dir=str(tmp_path / "second"), init_lora=str(first))
    Accelerator(cpu=True)
    adapter = load_family(cfg)
    trained = attach_lora(adapter, cfg)
    loaded = {f"unet.{k}": v for k, v in lora_state_dicts(trained)["unet"].items()}
    expected = load_file(str(first))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("init", ["gaussian", "olora", "pissa"])
def test_lora_init_types_train(make_cfg, init):
    result, adapter, _ = train_in_process(make_cfg(lora_init_type=init, max_train_steps=1))
    assert result.exit_code == ExitCode.SUCCESS
    cfg = adapter.denoiser.peft_config["default"]
    assert cfg.init_lora_weights == (init if init != "default" else True)


def test_dora_adds_magnitude_weights(make_cfg, tmp_path):
    train_in_process(make_cfg(use_dora=True, max_train_steps=1))
    keys = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")).keys()
    assert any("magnitude" in k or "dora_scale" in k for k in keys)


def test_custom_target_modules_limit_where_lora_goes(make_cfg, tmp_path):
    train_in_process(make_cfg(peft_lora_target_modules='["to_q"]', max_train_steps=1))
    keys = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(".to_q." in k for k in keys)
    with pytest.raises(ValueError, match="no module of the UNet2DConditionModel matches"):
        train_in_process(make_cfg(peft_lora_target_modules='["not_a_layer"]', max_train_steps=1))


def test_text_encoder_learning_rate_and_groups(make_cfg):
    events = RecordingEvents()
    train_in_process(make_cfg(train_text_encoder=True, text_encoder_lr=1e-5, lr_scheduler="constant",
                              max_train_steps=1), events=events)
    assert events.steps[0].learning_rates == {"unet": pytest.approx(1e-3), "text_encoder": pytest.approx(1e-5)}


@pytest.mark.parametrize("method", ["norm", "value"])
def test_gradient_clipping_methods(make_cfg, method):
    events = RecordingEvents()
    train_in_process(make_cfg(max_grad_norm=0.5, grad_clip_method=method, max_train_steps=1), events=events)
    if method == "norm":
        assert events.steps[0].grad_norm is not None and events.steps[0].grad_norm > 0
    else:
        assert events.steps[0].grad_norm is None


def test_bf16_gradient_checkpointing_and_grads_to_none(make_cfg):
    result, adapter, _ = train_in_process(make_cfg(mixed_precision="bf16", gradient_checkpointing=True,
                                                   set_grads_to_none=True, max_train_steps=2))
    assert result.exit_code == ExitCode.SUCCESS
    assert adapter.denoiser.is_gradient_checkpointing
    base = adapter.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert base.base_layer.weight.dtype == torch.bfloat16
    assert base.lora_A["default"].weight.dtype == torch.float32
    assert all(p.grad is None for p in adapter.denoiser.parameters())


def test_gradient_checkpointing_interval_recomputes_every_nth_block(make_cfg):
    from kubetuner_trainer.models import load_family

    family = load_family(make_cfg())
    unet = family.denoiser.requires_grad_(True).train()
    latents, t, text = torch.randn(1, 4, 16, 16), torch.tensor([10]), family.encode_text(["a cat"])

    def grads() -> list[torch.Tensor]:
        unet.zero_grad()
        family.predict(unet, latents, t, text, None).square().mean().backward()
        return [p.grad.clone() for p in unet.parameters()]

    plain = grads()
    every = family.enable_gradient_checkpointing(unet, None)
    checkpointed_every = grads()
    calls, all_checkpointed = every.calls, every.checkpointed
    second = family.enable_gradient_checkpointing(unet, 2)
    checkpointed_half = grads()
    assert calls > 2 and all_checkpointed == calls  # every block of the forward pass
    assert second.calls == calls and second.checkpointed == (calls + 1) // 2
    for a, b, c in zip(plain, checkpointed_every, checkpointed_half, strict=True):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_loss_and_timestep_options_train(make_cfg):
    events = RecordingEvents()
    cfg = make_cfg(loss_type="huber", huber_schedule="snr", huber_c=0.2, snr_gamma=5.0, use_soft_min_snr=True,
                   timestep_bias_strategy="later", timestep_bias_multiplier=2.0, timestep_bias_portion=0.5,
                   disable_segmented_timestep_sampling=True, max_train_steps=2)
    train_in_process(cfg, events=events)
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in events.steps)


def test_sdxl_trains_unet_and_both_text_encoder_loras(make_cfg, tmp_path):
    sizes = [(64, 48), (32, 32), (40, 40), (32, 64)]
    result, adapter, _ = train_in_process(make_cfg("sdxl", max_train_steps=1, train_text_encoder=True),
                                          data_factory=lambda enc: InMemoryData(enc, sizes=sizes))
    assert result.exit_code == ExitCode.SUCCESS
    keys = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}


def test_kolors_unet_lora_trains_and_loads_into_the_kolors_pipeline(make_cfg, tiny_model, tmp_path):
    import numpy as np
    from diffusers import KolorsPipeline

    result, _, _ = train_in_process(make_cfg("kolors", max_train_steps=2, learning_rate=5e-2))
    assert result.exit_code == ExitCode.SUCCESS
    pipe = KolorsPipeline.from_pretrained(str(tiny_model("kolors")))

    def render():
        return pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = render()
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(render() - before).max() > 1e-3


def test_full_fine_tune_with_text_encoder_and_ema_writes_diffusers_folders(make_cfg, tmp_path):
    cfg = make_cfg(model_type="full", train_text_encoder=True, use_ema=True, max_train_steps=2,
                   checkpoint_step_interval=1)
    train_in_process(cfg)
    folder = tmp_path / "out" / "checkpoint-1"
    for name in ("unet", "unet_ema", "text_encoder"):
        assert any((folder / name).glob("*.safetensors")), name
    assert (folder / "ema.pt").is_file()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.unet is not None and (tmp_path / "out" / "unet_non_ema").is_dir()


@pytest.mark.parametrize("overrides, field", [
    ({"max_train_steps": 0, "num_train_epochs": 0}, "max_train_steps"),
    ({"ignore_final_epochs": True, "max_train_steps": 0}, "ignore_final_epochs"),
    ({"model_type": "full", "use_dora": True}, "use_dora"),
    ({"model_type": "full", "lora_format": "comfyui"}, "lora_format"),
    ({"timestep_bias_strategy": "range", "timestep_bias_begin": 800, "timestep_bias_end": 100},
     "timestep_bias_strategy"),
    ({"use_soft_min_snr": True}, "use_soft_min_snr"),
    ({"loss_type": "huber", "huber_c": 3.0}, "huber_c"),
    ({"pretrained_model_name_or_path": "/nowhere/model"}, "pretrained_model_name_or_path"),
    ({"peft_lora_target_modules": "[1]"}, "peft_lora_target_modules"),
    ({"model_flavour": "9.9"}, "model_flavour"),
    ({"model_family": "kolors", "train_text_encoder": True}, "train_text_encoder"),
])
def test_preflight_names_the_offending_option(make_cfg, overrides, field):
    with pytest.raises(ConfigError) as info:
        check(make_cfg(**overrides))
    assert field in {p.option for p in info.value.problems}


def test_fp16_and_fp8_are_refused_before_loading_on_a_machine_without_cuda(make_cfg):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16/fp8 are refused only where there is no CUDA GPU")
    for value in ("fp16", "fp8"):
        with pytest.raises(ConfigError, match="CUDA") as info:
            check(make_cfg(mixed_precision=value))
        assert "mixed_precision" in {p.option for p in info.value.problems}
