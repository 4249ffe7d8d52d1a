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


@pytest.fixture
def other_user():
    """Run a block as a user that does not own ``tmp_path`` (root drops its effective uid to nobody)."""
    import contextlib
    import os

    @contextlib.contextmanager
    def become():
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)

    return become


def test_a_folder_this_user_cannot_write_is_named(tmp_path, other_user):
    import os
    import shutil
    import tempfile

    from kubetuner_trainer.files import writable_problem

    root = Path(tempfile.mkdtemp(prefix="kt-writable-"))  # pytest's own tmp root is private to its user
    try:
        os.chmod(root, 0o755)
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        os.chmod(locked, 0o555)
        (root / "file").write_text("x")
        with other_user():
            denied = writable_problem(locked / "out")
            denied_existing = writable_problem(locked)
            unreachable = writable_problem(tmp_path / "out")
        assert denied is not None and denied.startswith(f"{locked} is not writable by this user (uid ")
        assert denied_existing is not None and str(locked) in denied_existing
        if os.geteuid() == 0:
            assert unreachable is not None and "cannot be reached by this user" in unreachable
        assert writable_problem(root / "file" / "out") == f"{root / 'file'} is a file, not a folder"
        assert writable_problem(root / "new" / "deeper") is None
        assert writable_problem(root) is None
        assert sorted(p.name for p in root.iterdir()) == ["file", "locked"]  # the probes left nothing
    finally:
        os.chmod(root / "locked", 0o755)
        shutil.rmtree(root)


@pytest.mark.parametrize("option", ["output_dir", "cache_dir"])
def test_an_unwritable_output_or_cache_folder_is_a_config_error_before_the_model_loads(run_cfg, tmp_path, option):
    from kubetuner_trainer.contract import TrainerState

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    events = RecordingEvents()
    assert run(run_cfg(**{option: str(blocker / "sub")}), events) == ExitCode.CONFIG_ERROR
    assert f"--{option}='{blocker / 'sub'}': {blocker} is a file, not a folder" in events.errors[0]
    assert TrainerState.CACHING not in events.states


def _comfyui_clip_keys(layers: int, prefix: str) -> set[str]:
    """Every CLIP layer name ComfyUI maps for a text encoder (its LORA_CLIP_MAP, layers 0..n-1)."""
    names = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
    return {f"{prefix}_text_model_encoder_layers_{i}_{n}" for i in range(layers) for n in names}


def test_comfyui_export_with_a_trained_text_encoder_uses_comfyuis_clip_names(run_cfg, tmp_path):
    out = tmp_path / "out"
    cfg = run_cfg(lora_format="comfyui", train_text_encoder=True, max_train_steps=1)
    assert run(cfg, RecordingEvents()) == ExitCode.SUCCESS
    saved = _lora(out)
    text = {k.split(".")[0] for k in saved if k.startswith("lora_te")}
    assert text and text <= _comfyui_clip_keys(8, "lora_te")
    assert {f"{layer}.{part}" for layer in text for part in ("lora_down.weight", "lora_up.weight", "alpha")} \
        <= set(saved)
    assert all(k.startswith(("lora_te_", "lora_unet_")) for k in saved)
    diffusers = load_file(str(out / ckpt.DIFFUSERS_LORA_FILE))  # written first: the weights survive any conversion
    assert {k.split(".")[0] for k in diffusers} == {"unet", "text_encoder"}
    assert len(diffusers) * 3 // 2 == len(saved)  # down+up per layer there; down+up+alpha here


def test_an_export_that_would_fail_is_a_config_error_before_the_first_step(run_cfg, monkeypatch):
    from kubetuner_trainer.models import family_class

    # a text-encoder layer ComfyUI has no name for: its weights could never be exported
    monkeypatch.setattr(family_class("sd1x"), "text_encoder_lora_targets", ("q_proj", "token_embedding"))
    events = RecordingEvents()
    cfg = run_cfg(lora_format="comfyui", train_text_encoder=True, max_train_steps=2)
    assert run(cfg, events) == ExitCode.CONFIG_ERROR
    assert "--lora_format='comfyui': the trained weights cannot be saved this way" in events.errors[0]
    assert "token_embedding" in events.errors[0]
    assert not events.steps


def test_a_comfyui_checkpoint_with_a_text_encoder_loads_back_exactly(make_cfg, tmp_path):
    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.trainable import build_trainable

    cfg = make_cfg(lora_format="comfyui", train_text_encoder=True)
    trainable = build_trainable(load_family(cfg, weight_dtype=torch.float32), cfg)
    trainable.attach()
    trained = [p for m in trainable.modules.values() for p in m.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn_like(p) * 0.1)
    saved = [p.detach().clone() for p in trained]
    trainable.save(tmp_path / "ck", title="t")
    with torch.no_grad():
        for p in trained:
            p.zero_()
    trainable.load(tmp_path / "ck")  # what a resume does
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(saved, trained, strict=True))
