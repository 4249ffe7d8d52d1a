"""End to end: dataset list -> TrainingData -> Batch, on local disk and on a real S3 endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_builders import (
    PIPELINE_OPTIONS,
    S3_KEY,
    S3_SECRET,
    TinyEncoders,
    make_mixed_files,
    upload,
    write_config,
)

from kubetuner_trainer.config.errors import ConfigError
from kubetuner_trainer.data import Batch, build_training_data


def _cfg(tmp_path: Path, entries: list[dict], **options) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
            "cache_dir": str(tmp_path / "cache"), "resolution": 64, "resolution_type": "pixel_area",
            "aspect_bucket_alignment": 16, "seed": 3, **PIPELINE_OPTIONS, **options}


def test_local_dataset_yields_batches_of_one_bucket(tmp_path, mixed_dir, encoders):
    entries = [{"id": "mixed", "type": "local", "instance_data_dir": str(mixed_dir), "caption_strategy": "textfile"}]
    data = build_training_data(_cfg(tmp_path, entries, train_batch_size=2), encoders)
    # 7 readable images; pixels_cut.png passes discovery but fails to decode while caching
    skipped = dict(data.datasets[0].prepared.skipped)
    assert "pixels_cut.png" in skipped and "header_cut.png" in skipped and "not_an_image.png" in skipped
    assert data.sample_count == sum(len(v) for v in data.datasets[0].prepared.buckets.buckets.values())
    batches = []
    for batch in data:
        batches.append(batch)
        if len(batches) == data.steps_per_epoch:
            break
    assert data.steps_per_epoch > 0
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.latents.shape[0] == 2 and batch.latents.shape[1] == 4
        h, w = batch.target_sizes[0]
        assert batch.latents.shape[2:] == (h // 2, w // 2)
        assert len(set(batch.target_sizes)) == 1
        assert batch.text["prompt_embeds"].shape == (2, 16, 16)
        assert all(c.startswith("caption of ") for c in batch.captions)
        assert batch.dataset_ids == ["mixed", "mixed"]
    seen = [p for b in batches for p in b.paths]
    assert len(seen) == len(set(seen))  # one epoch, no sample twice
    assert data.epoch == 1


def test_s3_dataset_matches_local(tmp_path, s3_endpoint, s3_client, s3_bucket, tiny_models, monkeypatch):
    files = make_mixed_files()
    upload(s3_client, s3_bucket, "train/", files)
    local = tmp_path / "local"
    for name, blob in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(blob)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    env = {"KUBETUNER_DATASET_S3_SET_AWS_ACCESS_KEY_ID": S3_KEY,
           "KUBETUNER_DATASET_S3_SET_AWS_SECRET_ACCESS_KEY": S3_SECRET}
    s3_entries = [{"id": "s3-set", "type": "aws", "aws_bucket_name": s3_bucket, "aws_data_prefix": "train/",
                   "aws_endpoint_url": s3_endpoint, "aws_region_name": "us-east-1", "caption_strategy": "textfile",
                   "cache_dir_vae": "cache/vae/"}]
    local_entries = [{"id": "s3-set", "type": "local", "instance_data_dir": str(local), "caption_strategy": "textfile"}]
    s3_data = build_training_data(_cfg(tmp_path / "a", s3_entries), TinyEncoders(tiny_models), environ=env)
    local_data = build_training_data(_cfg(tmp_path / "b", local_entries), TinyEncoders(tiny_models))
    assert s3_data.steps_per_epoch == local_data.steps_per_epoch
    s3_batches = [b for _, b in zip(range(s3_data.steps_per_epoch), s3_data, strict=False)]
    local_batches = [b for _, b in zip(range(local_data.steps_per_epoch), local_data, strict=False)]
    for a, b in zip(s3_batches, local_batches, strict=True):
        assert [p.rsplit("/", 1)[-1] for p in a.paths] == [p.rsplit("/", 1)[-1] for p in b.paths]
        assert torch.allclose(a.latents, b.latents, atol=1e-5)
    # the latent cache went to the bucket, next to the data
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="cache/vae/")
    assert listed["KeyCount"] == s3_data.sample_count


def test_no_usable_images_is_a_clear_error(tmp_path, encoders):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.md").write_text("nothing here")
    entries = [{"id": "nothing", "type": "local", "instance_data_dir": str(folder)}]
    with pytest.raises(ConfigError, match="dataset nothing .*none usable"):
        build_training_data(_cfg(tmp_path, entries), encoders)


def test_preflight_reports_dataset_problems_without_reading_data(tmp_path):
    from kubetuner_trainer.data import preflight_problems

    good = _cfg(tmp_path, [{"id": "ok", "instance_data_dir": str(tmp_path)}])
    assert preflight_problems(good) == []
    bad = _cfg(tmp_path / "bad", [{"id": "x", "type": "csv"}], resolution_type="pixel")
    (problem,) = preflight_problems(bad)
    assert problem.option == "datasets[x].type" and "not supported yet" in problem.message


def test_two_datasets_with_embed_entries_and_regularisation(tmp_path, encoders):
    from data_builders import write_image

    for i in range(6):
        write_image(tmp_path / "subject" / f"s{i}.png", 64, 64, seed=i)
    for i in range(4):
        write_image(tmp_path / "reg" / f"r{i}.png", 64, 64, seed=20 + i)
    entries = [
        {"id": "subject", "instance_data_dir": str(tmp_path / "subject"), "caption_strategy": "instanceprompt",
         "instance_prompt": "sks", "image_embeds": "latents-store", "text_embeds": "text-store"},
        {"id": "reg", "instance_data_dir": str(tmp_path / "reg"), "is_regularisation_data": True,
         "text_embeds": "text-store"},
        {"id": "latents-store", "dataset_type": "image_embeds", "cache_dir": str(tmp_path / "img-embeds")},
        {"id": "text-store", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "txt-embeds")},
    ]
    data = build_training_data(_cfg(tmp_path, entries, train_batch_size=2), encoders)
    assert data.steps_per_epoch == 3 + 2
    assert len(list((tmp_path / "img-embeds" / "subject").rglob("*.safetensors"))) == 6
    assert len(list((tmp_path / "cache" / "vae" / "reg").rglob("*.safetensors"))) == 4
    assert len(list((tmp_path / "txt-embeds").rglob("*.safetensors"))) == 1 + 1 + 4  # "", "sks", 4 file names
    flags = {}
    for _, batch in zip(range(data.steps_per_epoch), data, strict=False):
        assert len(set(batch.dataset_ids)) == 1
        flags.setdefault(batch.dataset_ids[0], set()).update(batch.is_regularisation)
        if batch.dataset_ids[0] == "subject":
            assert batch.captions == ["sks", "sks"]
    assert flags == {"subject": {False}, "reg": {True}}


def test_delete_problematic_images_removes_unreadable_and_undecodable_files(tmp_path, mixed_dir, encoders):
    entries = [{"id": "mixed", "instance_data_dir": str(mixed_dir)}]
    data = build_training_data(_cfg(tmp_path, entries, delete_problematic_images=True), encoders)
    for name in ("header_cut.png", "not_an_image.png", "pixels_cut.png"):
        assert not (mixed_dir / name).exists()
    assert (mixed_dir / "notes.bin").exists()  # not an image file type: left alone
    assert data.sample_count == 7


def test_two_ranks_replace_an_undecodable_sample_consistently(tmp_path, mixed_dir, tiny_models):
    entries = [{"id": "mixed", "instance_data_dir": str(mixed_dir), "caption_strategy": "textfile"}]
    cfg = _cfg(tmp_path, entries, disable_bucket_pruning=True)
    ranks = [build_training_data(cfg, TinyEncoders(tiny_models), rank=r, world_size=2) for r in (0, 1)]
    # with two ranks the schedule keeps pixels_cut.png (80x80 -> the 64x64 bucket); it is swapped when used
    assert any(p.key == "pixels_cut.png" for ps in ranks[0].datasets[0].prepared.buckets.buckets.values() for p in ps)
    epochs = 3
    scheduled = sum(p.key == "pixels_cut.png" for e in range(epochs) for _, ps in ranks[0].sampler.schedule(e)
                    for p in ps)
    assert scheduled >= 1  # the bad sample really comes up in these epochs
    for data in ranks:
        for _, batch in zip(range(epochs * data.steps_per_epoch), data, strict=False):
            assert not any(p.endswith("pixels_cut.png") for p in batch.paths)
            keys = [p.removeprefix(f"{mixed_dir}/") for p in batch.paths]
            assert batch.captions == [f"caption of {k.rsplit('.', 1)[0]}" for k in keys]
