"""Runs and checkpoints lose nothing: resume after the dataset grew, exports checked at start,
unwritable outputs and broken checkpoints refused before training, readable output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import RecordingEvents, tiny_run_values, write_images

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.train import run
from kubetuner_trainer.training import checkpoints as ckpt


@pytest.fixture
def images(tmp_path) -> Path:
    return write_images(tmp_path / "images", 8)


@pytest.fixture
def run_cfg(tmp_path, tiny_model, images):
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(images),
                                   "caption_strategy": "textfile"}]))

    def make(**overrides) -> TrainerConfig:
        return TrainerConfig.from_mapping(tiny_run_values(tiny_model("sd1x"), tmp_path, config, **overrides))

    return make


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / ckpt.LORA_FILE))


def test_resume_with_more_steps_after_the_dataset_grew_reaches_the_requested_step(run_cfg, images, tmp_path):
    out = tmp_path / "out"
    first = RecordingEvents()
    assert run(run_cfg(max_train_steps=6, checkpoint_step_interval=5), first) == ExitCode.SUCCESS
    assert [r.step for r in first.steps] == [1, 2, 3, 4, 5, 6]
    step6 = _lora(out)

    write_images(images, 32, start=8)
    resumed = RecordingEvents()
    cfg = run_cfg(max_train_steps=12, checkpoint_step_interval=5, resume_from_checkpoint="latest")
    assert run(cfg, resumed) == ExitCode.SUCCESS
    assert [r.step for r in resumed.steps] == list(range(6, 13))
    assert resumed.steps[-1].max_steps == 12
    assert ckpt.read_state(out).global_step == 12  # the final model says which step it is
    step12 = _lora(out)
    assert any(not torch.equal(step6[k], step12[k]) for k in step6)


def test_a_final_model_is_never_replaced_by_an_older_one(run_cfg, tmp_path):
    out = tmp_path / "out"
    assert run(run_cfg(max_train_steps=6, checkpoint_step_interval=2), RecordingEvents()) == ExitCode.SUCCESS
    final = _lora(out)
    events = RecordingEvents()
    cfg = run_cfg(max_train_steps=5, checkpoint_step_interval=2, resume_from_checkpoint="latest")
    assert run(cfg, events) == ExitCode.CONFIG_ERROR
    assert "step 6" in events.errors[0] and "max_train_steps" in events.errors[0]
    assert not events.steps
    kept = _lora(out)
    assert all(torch.equal(final[k], kept[k]) for k in final)


def test_a_checkpoint_at_or_past_the_requested_step_is_a_config_error(run_cfg, tmp_path):
    assert run(run_cfg(max_train_steps=6, checkpoint_step_interval=4), RecordingEvents()) == ExitCode.SUCCESS
    (tmp_path / "out" / ckpt.LORA_FILE).unlink()
    (tmp_path / "out" / ckpt.STATE_FILE).unlink()
    events = RecordingEvents()
    cfg = run_cfg(max_train_steps=3, resume_from_checkpoint="latest")
    assert run(cfg, events) == ExitCode.CONFIG_ERROR
    assert "checkpoint-4" in events.errors[0] and "--max_train_steps=3" in events.errors[0]
    assert not (tmp_path / "out" / ckpt.LORA_FILE).exists()


@pytest.mark.parametrize(("options", "start", "expected"), [
    # (max_train_steps, num_train_epochs), (step, epoch, batches_in_epoch) -> (max_steps, shown epochs, limit)
    ((12, 0), (0, 0, 0), (12, 3, None)),
    ((12, 0), (5, 1, 1), (12, 3, None)),  # the run: 4 batches/epoch then, 5 now
    ((30, 0), (5, 1, 1), (30, 7, None)),
    ((0, 3), (0, 0, 0), (15, 3, 3)),
    ((0, 3), (5, 1, 1), (5 + 4 + 5, 3, 3)),  # epochs alone: the restored epoch's rest, then whole ones
    ((100, 2), (5, 1, 1), (9, 2, 2)),  # whichever comes first
])
def test_the_schedule_counts_on_from_the_restored_position(options, start, expected):
    from types import SimpleNamespace

    from kubetuner_trainer.training.loop import plan_schedule

    steps, epochs = options
    cfg = SimpleNamespace(max_train_steps=steps, num_train_epochs=epochs, gradient_accumulation_steps=1,
                          ignore_final_epochs=False)
    step, epoch, position = start
    sched = plan_schedule(cfg, 5, ckpt.TrainingState(global_step=step, epoch=epoch, batches_in_epoch=position))
    assert (sched.max_steps, sched.max_epochs, sched.epoch_limit) == expected


def test_a_resumed_run_past_its_epochs_is_a_config_error():
    from types import SimpleNamespace

    from kubetuner_trainer.config import ConfigError
    from kubetuner_trainer.training.loop import plan_schedule

    cfg = SimpleNamespace(max_train_steps=0, num_train_epochs=2, gradient_accumulation_steps=1,
                          ignore_final_epochs=False)
    with pytest.raises(ConfigError, match="checkpoint-9 already finished"):
        plan_schedule(cfg, 5, ckpt.TrainingState(global_step=9, epoch=2), "checkpoint-9")


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_every_output_file_is_readable_by_group_and_others(run_cfg, tmp_path, model_type):
    import os

    from kubetuner_trainer.files import OUTPUT_FILE_MODE

    previous = os.umask(0o022)
    try:
        cfg = run_cfg(model_type=model_type, max_train_steps=2, checkpoint_step_interval=1)
        assert run(cfg, RecordingEvents()) == ExitCode.SUCCESS
    finally:
        os.umask(previous)
    written = [p for root in ("out", "cache") for p in (tmp_path / root).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written) and any(p.name == "COMPLETE" for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert {path: mode for path, mode in modes.items() if mode != oct(OUTPUT_FILE_MODE)} == {}


def test_an_explicitly_named_broken_checkpoint_is_a_config_error_before_the_model_loads(run_cfg, tmp_path):
    from kubetuner_trainer.contract import TrainerState

    assert run(run_cfg(checkpoint_step_interval=2), RecordingEvents(stop_after=3)) == ExitCode.INTERRUPTED
    out = tmp_path / "out"
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"garbage")
    events = RecordingEvents()
    assert run(run_cfg(resume_from_checkpoint="checkpoint-2"), events) == ExitCode.CONFIG_ERROR
    assert len(events.errors) == 1
    assert f"--resume_from_checkpoint='checkpoint-2': {out / 'checkpoint-2'} cannot be used: optimizer.pt" \
        in events.errors[0]
    assert TrainerState.CACHING not in events.states and not events.steps
    events = RecordingEvents()
    assert run(run_cfg(resume_from_checkpoint=str(out / "checkpoint-7")), events) == ExitCode.CONFIG_ERROR
    assert "checkpoint-7 cannot be used: it is not a checkpoint folder" in events.errors[0]


def test_a_checkpoint_that_does_not_fit_the_run_is_a_config_error_naming_it(run_cfg, tmp_path):
    assert run(run_cfg(checkpoint_step_interval=2), RecordingEvents(stop_after=3)) == ExitCode.INTERRUPTED
    events = RecordingEvents()
    assert run(run_cfg(lora_rank=8, resume_from_checkpoint="latest"), events) == ExitCode.CONFIG_ERROR
    assert "checkpoint-3 cannot be loaded into this run" in events.errors[0]
    assert "\n  - --resume_from_checkpoint='latest'" in events.errors[0]
