"""``kubetuner run``: an LTX-Video TrainingJob on an image-to-video dataset, trained end to end on this machine."""

from __future__ import annotations

import argparse
import json

import yaml

from kubetuner_operator.local_run import main
from kubetuner_trainer.tiny import build_tiny_model, build_tiny_video_dataset


def test_an_ltx_trainingjob_with_an_i2v_video_dataset_trains_and_renders_clips(tmp_path):
    # the tiny model and clips come from the builders the README's `python -m kubetuner_trainer.tiny` uses
    build_tiny_model("ltxvideo", tmp_path / "models" / "tiny-ltx")
    build_tiny_video_dataset(tmp_path / "datasets" / "clips", count=2, frames=9, sizes=((32, 32),))
    job = {
        "apiVersion": "kubetuner.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "ltx-video"},
        "spec": {
            "model": {"family": "ltxvideo", "type": "lora",
                      "source": {"pvc": {"claimName": "models", "path": "tiny-ltx"}}},
            "config": {"optimizer": "adamw_bf16", "learning_rate": 1e-3, "max_train_steps": 2, "train_batch_size": 1,
                       "lora_rank": 4, "mixed_precision": "no", "seed": 1, "resolution": 0.001024,
                       "resolution_type": "area", "aspect_bucket_alignment": 32, "framerate": 24,
                       "ltx_train_mode": "i2v", "ltx_protect_first_frame": True,
                       "validation_prompt": "a disc moving", "validation_step_interval": 2,
                       "validation_resolution": "32", "validation_num_inference_steps": 2,
                       "validation_num_video_frames": 9},
            "datasets": [{"id": "clips", "type": "local", "dataset_type": "video",
                          "pvc": {"claimName": "datasets", "path": "clips"}, "caption_strategy": "textfile",
                          "video": {"num_frames": 9, "is_i2v": True}}],
            "resources": {"gpus": 0},
            "runPolicy": {"backoffLimit": 1},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "work"
    run_args = argparse.Namespace(manifest=path, name=None, workdir=workdir, secrets=[], run_hooks=False,
                                  volume=[f"models={tmp_path / 'models'}", f"datasets={tmp_path / 'datasets'}"])
    assert main(run_args) == 0
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded" and status["step"] == 2 and status["loss"] > 0
    assert (workdir / "output" / "pytorch_lora_weights.safetensors").is_file()
    (clip,) = json.loads((workdir / "output" / "validation" / "step-2" / "index.json").read_text())
    assert clip["frames"] == 9 and clip["fps"] == 24
    assert (workdir / "output" / "validation" / "step-2" / clip["video"]).stat().st_size > 0
    config = json.loads((workdir / "config" / "config.json").read_text())
    assert config["model_family"] == "ltxvideo" and config["ltx_protect_first_frame"] is True
