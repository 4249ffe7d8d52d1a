"""Trackers: TensorBoard event files, missing tracker packages, progress lines, log level."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image
from runtime_helpers import comet_messages, drive, step_report, wandb_history, wandb_records
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.runtime import build_runtime, check_runtime_config
from kubetuner_trainer.runtime.trackers import (
    TrackerError,
    configure_logging,
    progress_line,
    selected_trackers,
)


def test_tensorboard_event_files_are_readable(cfg_factory, tmp_path):
    cfg = cfg_factory(report_to="tensorboard", logging_dir="tb", tracker_run_name="run-1")
    image = tmp_path / "v.png"
    Image.new("RGB", (6, 4), (0, 128, 255)).save(image)
    with build_runtime(cfg, install_signals=False) as rt:
        drive(rt, tmp_path / "out", steps=3, checkpoint_every=10)
        rt.validation(3, [image], seconds=0.2)
    log_dir = tmp_path / "out" / "tb" / "run-1"  # relative logging_dir lives under output_dir
    assert list(log_dir.glob("events.out.tfevents.*"))
    reader = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    reader.Reload()
    loss = reader.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [e.value for e in reader.Scalars("train/loss_mse")] == pytest.approx([0.9, 0.45, 0.3])
    assert reader.Scalars("train/learning_rate/text_encoder")[0].value == pytest.approx(5e-5)
    (picture,) = reader.Images("validation/v")
    assert (picture.step, picture.width, picture.height) == (3, 6, 4)


@pytest.mark.parametrize("report_to", ["wandb", "comet_ml", "all"])
def test_missing_tracker_package_is_a_clear_problem(report_to, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "comet_ml") else real(name, *a))
    # The config layer already refuses these choices (not implemented); the runtime's own check
    # is what tells an embedding caller which package is missing. A mapping stands in for the config.
    (problem,) = check_runtime_config({"report_to": report_to, "output_dir": "."})
    assert problem.option == "report_to"
    assert "is not installed" in problem.message and "pip install" in problem.message


@pytest.fixture
def offline_trackers(monkeypatch):
    """W&B and Comet in their offline modes, with no credentials in the environment."""
    for name in ("WANDB_API_KEY", "COMET_API_KEY", "COMET_OFFLINE_DIRECTORY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("COMET_START_ONLINE", "false")


def _validation_image(tmp_path):
    image = tmp_path / "portrait-512x512-0.png"
    Image.new("RGB", (6, 4), (0, 128, 255)).save(image)
    return image


@pytest.mark.parametrize("layout", ["gallery", "table"])
def test_wandb_offline_run_has_loss_lr_and_validation_images(cfg_factory, tmp_path, offline_trackers, layout):
    cfg = cfg_factory(report_to="wandb", logging_dir="logs", tracker_project_name="proj",
                      tracker_run_name="run-1", tracker_image_layout=layout, job_id="team-a/style")
    with build_runtime(cfg, install_signals=False) as rt:
        drive(rt, tmp_path / "out", steps=3, checkpoint_every=10)
        rt.validation(3, [_validation_image(tmp_path)], seconds=0.2)
    (run_dir,) = (tmp_path / "out" / "logs" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    rows = wandb_history(run_file)
    assert [r["_step"] for r in rows] == [1, 2, 3]
    assert [r["train/loss"] for r in rows] == pytest.approx([1.0, 0.5, 1 / 3])
    assert rows[0]["train/learning_rate/unet"] == pytest.approx(1e-4)
    assert rows[0]["train/loss_mse"] == pytest.approx(0.9)
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_group) == ("proj", "run-1", "team-a/style")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["tracker_run_name"] == "run-1" and config["report_to"] == "wandb"
    if layout == "table":  # the table's images travel in a W&B artifact, staged outside the run folder
        assert (rows[-1]["validation/_type"], rows[-1]["validation/nrows"]) == ("table-file", 1)
    else:
        assert rows[-1]["validation/portrait-512x512-0/_type"] == "image-file"
        (media,) = (run_dir / "files" / "media").rglob("*.png")
        assert Image.open(media).size == (6, 4)


def test_comet_offline_archive_has_loss_lr_and_validation_images(cfg_factory, tmp_path, offline_trackers):
    cfg = cfg_factory(report_to="comet_ml", logging_dir="logs", tracker_project_name="proj",
                      tracker_run_name="run-1")
    image = _validation_image(tmp_path)
    with build_runtime(cfg, install_signals=False) as rt:
        drive(rt, tmp_path / "out", steps=3, checkpoint_every=10)
        rt.validation(3, [image], seconds=0.2)
    (archive,) = (tmp_path / "out" / "logs" / "comet").glob("*.zip")
    messages, files = comet_messages(archive)
    metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
    loss = [(m["step"], m["metricValue"]) for m in metrics if m["metricName"] == "train/loss"]
    assert loss == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m["metricValue"] for m in metrics if m["metricName"] == "train/learning_rate/unet"] == [1e-4] * 3
    (upload,) = [m["payload"] for m in messages if m["type"] == "file_upload"]
    assert upload["additional_params"]["figName"] == "validation/portrait-512x512-0"
    assert upload["additional_params"]["step"] == 3
    assert files[upload["file_path"]] == image.read_bytes()
    names = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
    assert names["Name"] == "run-1"


@pytest.mark.parametrize(("report_to", "variable"), [("wandb", "WANDB_API_KEY"), ("comet_ml", "COMET_API_KEY"),
                                                      ("all", "WANDB_API_KEY")])
def test_online_tracker_without_credentials_is_a_config_problem(report_to, variable, monkeypatch):
    for name in ("WANDB_API_KEY", "COMET_API_KEY", "WANDB_MODE", "COMET_START_ONLINE"):
        monkeypatch.delenv(name, raising=False)
    (problem,) = check_runtime_config({"report_to": report_to, "output_dir": "."})
    assert problem.option == "report_to"
    assert variable in problem.message and "secretKeyRef" in problem.message and "offline" in problem.message
    monkeypatch.setenv(variable, "k")
    monkeypatch.setenv("COMET_API_KEY", "k")
    assert check_runtime_config({"report_to": report_to, "output_dir": "."}) == []


def test_every_tracker_choice_is_accepted_by_the_config(cfg_factory):
    for value in ("wandb", "comet_ml", "all", "tensorboard,wandb"):
        assert cfg_factory(report_to=value, tracker_image_layout="table").report_to == value


def test_report_to_expansion():
    assert selected_trackers("none") == []
    assert selected_trackers("tensorboard,none") == ["tensorboard"]
    assert selected_trackers("all") == ["tensorboard", "wandb", "comet_ml"]
    with pytest.raises(TrackerError, match="'neptune' is not one of"):
        selected_trackers("neptune")


def test_progress_line_shows_bar_losses_and_eta():
    line = progress_line(step_report(5, max_steps=20), eta_seconds=3725)
    assert line.startswith("step 5/20 [#####---------------]  25%")
    assert "loss 0.2000" in line and "eta 1:02:05" in line and "4.00 samples/s" in line


def test_log_level_applies_and_debug_writes_debug_log(tmp_path):
    logger = logging.getLogger("kubetuner_trainer")
    before = logger.level
    try:
        assert configure_logging("WARNING") == logging.WARNING
        assert not logger.isEnabledFor(logging.INFO)
        configure_logging("debug", tmp_path)
        logging.getLogger("kubetuner_trainer.runtime.test").debug("hello debug")
        assert "hello debug" in (tmp_path / "debug.log").read_text()
        with pytest.raises(TrackerError, match="SIMPLETUNER_LOG_LEVEL='LOUD'"):
            configure_logging("LOUD")
    finally:
        for handler in list(logger.handlers):
            if getattr(handler, "baseFilename", "").startswith(str(tmp_path)):
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(before)


def test_log_level_from_config_env(cfg_factory):
    logger = logging.getLogger("kubetuner_trainer")
    before = logger.level
    try:
        with build_runtime(cfg_factory(log_level="ERROR"), install_signals=False):
            assert logger.getEffectiveLevel() == logging.ERROR
    finally:
        logger.setLevel(before)


def test_bad_log_level_is_a_config_error(cfg_factory):
    with pytest.raises(ConfigError, match="SIMPLETUNER_LOG_LEVEL"):
        with build_runtime(cfg_factory(log_level="CHATTY"), install_signals=False):
            pass
