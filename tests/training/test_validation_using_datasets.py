"""--validation_using_datasets: validation renders image-to-image from training images (SimpleTuner's rule)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from training_helpers import RecordingEvents, tiny_run_values, write_images

from kubetuner_trainer.config import ConfigError, TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.training.preflight import check


def _datasets(tmp_path) -> str:
    folder = write_images(tmp_path / "images", 4)
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps([{"id": "pics", "instance_data_dir": str(folder), "caption_strategy": "textfile"}]))
    return str(path)


def test_validation_renders_img2img_from_the_training_images(tmp_path, tiny_model):
    from kubetuner_trainer.train import run

    cfg = TrainerConfig.from_mapping(tiny_run_values(
        tiny_model("sd1x"), tmp_path, _datasets(tmp_path), max_train_steps=2, validation_step_interval=2,
        validation_using_datasets=True, validation_resolution="64", validation_num_inference_steps=5,
        num_eval_images=2, validation_prompt="ignored for dataset images"))
    check(cfg)
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.SUCCESS and not events.errors
    (step, images), = events.validations
    # two samples of the dataset, each at its own (training) size rather than --validation_resolution
    assert [p.name for p in images] == ["pics_0-32x32-0.png", "pics_1-32x32-0.png"]
    assert all(Image.open(p).size == (32, 32) for p in images)
    index = json.loads((images[0].parent / "index.json").read_text())
    assert [e["prompt"] for e in index] == ["a photo of thing 0", "a photo of thing 1"]


def test_families_without_an_img2img_pipeline_refuse_it(tmp_path, tiny_model):
    values = tiny_run_values(tiny_model("pixart_sigma"), tmp_path, _datasets(tmp_path), model_family="pixart_sigma",
                             validation_using_datasets=True)
    with pytest.raises(ConfigError, match="validation_using_datasets.*image-to-image.*flux"):
        check(TrainerConfig.from_mapping(values))
