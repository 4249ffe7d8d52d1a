"""`kubetuner data inspect`, through the umbrella CLI, in text and JSON."""

from __future__ import annotations

import json
import logging

from data_builders import S3_KEY, S3_SECRET, make_mixed_files, upload, write_config, write_image

from kubetuner_operator.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_report_for_a_local_dataset(tmp_path, mixed_dir, capsys):
    cfg = write_config(tmp_path / "datasets.json", [
        {"id": "mixed", "type": "local", "instance_data_dir": str(mixed_dir), "caption_strategy": "textfile"},
        {"id": "off", "type": "local", "instance_data_dir": str(tmp_path), "disabled": True}])
    code, out, _ = _run(capsys, cfg, "--resolution", "64", "--aspect_bucket_alignment", "16", "--train_batch_size", "1", "--json",
                        "--cache_dir", str(tmp_path / "cache"), "--headers-only")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["disabled"] == ["off"] and report["decoded"] is False
    (d,) = report["datasets"]
    assert d["files_found"] == 10 and d["images_usable"] == 8
    assert {s["file"] for s in d["skipped"]} == {"header_cut.png", "not_an_image.png"}
    assert d["ignored_files"] == ["notes.bin"]
    # pixel_area 64, alignment 16: squares 64x64; 2:1 -> 96x48; 1:2 -> 48x96; 64x96 upright -> 48x80 (0.67)
    assert {b["size"]: b["count"] for b in d["buckets"]} == {"64x64": 3, "96x48": 2, "48x96": 2, "48x80": 1}
    assert d["sample_captions"][0] == {"file": "big_square.png", "caption": "caption of big_square"}
    assert report["effective_batch"]["size"] == 1
    code, out, _ = _run(capsys, cfg, "--resolution", "64", "--aspect_bucket_alignment", "16", "--train_batch_size", "1", "--json")
    (d,) = json.loads(out)["datasets"]
    assert d["images_usable"] == 7
    assert {s["file"]: s["reason"] for s in d["skipped"]}["pixels_cut.png"].startswith("cannot decode image")


def test_text_report_shows_pruning_and_the_batch_check(tmp_path, mixed_dir, capsys, caplog):
    cfg = write_config(tmp_path / "datasets.json", [{"id": "mixed", "instance_data_dir": str(mixed_dir)}])
    with caplog.at_level(logging.WARNING):
        code, out, err = _run(capsys, cfg, "--resolution=64", "--aspect_bucket_alignment=16", "--train_batch_size=1",
                              "--gradient_accumulation_steps=2", "--num_processes=1")
    assert code == 0
    # each finding is said once, in the report: the pipeline's own warnings stay out of the terminal
    assert "pruned" not in err and not [r for r in caplog.records if r.name.startswith("kubetuner_trainer.data")]
    assert "effective batch: 2 = train_batch_size 1 x processes 1 x gradient_accumulation_steps 2" in out
    # pixels_cut.png (80x80) fails to decode: its 64x64 bucket keeps 2, the lone 48x80 image is pruned
    assert "pruned buckets:" in out and "48x80  1" in out and "64x64  2" in out and "batch check: OK" in out
    assert "pixels_cut.png: cannot decode image" in out
    assert "header_cut.png: not a readable image" in out
    assert "captions (filename):" in out and "'big square'" in out
    code, out, _ = _run(capsys, cfg, "--resolution=64", "--aspect_bucket_alignment=16", "--train_batch_size=8")
    assert code == 1 and "batch check: PROBLEM" in out


def test_s3_dataset_and_errors(tmp_path, s3_endpoint, s3_client, s3_bucket, capsys, monkeypatch):
    upload(s3_client, s3_bucket, "imgs/", make_mixed_files())
    monkeypatch.setenv("KUBETUNER_DATASET_REMOTE_AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("KUBETUNER_DATASET_REMOTE_AWS_SECRET_ACCESS_KEY", S3_SECRET)
    cfg = write_config(tmp_path / "datasets.json", [{
        "id": "remote", "type": "aws", "aws_bucket_name": s3_bucket, "aws_data_prefix": "imgs/",
        "aws_endpoint_url": s3_endpoint, "aws_region_name": "us-east-1"}])
    code, out, _ = _run(capsys, cfg, "--resolution", "64", "--aspect_bucket_alignment", "16", "--train_batch_size", "1", "--json")
    assert code == 0 and json.loads(out)["datasets"][0]["images_usable"] == 7  # pixels_cut.png cannot decode

    bad = write_config(tmp_path / "bad.json", [{"id": "x", "type": "huggingface"}])
    code, _, err = _run(capsys, bad)
    assert code == 2 and "datasets[x].type" in err and "not supported yet" in err
    code, _, err = _run(capsys, cfg, "--resolution_type", "square")
    assert code == 2 and "resolution_type='square'" in err


def test_config_file_supplies_defaults(tmp_path, capsys):
    images = tmp_path / "imgs"
    for i in range(3):
        write_image(images / f"p{i}.png", 64, 64, seed=i)
    options = tmp_path / "trainer.json"
    options.write_text(json.dumps({"--resolution": 64, "aspect_bucket_alignment": 16, "train_batch_size": 4}))
    cfg = write_config(tmp_path / "datasets.json", [{"id": "few", "instance_data_dir": str(images)}])
    code, out, _ = _run(capsys, cfg, "--config", str(options), "--json")
    assert code == 1 and json.loads(out)["datasets"][0]["pruned_buckets"] == [{"size": "64x64", "count": 3}]
    code, out, _ = _run(capsys, cfg, "--config", str(options), "--json", "--allow_dataset_oversubscription")
    report = json.loads(out)
    assert code == 0 and report["datasets"][0]["repeats"] == 1 and report["datasets"][0]["warnings"]


def test_default_verdict_matches_training_for_a_truncated_jpeg(tmp_path, capsys, encoders):
    """Two 64x64 images fill a batch of 2 only if both decode; one JPEG is cut after its header."""
    import pytest
    from data_builders import image_bytes

    from kubetuner_trainer.config.errors import ConfigError
    from kubetuner_trainer.data import build_training_data

    root = tmp_path / "set"
    write_image(root / "good.png", 64, 64)
    whole = image_bytes(64, 64, fmt="JPEG", seed=5)
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    cfg = write_config(tmp_path / "datasets.json", [{"id": "pair", "instance_data_dir": str(root)}])
    code, out, _ = _run(capsys, cfg, "--resolution", "64", "--train_batch_size", "2", "--json")
    report = json.loads(out)
    (d,) = report["datasets"]
    assert code == 1 and d["images_usable"] == 0 and d["batch_check"]["ok"] is False
    assert {s["file"] for s in d["skipped"]} >= {"cut.jpg"}
    with pytest.raises(ConfigError, match="no full batch|none usable"):
        build_training_data({"data_backend_config": cfg, "cache_dir": str(tmp_path / "cache"), "resolution": 64,
                             "train_batch_size": 2}, encoders)
