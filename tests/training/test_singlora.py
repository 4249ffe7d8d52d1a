"""SingLoRA (``--peft_lora_mode singlora``): it trains, ramps in over its steps and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.training import checkpoints as ckpt


def test_singlora_trains_and_saves_its_layers(make_cfg):
    from accelerate import Accelerator
    from peft_singlora import SingLoRALayer
    from test_loop import fixed_eval_loss

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = make_cfg(peft_lora_mode="singlora", singlora_ramp_up_steps=5, max_train_steps=30, lr_scheduler="constant",
                   lora_rank=8, learning_rate=3e-2)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = fixed_eval_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = fixed_eval_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert after < before * 0.9, (before, after)
    layers = [m for m in family.denoiser.modules() if isinstance(m, SingLoRALayer)]
    assert layers and all(float(m.training_step_default) == 30 for m in layers)
    path = ckpt.Path(cfg.output_dir) / ckpt.LORA_FILE
    tensors = load_file(str(path))
    assert any(k.startswith("unet.") and k.endswith(".lora_A") for k in tensors)
    assert not any("lora_B" in k for k in tensors)  # one matrix per layer
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["peft_lora_mode"] == "singlora"


def test_singlora_ramps_its_update_in_over_the_ramp_steps(make_cfg):
    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.trainable import build_trainable

    cfg = make_cfg(peft_lora_mode="singlora", singlora_ramp_up_steps=4)
    family = load_family(cfg)
    trainable = build_trainable(family, cfg)
    trainable.attach()
    layer = next(m for m in family.denoiser.modules() if hasattr(m, "training_step_default"))
    assert layer.ramp_up_steps == 4  # the option reaches the layers (the library alone leaves 1000)
    deltas = []
    for step in (0, 1, 2, 4, 8):
        trainable.after_step(step)
        deltas.append(layer._get_update_weight("default"))
    full = deltas[3]
    assert torch.count_nonzero(deltas[0]) == 0  # nothing at step 0
    torch.testing.assert_close(deltas[1], full * 0.25)
    torch.testing.assert_close(deltas[2], full * 0.5)
    torch.testing.assert_close(deltas[4], full)  # capped at 1 after the ramp


def test_singlora_resume_is_bitwise_identical_to_a_straight_run(make_cfg, tmp_path):
    common = dict(peft_lora_mode="singlora", singlora_ramp_up_steps=5, max_train_steps=4, learning_rate=1e-3)
    straight, _, straight_data = train_in_process(make_cfg(output_dir=str(tmp_path / "straight"), **common))
    assert straight.exit_code == ExitCode.SUCCESS
    split_cfg = make_cfg(output_dir=str(tmp_path / "split"), **common)
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2))
    assert first.exit_code == ExitCode.INTERRUPTED
    resume_from = ckpt.find_resume_checkpoint(tmp_path / "split", "latest")
    second, _, _ = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume_from)
    assert second.exit_code == ExitCode.SUCCESS
    assert first.losses + second.losses == straight.losses
    a = load_file(str(tmp_path / "straight" / ckpt.LORA_FILE))
    b = load_file(str(tmp_path / "split" / ckpt.LORA_FILE))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("option", "value"), [("lora_init_type", "pissa"), ("use_dora", True)])
def test_singlora_refuses_what_it_cannot_honour(make_cfg, option, value):
    from kubetuner_trainer.training.singlora import singlora_problems

    (problem,) = singlora_problems(make_cfg(peft_lora_mode="singlora", **{option: value}))
    assert problem[0] == option


@pytest.mark.parametrize("family_name", ["sd1x", "sdxl"])
def test_slider_lora_target_routes_lora_to_slider_layers(make_cfg, family_name):
    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.trainable import build_trainable

    cfg = make_cfg(family_name, slider_lora_target=True)
    family = load_family(cfg)
    build_trainable(family, cfg).attach()
    adapted = {name.rsplit(".lora_A", 1)[0] for name, p in family.denoiser.named_parameters()
               if p.requires_grad and ".lora_A" in name}
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} <= adapted
    assert any(n.endswith("attn1.to_q") for n in adapted) and any(n.endswith(".proj_in") for n in adapted)
    assert not any(".attn2." in n for n in adapted)  # cross-attention stays frozen


def test_slider_lora_target_on_the_sd3_transformer(make_cfg):
    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.trainable import build_trainable

    cfg = make_cfg("sd3", slider_lora_target=True)
    family = load_family(cfg)
    build_trainable(family, cfg).attach()
    adapted = {name.rsplit(".lora_A", 1)[0] for name, p in family.denoiser.named_parameters()
               if p.requires_grad and ".lora_A" in name}
    assert {"pos_embed.proj", "proj_out", "time_text_embed.timestep_embedder.linear_1"} <= adapted
    assert any(n.endswith(".attn.to_q") for n in adapted)
    assert not any(".attn2." in n or "add_q_proj" in n for n in adapted)  # the text stream stays frozen
