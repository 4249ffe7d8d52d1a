"""The data logging options: debug_aspect_buckets, debug_dataset_loader, print_filenames, print_sampler_statistics."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from data_builders import PIPELINE_OPTIONS, write_config

from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.debug_logging import DEBUG_LOGGERS, SAMPLER_LOG, sampler_statistics

FLAGS = ("debug_aspect_buckets", "debug_dataset_loader", "print_filenames", "print_sampler_statistics")


@pytest.fixture(autouse=True)
def _restore_levels():
    before = {logger: logger.level for logger in DEBUG_LOGGERS.values()}
    yield
    for logger, level in before.items():
        logger.setLevel(level)


def _cfg(tmp_path: Path, images: Path, **options) -> dict:
    entries = [{"id": "mixed", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile"}]
    return {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
            "cache_dir": str(tmp_path / "cache"), "resolution": 64, "resolution_type": "pixel_area",
            "aspect_bucket_alignment": 16, "seed": 3, **PIPELINE_OPTIONS, **options}


def _trainer_level_info(caplog) -> None:
    """The trainer's default level (INFO): the options must open DEBUG themselves; capture everything."""
    caplog.set_level(logging.INFO, logger="kubetuner_trainer")
    caplog.handler.setLevel(logging.DEBUG)


def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_options_log_buckets_batches_files_and_sampler(tmp_path, mixed_dir, encoders, caplog):
    _trainer_level_info(caplog)
    data = build_training_data(_cfg(tmp_path, mixed_dir, **dict.fromkeys(FLAGS, True)), encoders)
    batch = next(iter(data))
    data.close()

    h, w = batch.target_sizes[0]
    buckets = _messages(caplog, "kubetuner_trainer.data.buckets")
    (summary,) = [m for m in buckets if "repeats" in m]
    assert summary.startswith("dataset mixed: ") and f"{w}x{h}: " in summary
    assert any("left out header_cut.png: not a readable image" in m for m in buckets)
    files = _messages(caplog, "kubetuner_trainer.data.files")
    assert files and all(m.startswith(f"reading {mixed_dir}/") for m in files)
    assert any(m.endswith("/pixels_cut.png") for m in files)  # the file that failed to decode is named
    (loaded,) = _messages(caplog, "kubetuner_trainer.data.loader")
    assert loaded.startswith(f"epoch 0 batch 0: dataset mixed, bucket {w}x{h}")
    assert Path(batch.paths[0]).name in loaded
    sampler = _messages(caplog, SAMPLER_LOG.name)
    assert sampler[0].startswith(f"sampler: dataset mixed: {data.sample_count} samples in "
                                 f"{len(data.datasets[0].prepared.buckets.buckets)} buckets")
    assert f"{data.steps_per_epoch} batches per epoch (100.0%)" in sampler[0]


def test_options_off_log_nothing_extra(tmp_path, mixed_dir, encoders, caplog):
    _trainer_level_info(caplog)
    data = build_training_data(_cfg(tmp_path, mixed_dir), encoders)
    next(iter(data))
    data.close()
    for logger in (*[log.name for log in DEBUG_LOGGERS.values()], SAMPLER_LOG.name):
        assert _messages(caplog, logger) == [] or logger == "kubetuner_trainer.data.buckets"
    assert not any(r.levelno == logging.DEBUG for r in caplog.records)


def test_sampler_statistics_split_the_epoch_between_datasets(tmp_path, encoders):
    from data_builders import write_image

    for name, count in (("a", 3), ("b", 1)):
        for i in range(count):
            write_image(tmp_path / name / f"{i}.png", 64, 64, seed=i)
            (tmp_path / name / f"{i}.txt").write_text(f"{name} {i}")
    entries = [{"id": n, "type": "local", "instance_data_dir": str(tmp_path / n), "caption_strategy": "textfile"}
               for n in ("a", "b")]
    cfg = {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
           "cache_dir": str(tmp_path / "cache"), "resolution": 64, "aspect_bucket_alignment": 16, "seed": 1, **PIPELINE_OPTIONS}
    data = build_training_data(cfg, encoders)
    stats = {row["dataset"]: row for row in sampler_statistics(data.sampler)}
    assert (stats["a"]["samples"], stats["b"]["samples"]) == (3, 1)
    assert (stats["a"]["batches"], stats["b"]["batches"]) == (3, 1)
    assert stats["a"]["share"] == pytest.approx(0.75)
