"""Evaluation loss on a held-out dataset: schedule, hold-out, determinism, reporting, resume.

End-to-end tests run ``train.run`` / the loop with a tiny real SD 1.x model and the real data pipeline.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from training_helpers import RecordingEvents, tiny_run_values, train_in_process

from kubetuner_trainer.config import ConfigError, TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.dataset_config import load_dataset_config
from kubetuner_trainer.data.evaluation import eval_dataset_ids
from kubetuner_trainer.train import run
from kubetuner_trainer.training.evaluation import (
    EvalSchedule,
    eval_timesteps,
    plan_eval_schedule,
    sample_noise,
)


def _images(folder: Path, count: int, seed: int, prefix: str) -> None:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB").save(folder / f"{prefix}{i}.png")
        (folder / f"{prefix}{i}.txt").write_text(f"a {prefix} picture number {i}")


@pytest.fixture
def datasets(tmp_path) -> Path:
    """A training dataset (8 images), two held-out candidates (4 images each) and the dataset list."""
    _images(tmp_path / "train", 8, 0, "train")
    _images(tmp_path / "held", 4, 1, "held")
    _images(tmp_path / "held2", 4, 2, "other")
    entries = [{"id": name, "type": "local", "instance_data_dir": str(tmp_path / name), "caption_strategy": "textfile"}
               for name in ("train", "held", "held2")]
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps(entries))
    return config


@pytest.fixture
def eval_cfg(tmp_path, tiny_model, datasets):
    def make(**overrides) -> TrainerConfig:
        values = tiny_run_values(
            tiny_model("sd1x"), tmp_path, datasets, learning_rate=1e-2, lora_dropout=0.1, seed=3,
            eval_dataset_id="held", eval_steps_interval=2, eval_timesteps=3,
        )
        values.update(overrides)
        return TrainerConfig.from_mapping(values)

    return make


# ----- the schedule and the fixed inputs (pure) -------------------------------------------------

def _due(schedule: EvalSchedule, steps: int) -> list[int]:
    return [s for s in range(1, steps + 1) if schedule.due(s)]


def test_step_interval_schedule():
    assert _due(EvalSchedule(3, None, 10), 10) == [3, 6, 9]


@pytest.mark.parametrize(("epochs", "updates", "expected"), [
    ("0.5", 4, [2, 4, 6, 8]),   # twice per epoch
    ("1", 4, [4, 8]),           # at each epoch's last step
    ("1.5", 2, [3, 6]),
    ("0.25", 2, [1, 2, 3, 4, 5, 6, 7, 8]),  # more often than steps: every step
    ("0.4", 5, [2, 4, 6, 8, 10]),
])
def test_fractional_epoch_interval_schedule(epochs, updates, expected):
    assert _due(EvalSchedule(None, Fraction(epochs), updates), 2 * updates if updates > 2 else 8) == expected


def test_both_intervals_run_on_either_schedule_and_neither_means_every_epoch(make_cfg, caplog):
    both = plan_eval_schedule(make_cfg(eval_steps_interval=3, eval_epoch_interval=1.0), 4)
    assert _due(both, 8) == [3, 4, 6, 8]
    assert "both" in caplog.text
    assert _due(plan_eval_schedule(make_cfg(), 5), 10) == [5, 10]


def test_timesteps_are_spread_over_the_schedule_and_noise_is_fixed():
    assert eval_timesteps(4, 1000) == [125, 375, 625, 875]
    assert eval_timesteps(5000, 10) == list(range(10))  # at most one per timestep
    a = sample_noise((4, 4, 4), seed=1, dataset_id="d", key="x.png", timestep_index=0)
    assert a.equal(sample_noise((4, 4, 4), seed=1, dataset_id="d", key="x.png", timestep_index=0))
    for other in ({"seed": 2}, {"key": "y.png"}, {"timestep_index": 1}):
        args = {"seed": 1, "dataset_id": "d", "key": "x.png", "timestep_index": 0, **other}
        assert not a.equal(sample_noise((4, 4, 4), **args))


# ----- configuration ----------------------------------------------------------------------------

def test_unknown_eval_dataset_id_names_the_option_and_the_known_ids(eval_cfg, datasets):
    cfg = eval_cfg(eval_dataset_id="nope")
    _, problems = eval_dataset_ids(cfg, load_dataset_config(str(datasets)))
    assert [p.option for p in problems] == ["eval_dataset_id"]
    assert "train, held, held2" in problems[0].message
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.CONFIG_ERROR  # refused before any model is loaded
    assert "eval_dataset_id" in events.errors[0] and "held2" in events.errors[0]


def test_the_only_dataset_cannot_be_the_eval_dataset(tmp_path, eval_cfg):
    _images(tmp_path / "solo", 4, 0, "solo")
    config = tmp_path / "solo.json"
    config.write_text(json.dumps([{"id": "solo", "instance_data_dir": str(tmp_path / "solo")}]))
    ids, problems = eval_dataset_ids(eval_cfg(eval_dataset_id="solo"), load_dataset_config(str(config)))
    assert ids == [] and [p.option for p in problems] == ["eval_dataset_id"]
    assert "nothing would be left to train on" in problems[0].message
    with pytest.raises(ConfigError, match="eval_dataset_id"):
        build_training_data(eval_cfg(eval_dataset_id="solo", data_backend_config=str(config)), None)


def test_eval_entries_need_images_and_do_not_count_as_training_data(tmp_path):
    from kubetuner_trainer.data.dataset_config import DatasetConfigError

    with pytest.raises(DatasetConfigError, match=r"datasets\[e\]\.instance_data_dir"):
        load_dataset_config([{"id": "e", "dataset_type": "eval"}, {"id": "t", "instance_data_dir": "x"}])
    with pytest.raises(DatasetConfigError, match="no enabled entry with dataset_type 'image'"):
        load_dataset_config([{"id": "e", "dataset_type": "eval", "instance_data_dir": "x"}])
    config = load_dataset_config([{"id": "e", "dataset_type": "eval", "instance_data_dir": "x"},
                                  {"id": "t", "instance_data_dir": "y"}])
    assert [e.id for e in config.image_datasets] == ["e", "t"]


# ----- hold-out, schedule and determinism through the loop --------------------------------------

class RecordingData:
    """Wraps the real TrainingData and remembers the paths of every training batch it hands out."""

    def __init__(self, inner):
        self.inner = inner
        self.paths: list[str] = []
        self.dataset_ids: set[str] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __iter__(self):
        for batch in self.inner:
            self.paths.extend(batch.paths)
            self.dataset_ids.update(batch.dataset_ids)
            yield batch


def test_eval_dataset_is_held_out_and_evaluated_on_schedule(eval_cfg, tmp_path):
    cfg = eval_cfg(max_train_steps=0, num_train_epochs=2, eval_steps_interval=None, eval_epoch_interval=0.5,
                   eval_dataset_pooling=True)
    recorded: list[RecordingData] = []

    def data_factory(encoders):
        recorded.append(RecordingData(build_training_data(cfg, encoders)))
        return recorded[-1]

    events = RecordingEvents()
    result, _, _ = train_in_process(cfg, data_factory=data_factory, events=events)
    data = recorded[0]
    assert data.steps_per_epoch == 6  # 8 + 4 training images, batches of 2: the held-out ones are not counted
    assert data.dataset_ids == {"train", "held2"}
    assert len(data.paths) == 24 and not any("/held/" in p for p in data.paths)
    assert data.eval_source.sample_count == 4
    assert sorted(p.rsplit("/", 1)[-1] for b in data.eval_source.batches() for p in b.paths) == \
        [f"held{i}.png" for i in range(4)]
    # every half epoch = every 3 of the 12 steps, reported with the step it followed
    assert sorted(result.eval_losses) == [3, 6, 9, 12]
    with_eval = [r.step for r in events.steps if r.loss_components]
    assert with_eval == [3, 6, 9, 12]
    assert all(set(r.loss_components) == {"eval_loss"} for r in events.steps if r.loss_components)  # pooled
    values = [result.eval_losses[s]["eval_loss"] for s in sorted(result.eval_losses)]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert len(set(values)) == len(values)  # training changes the weights, and with them the eval loss


def test_eval_loss_is_deterministic_for_the_same_weights(eval_cfg, tmp_path):
    """Two evaluations without a step in between agree exactly, and so does a fresh process-local run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.loop import TrainingLoop, weight_dtype_for

    cfg = eval_cfg(eval_steps_interval=1, eval_dataset_pooling=False)

    def evaluate_twice() -> list[dict[str, float]]:
        AcceleratorState._reset_state()
        acc = Accelerator(cpu=True)
        adapter = load_family(cfg, weight_dtype=weight_dtype_for(cfg))
        loop = TrainingLoop(cfg, acc, adapter, build_training_data(cfg, adapter.encoders()), seed=3)
        loop.setup()
        loop.state.global_step = 1  # due; no optimizer step taken
        return [loop._evaluate(), loop._evaluate()]

    first, second = evaluate_twice()
    assert first == second
    assert set(first) == {"eval_loss", "eval_loss/held"}  # not pooled: one per eval dataset as well
    assert first["eval_loss"] == first["eval_loss/held"]
    assert evaluate_twice() == [first, first]


def _eval_typed(tmp_path: Path, datasets: Path) -> str:
    """The same folders, with "held" and "held2" marked as evaluation datasets; held2 has 3 images."""
    entries = json.loads(datasets.read_text())
    for entry in entries[1:]:
        entry["dataset_type"] = "eval"
    (tmp_path / "held2" / "other3.png").unlink()
    path = tmp_path / "eval-typed.json"
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.mark.parametrize("pooled", [False, True])
def test_eval_typed_datasets_are_held_out_and_reported_each_unless_pooled(eval_cfg, datasets, tmp_path, pooled):
    cfg = eval_cfg(data_backend_config=_eval_typed(tmp_path, datasets), eval_dataset_id=None, max_train_steps=1,
                   eval_steps_interval=1, eval_dataset_pooling=pooled)
    recorded = []

    def data_factory(encoders):
        recorded.append(RecordingData(build_training_data(cfg, encoders)))
        return recorded[0]

    result, _, _ = train_in_process(cfg, data_factory=data_factory)
    assert recorded[0].dataset_ids == {"train"} and recorded[0].steps_per_epoch == 4
    assert recorded[0].eval_source.sample_count == 7  # 3 images fill no batch of 2, yet none is pruned
    losses = result.eval_losses[1]
    if pooled:
        assert set(losses) == {"eval_loss"}
    else:
        assert set(losses) == {"eval_loss", "eval_loss/held", "eval_loss/held2"}
        weighted = (4 * losses["eval_loss/held"] + 3 * losses["eval_loss/held2"]) / 7
        assert losses["eval_loss"] == pytest.approx(weighted, rel=1e-9)
        assert losses["eval_loss/held"] != losses["eval_loss/held2"]


def test_eval_dataset_id_picks_one_eval_dataset_and_the_others_stay_held_out(eval_cfg, datasets, tmp_path):
    cfg = eval_cfg(data_backend_config=_eval_typed(tmp_path, datasets), eval_dataset_id="held2")
    from kubetuner_trainer.models import load_family

    data = build_training_data(cfg, load_family(cfg).encoders())
    assert data.eval_source.dataset_ids == ["held2"]
    assert {d.entry.id for d in data.datasets} == {"train"}


def test_eval_loss_disable_turns_it_off_but_keeps_the_dataset_held_out(eval_cfg):
    cfg = eval_cfg(eval_loss_disable=True)
    recorded = []

    def data_factory(encoders):
        recorded.append(RecordingData(build_training_data(cfg, encoders)))
        return recorded[0]

    events = RecordingEvents()
    result, _, _ = train_in_process(cfg, data_factory=data_factory, events=events)
    assert result.eval_losses == {}
    assert all(not r.loss_components for r in events.steps) and len(events.steps) == 4
    assert recorded[0].dataset_ids == {"train", "held2"}


def test_a_resumed_run_reports_the_same_eval_losses(eval_cfg, tmp_path):
    straight = RecordingEvents()
    assert run(eval_cfg(output_dir=str(tmp_path / "straight")), straight) == ExitCode.SUCCESS
    cfg = eval_cfg(output_dir=str(tmp_path / "split"))
    first = RecordingEvents(stop_after=2)
    assert run(cfg, first) == ExitCode.INTERRUPTED
    resumed = RecordingEvents()
    assert run(cfg.replace(resume_from_checkpoint="latest"), resumed) == ExitCode.SUCCESS
    expected = {r.step: r.loss_components for r in straight.steps if r.loss_components}
    assert sorted(expected) == [2, 4]
    assert {r.step: r.loss_components for r in first.steps + resumed.steps if r.loss_components} == expected


# ----- reporting: /metrics, /status and tensorboard ---------------------------------------------

def test_eval_loss_reaches_metrics_status_and_tensorboard(eval_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kubetuner_trainer.runtime import build_runtime

    cfg = eval_cfg(report_to="tensorboard", logging_dir=str(tmp_path / "tb"), eval_steps_interval=3,
                   max_train_steps=4)
    with build_runtime(cfg, install_signals=False, bind_port=0) as runtime:
        assert run(cfg, runtime) == ExitCode.SUCCESS
        with urllib.request.urlopen(runtime.url + "/metrics", timeout=10) as reply:
            body = reply.read()
        with urllib.request.urlopen(runtime.url + "/status", timeout=10) as reply:
            status_body = reply.read()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    eval_loss = samples[("kubetuner_trainer_eval_loss", ())]
    assert samples[("kubetuner_trainer_eval_dataset_loss", (("dataset", "held"),))] == eval_loss
    assert not any(k[0] == "kubetuner_trainer_loss" and ("component", "eval_loss") in k[1] for k in samples)
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, check=False)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint
    status = json.loads(status_body)
    assert status["step"] == 4
    assert status["last_losses"]["eval_loss"] == eval_loss  # step 3's evaluation is kept at step 4
    reader = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    reader.Reload()
    assert "eval/loss" in reader.Tags()["scalars"] and "eval/loss/held" in reader.Tags()["scalars"]
    [event] = reader.Scalars("eval/loss")
    assert event.step == 3 and event.value == pytest.approx(eval_loss, rel=1e-6)


# ----- several processes -------------------------------------------------------------------------

def test_two_processes_evaluate_their_shards_and_agree_with_one_process(eval_cfg, tmp_path):
    """The all-reduced loss of a 2-process run equals one process evaluating the same weights."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training import checkpoints as ckpt
    from kubetuner_trainer.training.loop import TrainingLoop, weight_dtype_for

    cfg = eval_cfg(num_processes=2, max_train_steps=3, eval_steps_interval=2, checkpoint_step_interval=2,
                   eval_dataset_pooling=False)
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.SUCCESS
    [report] = [r for r in events.steps if r.loss_components]
    assert report.step == 2

    single = cfg.replace(num_processes=1)
    AcceleratorState._reset_state()
    adapter = load_family(single, weight_dtype=weight_dtype_for(single))
    loop = TrainingLoop(single, Accelerator(cpu=True), adapter, build_training_data(single, adapter.encoders()),
                        seed=3)
    loop.setup()
    loop.resume(ckpt.checkpoint_path(tmp_path / "out", 2))
    assert loop.state.global_step == 2
    alone = loop._evaluate()
    assert alone.keys() == report.loss_components.keys()
    for key, value in alone.items():
        assert report.loss_components[key] == pytest.approx(value, rel=1e-6)
