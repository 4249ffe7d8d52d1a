"""Dataset list parsing: defaults, clear errors, credentials."""

from __future__ import annotations

import pytest

from kubetuner_trainer.config.errors import ConfigError
from kubetuner_trainer.data.credentials import credential_env_prefix, resolve_credentials
from kubetuner_trainer.data.dataset_config import (
    DatasetConfigError,
    load_dataset_config,
    parse_dataset_config,
)
from kubetuner_trainer.data.settings import DataSettings, settings_from_config


def _errors(raw, settings=None) -> str:
    with pytest.raises(DatasetConfigError) as caught:
        parse_dataset_config(raw, settings or DataSettings())
    assert isinstance(caught.value, ConfigError)
    return str(caught.value)


def test_entry_inherits_global_options_and_keeps_its_own():
    settings = settings_from_config({"resolution": 768, "resolution_type": "pixel", "caption_strategy": "textfile"})
    config = parse_dataset_config([
        {"id": "a", "instance_data_dir": "/data/a"},
        {"id": "b", "instance_data_dir": "/data/b", "resolution": 512, "caption_strategy": "instance_prompt",
         "instance_prompt": "sks dog", "repeats": 2, "is_regularization_data": "true"},
        {"id": "embeds", "dataset_type": "text_embeds", "cache_dir": "/cache/text", "default": True},
        {"id": "off", "instance_data_dir": "/data/off", "disabled": True},
    ], settings)
    a, b = config.image_datasets
    assert (a.resolution, a.resolution_type, a.caption_strategy, a.repeats_set) == (768, "pixel", "textfile", False)
    assert (b.resolution, b.caption_strategy, b.repeats, b.repeats_set) == (512, "instanceprompt", 2, True)
    assert b.is_regularisation_data is True
    assert config.text_embeds_for(a).id == "embeds"
    assert [e.id for e in config.image_datasets] == ["a", "b"]


def test_every_problem_is_reported_with_entry_field_and_allowed_values():
    message = _errors([
        {"id": "one", "instance_data_dir": "/x", "crop_style": "diagonal", "resolutoin": 1024},
        {"id": "two", "type": "csv"},
        {"id": "three", "type": "local"},
        {"id": "four", "dataset_type": "audio", "instance_data_dir": "/v"},
        {"id": "one", "instance_data_dir": "/y"},
    ])
    assert "datasets[one].crop_style='diagonal': 'diagonal' is not one of the allowed values: random, center, corner" \
        in message
    assert "datasets[one].resolutoin" in message and "did you mean 'resolution'" in message
    assert "datasets[two].type" in message and "not supported yet by this trainer; supported: local, aws" in message
    assert "datasets[three].instance_data_dir" in message and "is required" in message
    assert "datasets[four].dataset_type" in message and "supported: image, video, text_embeds" in message
    assert "datasets[one].id" in message and "unique" in message
    assert message.startswith("6 dataset configuration problems")


def test_relationship_rules():
    message = _errors([
        {"id": "p", "instance_data_dir": "/p", "caption_strategy": "parquet"},
        {"id": "i", "instance_data_dir": "/i", "caption_strategy": "instanceprompt"},
        {"id": "c", "instance_data_dir": "/c", "crop": True, "crop_aspect": "closest"},
        {"id": "m", "instance_data_dir": "/m", "maximum_image_size": 2048},
        {"id": "t", "instance_data_dir": "/t", "text_embeds": "nope"},
        {"id": "r", "instance_data_dir": "/r", "resolution_type": "area", "resolution": 1024},
        {"id": "s", "instance_data_dir": "/s", "skip_file_discovery": "vae,everything"},
        {"id": "v", "instance_data_dir": "/v", "cache_dir": "/cache"},
    ])
    assert "datasets[p].parquet" in message
    assert "datasets[i].instance_prompt" in message
    assert "datasets[c].crop_aspect_buckets" in message
    assert "datasets[m].target_downsample_size" in message
    assert "datasets[t].text_embeds='nope': must name an entry with dataset_type 'text_embeds'" in message
    assert "datasets[r].resolution" in message and "megapixels" in message
    assert "'everything' is not one of the allowed values: aspect, vae, text, metadata" in message
    assert "datasets[v].cache_dir='/cache'" in message and "cache_dir_vae" in message


def test_secrets_never_appear_in_errors_or_repr():
    secret = "SUPERSECRETVALUE123"
    message = _errors([{"id": "s3", "type": "aws", "aws_secret_access_key": 12345,
                        "aws_access_key_id": secret, "aws_bucket_name": 7}])
    assert secret not in message and "12345" not in message
    config = parse_dataset_config([{"id": "s3", "type": "aws", "aws_bucket_name": "b",
                                    "aws_access_key_id": "AKIA1", "aws_secret_access_key": secret}], DataSettings())
    assert secret not in repr(config) and "AKIA1" not in repr(config)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DatasetConfigError, match="file not found"):
        load_dataset_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(DatasetConfigError, match="is not valid JSON"):
        load_dataset_config(bad)
    with pytest.raises(DatasetConfigError, match="no enabled entry with dataset_type 'image'"):
        parse_dataset_config([{"id": "x", "instance_data_dir": "/x", "disabled": True}], DataSettings())


def test_bad_global_option_names_the_option():
    with pytest.raises(ConfigError, match="resolution_type='square': is not one of the allowed values: pixel, "):
        settings_from_config({"resolution_type": "square"})


def test_credentials_come_from_entry_then_dataset_env_then_default_chain():
    config = parse_dataset_config([
        {"id": "with-keys", "type": "aws", "aws_bucket_name": "b", "aws_access_key_id": "K1",
         "aws_secret_access_key": "S1"},
        {"id": "team.set-2", "type": "aws", "aws_bucket_name": "b"},
    ], DataSettings())
    inline, from_env = config.entries
    environ = {"KUBETUNER_DATASET_TEAM_SET_2_AWS_ACCESS_KEY_ID": "K2",
               "KUBETUNER_DATASET_TEAM_SET_2_AWS_SECRET_ACCESS_KEY": "S2",
               "KUBETUNER_DATASET_WITH_KEYS_AWS_ACCESS_KEY_ID": "ignored",
               "KUBETUNER_DATASET_WITH_KEYS_AWS_SECRET_ACCESS_KEY": "ignored"}
    assert credential_env_prefix("team.set-2") == "KUBETUNER_DATASET_TEAM_SET_2_"
    assert resolve_credentials(inline, environ)[:2] == ("K1", "S1")
    assert resolve_credentials(from_env, environ)[:2] == ("K2", "S2")
    assert resolve_credentials(from_env, {})[:2] == (None, None)
