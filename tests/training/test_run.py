"""``train.run`` end to end: config → model → the real data pipeline → loop → checkpoints → resume.

Includes a two-process data-parallel run on CPU (gloo).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_helpers import RecordingEvents, tiny_run_values

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.contract import ExitCode, TrainerState
from kubetuner_trainer.train import requested_processes, run
from kubetuner_trainer.training import checkpoints as ckpt


@pytest.fixture
def image_dataset(tmp_path) -> Path:
    """Eight 32x32 images with caption files and the dataset list pointing at them."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(folder),
                                   "caption_strategy": "textfile"}]))
    return config


@pytest.fixture
def run_cfg(tmp_path, tiny_model, image_dataset):
    def make(**overrides) -> TrainerConfig:
        values = tiny_run_values(tiny_model("sd1x"), tmp_path, image_dataset, lora_dropout=0.1, **overrides)
        return TrainerConfig.from_mapping(values)

    return make


def test_run_stops_resumes_and_matches_a_straight_run(run_cfg, tmp_path):
    straight_events = RecordingEvents()
    assert run(run_cfg(output_dir=str(tmp_path / "straight")), straight_events) == ExitCode.SUCCESS
    assert [r.step for r in straight_events.steps] == [1, 2, 3, 4]
    assert straight_events.states[-1] == TrainerState.FINISHED

    cfg = run_cfg(output_dir=str(tmp_path / "split"))
    stopping = RecordingEvents(stop_after=2)
    assert run(cfg, stopping) == ExitCode.INTERRUPTED
    assert [c.step for c in stopping.checkpoints] == [2]
    resumed = RecordingEvents()
    assert run(cfg.replace(resume_from_checkpoint="latest"), resumed) == ExitCode.SUCCESS
    assert [r.step for r in resumed.steps] == [3, 4]

    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.loss for r in stopping.steps + resumed.steps] == [r.loss for r in straight_events.steps]


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(run_cfg, tmp_path):
    cfg = run_cfg(checkpoint_step_interval=1)
    assert run(cfg, RecordingEvents(stop_after=3)) == ExitCode.INTERRUPTED
    out = tmp_path / "out"
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2, 3]
    (out / "checkpoint-3" / "optimizer.pt").write_bytes(b"garbage")
    events = RecordingEvents()
    assert run(cfg.replace(resume_from_checkpoint="latest"), events) == ExitCode.SUCCESS
    assert [r.step for r in events.steps] == [3, 4]  # continued after checkpoint-2


def test_bad_configuration_exits_with_config_error(run_cfg):
    events = RecordingEvents()
    cfg = run_cfg(max_train_steps=0, num_train_epochs=1, ignore_final_epochs=True)
    assert run(cfg, events) == ExitCode.CONFIG_ERROR
    assert "ignore_final_epochs" in events.errors[0]


def test_a_model_folder_without_its_denoiser_is_a_config_error(run_cfg, tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_model("sd1x"), broken)
    shutil.rmtree(broken / "unet")
    events = RecordingEvents()
    assert run(run_cfg(pretrained_model_name_or_path=str(broken)), events) == ExitCode.CONFIG_ERROR
    assert f"{broken} has no unet/ folder" in events.errors[0]
    assert "pretrained_model_name_or_path" in events.errors[0]


def test_training_num_processes_overrides_the_option(run_cfg, monkeypatch):
    cfg = run_cfg(num_processes=3)
    assert requested_processes(cfg, {}) == 3
    assert requested_processes(cfg, {"TRAINING_NUM_PROCESSES": "2"}) == 2
    from kubetuner_trainer.config import ConfigError

    with pytest.raises(ConfigError, match="num_processes"):
        requested_processes(cfg, {"TRAINING_NUM_PROCESSES": "two"})


def test_two_processes_train_in_sync_over_gloo(run_cfg, tmp_path):
    events = RecordingEvents()
    cfg = run_cfg(num_processes=2, max_train_steps=3, checkpoint_step_interval=2, seed_for_each_device=True)
    assert run(cfg, events) == ExitCode.SUCCESS
    assert [r.step for r in events.steps] == [1, 2, 3]  # relayed from rank 0 only
    assert [c.step for c in events.checkpoints] == [2]
    folder = tmp_path / "out" / "checkpoint-2"
    assert ckpt.verify_checkpoint(folder) is None
    r0 = ckpt.read_torch(folder / "rank-0.pt")
    r1 = ckpt.read_torch(folder / "rank-1.pt")
    assert r0["params_checksum"] == r1["params_checksum"]  # gradients were all-reduced
    assert r0["data"] != r1["data"] or r0["generator"].ne(r1["generator"]).any()
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])  # seed_for_each_device
    assert ckpt.read_state(folder).world_size == 2
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_a_stop_request_reaches_every_process_and_the_run_resumes(run_cfg, tmp_path):
    cfg = run_cfg(num_processes=2, max_train_steps=4)
    stopping = RecordingEvents(stop_after=1)
    assert run(cfg, stopping) == ExitCode.INTERRUPTED
    (step, folder), = ckpt.list_checkpoints(tmp_path / "out")
    assert ckpt.verify_checkpoint(folder) is None and 1 <= step < 4
    assert {p.name for p in folder.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    r0, r1 = (ckpt.read_torch(folder / f"rank-{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])  # seed_for_each_device: SimpleTuner's default
    resumed = RecordingEvents()
    assert run(cfg.replace(resume_from_checkpoint="latest"), resumed) == ExitCode.SUCCESS
    assert [r.step for r in resumed.steps] == list(range(step + 1, 5))


def test_validation_images_are_rendered_when_due(run_cfg, tmp_path):
    class Events(RecordingEvents):
        def __init__(self):
            super().__init__()
            self.validations = []

        def validation(self, step, images, *, seconds):
            self.validations.append((step, list(images)))

    events = Events()
    cfg = run_cfg(max_train_steps=2, validation_prompt="a photo of thing 1", validation_step_interval=2,
                  validation_num_inference_steps=2, validation_resolution="32", use_ema=True)
    assert run(cfg, events) == ExitCode.SUCCESS
    (step, images), = events.validations
    assert step == 2 and images
    assert all(Path(p).is_file() and Image.open(p).size == (32, 32) for p in images)
    assert TrainerState.VALIDATING in events.states


def test_a_failing_worker_fails_the_distributed_run_with_its_traceback(run_cfg, tmp_path):
    broken = tmp_path / "broken.safetensors"  # passes the start-up checks (it exists), fails in every worker
    broken.write_text("not a safetensors file")
    events = RecordingEvents()
    with pytest.raises(RuntimeError, match="distributed training failed") as info:
        run(run_cfg(num_processes=2, init_lora=str(broken)), events)
    message = str(info.value)
    assert "OSError" in message and str(broken) in message
    assert "process 0 failed" in message and "process 1 failed" in message and "Traceback" in message
    assert events.errors


def test_startup_and_ema_comparison_validation_render_through_the_loop(run_cfg, tmp_path):
    cfg = run_cfg(
        model_type="full", use_ema=True, ema_decay=0.5, ema_validation="comparison", validation_on_startup=True,
        validation_step_interval=2, validation_prompt="a red circle", validation_resolution="32",
        validation_num_inference_steps=1, max_train_steps=2,
    )
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.SUCCESS
    root = Path(cfg.output_dir) / "validation"
    for step in (0, 2):
        names = sorted(p.name for p in (root / f"step-{step}").glob("*.png"))
        assert names == ["ema-validation-32x32-0.png", "validation-32x32-0.png"], (step, names)
    live = np.asarray(Image.open(root / "step-2" / "validation-32x32-0.png"))
    ema = np.asarray(Image.open(root / "step-2" / "ema-validation-32x32-0.png"))
    assert not np.array_equal(live, ema)  # the EMA weights lag the live ones
    assert events.states.count(TrainerState.VALIDATING) == 2
