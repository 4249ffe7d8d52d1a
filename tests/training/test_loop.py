"""The training loop on tiny real models: learning, exact resume, stop requests, checkpoint limits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.training import checkpoints as ckpt


@torch.no_grad()
def fixed_eval_loss(family, data: InMemoryData) -> float:
    """Mean loss of the family's objective over the training images at fixed noise levels and noise."""
    gen = torch.Generator().manual_seed(123)
    batch = next(iter(InMemoryDataView(data)))
    objective, total = family.objective, 0.0
    levels = objective.eval_timesteps(4)
    for t in levels:
        noise = torch.randn(batch["latents"].shape, generator=gen)
        steps = torch.full((batch["latents"].shape[0],), t, dtype=objective.timestep_dtype)
        noisy = objective.noisy_latents(batch["latents"], noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, batch["text"], None)
        total += float(torch.nn.functional.mse_loss(pred, objective.target(batch["latents"], noise, steps)))
    return total / len(levels)


class InMemoryDataView:
    """All samples of an InMemoryData as one batch (without touching its position)."""

    def __init__(self, data: InMemoryData):
        self.data = data

    def __iter__(self):
        d = self.data
        yield {"latents": d.latents, "text": {k: torch.stack([t[k] for t in d.text]) for k in d.text[0]}}


FAMILY_OPTIONS = {"sd1x": {}, "flux": {"tokenizer_max_length": 16}}


@pytest.mark.parametrize("family, model_type", [("sd1x", "lora"), ("sd1x", "full"), ("flux", "lora"),
                                                ("flux", "full")])
def test_training_lowers_the_loss_on_a_tiny_overfit_set(make_cfg, family, model_type):
    cfg = make_cfg(family, model_type=model_type, max_train_steps=30, lr_scheduler="constant", lora_rank=8,
                   learning_rate=1e-2 if model_type == "lora" else 5e-4, **FAMILY_OPTIONS[family])
    before_holder = {}

    def data_factory(encoders):
        data = InMemoryData(encoders, count=2, batch_size=2)
        return data

    from accelerate import Accelerator

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.loop import TrainingLoop

    adapter = load_family(cfg)
    data = data_factory(adapter.encoders())
    before_holder["loss"] = fixed_eval_loss(adapter, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), adapter, data, seed=7).run()
    after = fixed_eval_loss(adapter, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert after < before_holder["loss"] * 0.9, (before_holder["loss"], after)
    out = cfg.output_dir
    if model_type == "lora":
        assert (ckpt.Path(out) / "pytorch_lora_weights.safetensors").is_file()
    else:
        index = json.loads((ckpt.Path(out) / "model_index.json").read_text())
        assert index["_class_name"] == adapter.pipeline_class


def _lora_tensors(path):
    return load_file(str(path))


@pytest.mark.parametrize("family, model_type, accumulation", [
    ("sd1x", "lora", 1), ("sd1x", "lora", 2), ("sd1x", "full", 1), ("flux", "lora", 1), ("flux", "full", 1)])
def test_resume_after_a_stop_is_bitwise_identical_to_a_straight_run(make_cfg, tmp_path, family, model_type,
                                                                    accumulation):
    common = dict(model_type=model_type, max_train_steps=6, lora_dropout=0.1, noise_offset=0.05,
                  input_perturbation=0.05, use_ema=model_type == "full", learning_rate=1e-3,
                  gradient_accumulation_steps=accumulation, train_text_encoder=model_type == "full",
                  **FAMILY_OPTIONS[family])
    if family == "flux":  # random guidance and masked attention take part in an exact resume too
        common.update(flux_guidance_mode="random-range", flux_attention_masked_training=True)
    straight_cfg = make_cfg(family, output_dir=str(tmp_path / "straight"), **common)
    straight, _, straight_data = train_in_process(straight_cfg)
    assert straight.exit_code == ExitCode.SUCCESS

    split_cfg = make_cfg(family, output_dir=str(tmp_path / "split"), **common)
    events = RecordingEvents(stop_after=3)
    first, _, first_data = train_in_process(split_cfg, events=events)
    assert first.exit_code == ExitCode.INTERRUPTED
    assert [c.step for c in events.checkpoints] == [3]
    resume_from = ckpt.find_resume_checkpoint(tmp_path / "split", "latest")
    assert resume_from is not None and resume_from.name == "checkpoint-3"
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"),
                                              resume=resume_from)
    assert second.exit_code == ExitCode.SUCCESS

    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    if model_type == "lora":
        a = _lora_tensors(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
        b = _lora_tensors(tmp_path / "split" / "pytorch_lora_weights.safetensors")
    else:
        denoiser = "transformer" if family == "flux" else "unet"
        a = _lora_tensors(tmp_path / "straight" / denoiser / "diffusion_pytorch_model.safetensors")
        b = _lora_tensors(tmp_path / "split" / denoiser / "diffusion_pytorch_model.safetensors")
        te_a = _lora_tensors(tmp_path / "straight" / "text_encoder" / "model.safetensors")
        te_b = _lora_tensors(tmp_path / "split" / "text_encoder" / "model.safetensors")
        assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_layout_manifest_and_total_limit(make_cfg, tmp_path):
    cfg = make_cfg(max_train_steps=5, checkpoint_step_interval=1, checkpoints_total_limit=2,
                   modelspec_comment="run {env:KT_TEST_RUN}")
    import os

    os.environ["KT_TEST_RUN"] = "r42"
    try:
        result, _, _ = train_in_process(cfg, events=RecordingEvents())
    finally:
        del os.environ["KT_TEST_RUN"]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-4", "checkpoint-5"]  # the interval falls on the last step too, as in SimpleTuner
    assert not list(out.glob(".tmp-*"))
    folder = out / "checkpoint-5"
    for name in ("pytorch_lora_weights.safetensors", "optimizer.pt", "scheduler.pt", "rank-0.pt",
                 "training_state.json", "manifest.json", "COMPLETE"):
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(manifest) == {"pytorch_lora_weights.safetensors", "optimizer.pt", "scheduler.pt", "rank-0.pt",
                             "training_state.json"}
    assert ckpt.verify_checkpoint(folder) is None
    assert ckpt.read_state(folder).global_step == 5
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.comment"] == "run r42"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_rolling_checkpoints_are_pruned_separately(make_cfg, tmp_path):
    cfg = make_cfg(max_train_steps=7, checkpoint_step_interval=3, checkpointing_rolling_steps=1,
                   checkpoints_rolling_total_limit=2, checkpoints_total_limit=5)
    train_in_process(cfg)
    out = tmp_path / "out"
    steps = {s: ckpt.read_state(p).kind for s, p in ckpt.list_checkpoints(out)}
    assert steps == {3: "interval", 5: "rolling", 6: "interval", 7: "rolling"}


def test_epoch_interval_checkpoints_and_epoch_count(make_cfg, tmp_path):
    cfg = make_cfg(max_train_steps=0, num_train_epochs=3, checkpoint_epoch_interval=1)
    events = RecordingEvents()
    result, _, data = train_in_process(cfg, events=events)
    # 4 images, batch 2 → 2 steps per epoch, 3 epochs
    assert [r.step for r in events.steps] == [1, 2, 3, 4, 5, 6]
    assert [r.epoch for r in events.steps] == [1, 1, 2, 2, 3, 3]
    assert [c.step for c in events.checkpoints] == [2, 4, 6]  # the last epoch's end too
    assert result.state.epoch == 3


def test_gradient_accumulation_counts_optimizer_steps(make_cfg):
    cfg = make_cfg(max_train_steps=2, gradient_accumulation_steps=2)
    events = RecordingEvents()
    result, _, data = train_in_process(cfg, data_factory=lambda enc: InMemoryData(enc, count=8, batch_size=2),
                                       events=events)
    assert [r.step for r in events.steps] == [1, 2]
    assert len(data.seen) == 4  # two micro-batches per optimizer step


def test_ignore_final_epochs_trains_past_the_epoch_count(make_cfg):
    cfg = make_cfg(max_train_steps=5, num_train_epochs=1, ignore_final_epochs=True)
    events = RecordingEvents()
    train_in_process(cfg, events=events)
    assert events.steps[-1].step == 5 and events.steps[-1].epoch == 3


def test_masks_weight_the_loss(make_cfg):
    def masked(value):
        return lambda enc: InMemoryData(enc, masks=torch.full((4, 1, 32, 32), value))

    zero = RecordingEvents()
    train_in_process(make_cfg(max_train_steps=2), data_factory=masked(0.0), events=zero)
    assert [r.loss for r in zero.steps] == [0.0, 0.0]  # nothing inside the mask, nothing to learn
    skipped = RecordingEvents()
    train_in_process(make_cfg(max_train_steps=2, masked_loss_probability=0.0), data_factory=masked(0.0),
                     events=skipped)
    assert all(r.loss > 0 for r in skipped.steps)  # probability 0: the full image counts
