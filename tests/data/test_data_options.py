"""Global options reach the pipeline through the trainer's own TrainerConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_builders import PIPELINE_OPTIONS, TinyEncoders, write_config, write_image

from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.data import build_training_data
from kubetuner_trainer.data.buckets import target_size
from kubetuner_trainer.data.dataset_config import parse_dataset_config
from kubetuner_trainer.data.prepare import DataError, open_dataset_storage
from kubetuner_trainer.data.settings import settings_from_config


def _images(root: Path) -> Path:
    for i in range(4):
        write_image(root / f"sq{i}.png", 64, 64, seed=i)
    return root


def _config(tmp_path: Path, images: Path, **options) -> TrainerConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = {"data_backend_config": write_config(tmp_path / "datasets.json",
                                                  [{"id": "set", "instance_data_dir": str(images)}]),
              "resolution": 64, "aspect_bucket_alignment": 16, **PIPELINE_OPTIONS, **options}
    return TrainerConfig.from_mapping(values, require=False)


def test_global_caption_options_apply_to_entries_without_their_own():
    cfg = TrainerConfig.from_mapping({"caption_strategy": "instance_prompt", "instance_prompt": "sks",
                                      "parquet_caption_column": "text", "parquet_filename_column": "file"},
                                     require=False)
    settings = settings_from_config(cfg)
    entries = parse_dataset_config([
        {"id": "a", "instance_data_dir": "/a"},
        {"id": "b", "instance_data_dir": "/b", "caption_strategy": "parquet", "parquet": {"path": "x.parquet"}},
    ], settings).entries
    assert (entries[0].caption_strategy, entries[0].instance_prompt) == ("instanceprompt", "sks")
    assert (entries[1].parquet.caption_column, entries[1].parquet.filename_column) == ("text", "file")


def test_aspect_bucket_rounding_changes_the_bucket():
    # 1.46 vs 1.5 after rounding to one decimal: 1024*sqrt(1.5)=1254 -> 1280 instead of 1216
    assert target_size(round(1.4615, 2), 1024, "pixel_area") == (1216, 832)
    assert target_size(round(1.4615, 1), 1024, "pixel_area") == (1280, 832)
    cfg = TrainerConfig.from_mapping({"aspect_bucket_rounding": 1}, require=False)
    assert settings_from_config(cfg).aspect_bucket_rounding == 1


def test_cache_dirs_and_skipping_vae_discovery(tmp_path, tiny_models):
    images = _images(tmp_path / "images")
    cfg = _config(tmp_path, images, cache_dir=str(tmp_path / "c"), cache_dir_vae=str(tmp_path / "vae"),
                  cache_dir_text=str(tmp_path / "text"), skip_file_discovery="vae")
    encoders = TinyEncoders(tiny_models)
    data = build_training_data(cfg, encoders)
    assert encoders.images_encoded == 0 and list((tmp_path / "text").rglob("*.safetensors"))
    next(iter(data))
    assert len(list((tmp_path / "vae" / "set").rglob("*.safetensors"))) == 1  # encoded when first needed
    assert (tmp_path / "c" / "metadata" / "set.json").is_file()


def test_missing_file_fails_unless_ignore_missing_files(tmp_path, tiny_models):
    images = _images(tmp_path / "images")
    cfg = _config(tmp_path, images, vae_cache_ondemand=True, cache_dir=str(tmp_path / "c"))
    data = build_training_data(cfg, TinyEncoders(tiny_models))
    first = next(iter(data)).paths[0]
    for path in images.iterdir():
        if str(path) != first:
            path.unlink()
            break
    with pytest.raises(DataError, match="files disappeared: .*--ignore_missing_files"):
        for _, _batch in zip(range(4), data, strict=False):
            pass
    tolerant = build_training_data(_config(tmp_path / "t", images, vae_cache_ondemand=True, ignore_missing_files=True,
                                           cache_dir=str(tmp_path / "c"), preserve_data_backend_cache=True),
                                   TinyEncoders(tiny_models))
    assert tolerant.sample_count == 4  # the trusted metadata still lists the deleted file
    batches = [b for _, b in zip(range(4), tolerant, strict=False)]
    assert len(batches) == 4 and all(len(b) == 1 for b in batches)


def test_aws_max_pool_connections_reaches_boto(s3_endpoint):
    cfg = TrainerConfig.from_mapping({"aws_max_pool_connections": 7}, require=False)
    settings = settings_from_config(cfg)
    entry = parse_dataset_config([{"id": "r", "type": "aws", "aws_bucket_name": "b",
                                   "aws_endpoint_url": s3_endpoint}], settings).entries[0]
    storage = open_dataset_storage(entry, settings, {})
    assert storage.client.meta.config.max_pool_connections == 7
