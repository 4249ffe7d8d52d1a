"""Publishing to a loopback S3 (moto server) and to a loopback fake of the Hub's HTTP API."""

from __future__ import annotations

import json

import boto3
import pytest
from runtime_helpers import python_command, step_report, write_checkpoint

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import TrainerState
from kubetuner_trainer.runtime import build_runtime
from kubetuner_trainer.runtime.publishing import PublishingConfigError, parse_publishing_config


def s3_keys(endpoint: str, bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="k", aws_secret_access_key="s")
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            found[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def make_bucket(endpoint: str, name: str) -> None:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="k", aws_secret_access_key="s").create_bucket(Bucket=name)


@pytest.mark.parametrize("background", [False, True])
def test_checkpoints_and_final_model_reach_s3(cfg_factory, s3_server, argv_dumper, tmp_path, monkeypatch,
                                              background):
    make_bucket(s3_server, "models")
    make_bucket(s3_server, "mirror")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")  # the second target uses the standard AWS chain
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    targets = [
        {"provider": "s3", "bucket": "models", "endpoint_url": s3_server, "region": "us-east-1",
         "access_key": "AKIDEXAMPLE", "secret_key": "secret", "base_path": "runs/2026/"},
        {"provider": "backblaze_b2", "bucket": "mirror", "endpoint_url": s3_server, "upload_checkpoints": False,
         "public_base_url": "https://cdn.example/models/"},
    ]
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    hook = python_command(str(argv_dumper), str(uploads), "{remote_checkpoint_path}", "{local_checkpoint_path}")
    out = tmp_path / "out"
    cfg = cfg_factory(publishing_config=json.dumps(targets), push_to_hub_background=background,
                      post_upload_script=hook)
    with build_runtime(cfg, install_signals=False) as rt:
        rt.checkpoint(write_checkpoint(out, 2), seconds=0.1)
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"final-weights")
        (out / "validation").mkdir()
        (out / "validation" / "a.png").write_bytes(b"png")
        (out / "cache" / "vae").mkdir(parents=True)
        (out / "cache" / "vae" / "latent.pt").write_bytes(b"latents are scratch")
        (out / ".tmp-checkpoint-9").mkdir()
        (out / ".tmp-checkpoint-9" / "half.bin").write_bytes(b"half-written")
        rt.state(TrainerState.FINISHED, "saved")
    # leaving the block waited for the (possibly background) uploads
    main = s3_keys(s3_server, "models")
    assert main["runs/2026/out/checkpoint-2/unet/weights.bin"] == bytes(range(64)) * 2
    assert main["runs/2026/out/checkpoint-2/training_state.json"] == b'{"global_step": 2}'
    assert main["runs/2026/out/pytorch_lora_weights.safetensors"] == b"final-weights"
    assert main["runs/2026/out/validation/a.png"] == b"png"
    expected = {"unet/weights.bin", "training_state.json", "COMPLETE"}
    checkpoint_keys = {k.removeprefix("runs/2026/out/checkpoint-2/") for k in main if "/checkpoint-" in k}
    assert checkpoint_keys == expected  # the final upload skips checkpoints; nothing else is in there
    mirror = s3_keys(s3_server, "mirror")
    assert set(mirror) == {"out/pytorch_lora_weights.safetensors", "out/validation/a.png"}
    hooks = sorted(json.loads(p.read_text()) for p in uploads.glob("*.json"))  # scripts awaited on exit
    assert ["s3://models/runs/2026/out/checkpoint-2/", str(out / "checkpoint-2")] in hooks
    assert ["s3://models/runs/2026/out/", str(out)] in hooks
    assert ["https://cdn.example/models/out/", str(out)] in hooks
    assert rt.metrics.registry.get_sample_value("kubetuner_trainer_uploads_total", {"target": "s3", "result": "ok"}) == 3


def test_unreachable_s3_fails_visibly_but_training_continues(cfg_factory, tmp_path):
    target = {"provider": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9", "access_key": "a",
              "secret_key": "b"}
    with build_runtime(cfg_factory(publishing_config=[target]), install_signals=False) as rt:
        rt.checkpoint(write_checkpoint(tmp_path / "out", 1), seconds=0.1)
        rt.step(step_report(2))  # the loop carries on after the failed upload
        assert rt.status.snapshot().step == 2
    assert rt.publisher.failures and rt.publisher.failures[0].startswith("s3:b:")
    assert rt.metrics.registry.get_sample_value("kubetuner_trainer_uploads_total", {"target": "s3", "result": "failed"}) == 1
    assert rt.metrics.registry.get_sample_value("kubetuner_trainer_errors_total") == 1
    assert rt.status.snapshot().message.startswith("upload of checkpoint 1 to s3:b failed")


def test_push_to_hub_creates_repo_pushes_checkpoints_and_card(cfg_factory, fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken")
    cfg = cfg_factory(push_to_hub=True, push_checkpoints_to_hub=True, hub_model_id="team/tiny-lora",
                      model_card_private=True, model_card_note="Trained on the team's sketches.",
                      push_to_hub_background=True, model_family="sd1x", model_type="lora")
    out = tmp_path / "out"
    with build_runtime(cfg, install_signals=False) as rt:
        rt.checkpoint(write_checkpoint(out, 3), seconds=0.1)
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
        rt.state(TrainerState.FINISHED)
    (created,) = fake_hub.created
    assert (created["organization"], created["name"], created["visibility"]) == ("team", "tiny-lora", "private")
    files = fake_hub.files["team/tiny-lora"]
    assert files["checkpoint-3/unet/weights.bin"] == bytes(range(64)) * 3
    assert files["pytorch_lora_weights.safetensors"] == b"lora"
    card = files["README.md"].decode()
    assert card.startswith("---\n") and "- lora" in card and "- sd1x" in card
    assert "Trained on the team's sketches." in card and "Content warning" in card
    assert not any(path.startswith("checkpoint-3/") for path in files if path.endswith("README.md"))
    assert [c["header"]["summary"] for c in fake_hub.commits] == ["checkpoint at step 3", "final model"]
    assert all(r.headers.get("authorization") == "Bearer hf_testtoken" for r in fake_hub.requests)


def test_safe_for_work_card_has_no_warning(cfg_factory, fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    cfg = cfg_factory(push_to_hub=True, hub_model_id="team/sfw", model_card_safe_for_work=True)
    (tmp_path / "out").mkdir()
    with build_runtime(cfg, install_signals=False) as rt:
        rt.checkpoint(write_checkpoint(tmp_path / "out", 1), seconds=0.1)  # not pushed: checkpoints off
        rt.state(TrainerState.FINISHED)
    files = fake_hub.files["team/sfw"]
    assert "Content warning" not in files["README.md"].decode()
    assert "not-for-all-audiences" not in files["README.md"].decode()
    assert not any(p.startswith("checkpoint-") for p in files)


@pytest.mark.parametrize(("config", "message"), [
    ({"provider": "dropbox", "token": "x"}, "provider is 'dropbox'; kubetuner supports: s3, backblaze_b2"),
    ({"provider": "s3"}, "publishing_config[0].bucket is required"),
    ({"provider": "s3", "bucket": "b", "access_key": "a"}, "give both access_key and secret_key"),
    ({"provider": "s3", "bucket": "b", "endpoint_url": "minio:9000"}, "endpoint_url must start with http"),
    ({"provider": "s3", "bucket": "b", "acl": "public"}, "unknown key 'acl'"),
])
def test_bad_publishing_config_names_the_field(config, message):
    with pytest.raises(PublishingConfigError) as error:
        parse_publishing_config([config])
    assert message in str(error.value)


def test_bad_publishing_config_is_a_config_error_without_secrets(cfg_factory):
    config = {"provider": "s3", "bucket": "", "access_key": "AKIA", "secret_key": "topsecret"}
    with pytest.raises(ConfigError) as error, build_runtime(cfg_factory(publishing_config=config),
                                                            install_signals=False):
        pass
    assert "publishing_config" in str(error.value) and "topsecret" not in str(error.value)
