"""Dataset lists written for SimpleTuner: placeholders, metadata_backend, fields not built yet."""

from __future__ import annotations

import pytest

from kubetuner_trainer.data.dataset_config import DatasetConfigError, parse_dataset_config
from kubetuner_trainer.data.settings import DataSettings


def _images(tmp_path, **fields):
    return {"id": "pics", "type": "local", "instance_data_dir": str(tmp_path), **fields}


def _problems(entries, settings=None) -> str:
    with pytest.raises(DatasetConfigError) as caught:
        parse_dataset_config(entries, settings or DataSettings())
    return str(caught.value)


def test_model_family_placeholder_is_filled_in_every_text_value(tmp_path):
    entries = [
        _images(tmp_path, cache_dir_vae=f"{tmp_path}/vae/{{model_family}}/pics"),
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": f"{tmp_path}/text/{{model_family}}"},
    ]
    config = parse_dataset_config(entries, DataSettings(model_family="sdxl"))
    assert config.by_id("pics").cache_dir_vae == f"{tmp_path}/vae/sdxl/pics"
    assert config.by_id("text").cache_dir == f"{tmp_path}/text/sdxl"


def test_placeholder_without_a_value_and_unknown_placeholders_stay(tmp_path):
    config = parse_dataset_config([_images(tmp_path, cache_dir_vae="c/{model_family}/{other}")], DataSettings())
    assert config.by_id("pics").cache_dir_vae == "c/{model_family}/{other}"


@pytest.mark.parametrize("backend", ["discovery", "json"])
def test_metadata_backend_discovery_is_what_we_do(tmp_path, backend):
    config = parse_dataset_config([_images(tmp_path, metadata_backend=backend)], DataSettings())
    assert config.by_id("pics").id == "pics"


@pytest.mark.parametrize(
    ("field", "value"),
    [("metadata_backend", "parquet"), ("caption_strategy", "huggingface"), ("type", "huggingface"),
     ("dataset_type", "audio")],
)
def test_simpletuner_values_not_built_are_named_as_such(tmp_path, field, value):
    message = _problems([_images(tmp_path, **{field: value})])
    assert f"datasets[pics].{field}" in message and "not supported yet" in message
    assert "not one of the allowed values" not in message


def test_dataset_name_is_a_known_field_not_a_typo(tmp_path):
    message = _problems([_images(tmp_path, dataset_name="someone/some-images")])
    assert "datasets[pics].dataset_name" in message and "not supported yet" in message
    assert "did you mean" not in message
