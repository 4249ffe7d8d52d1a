"""``kubetuner run``: a Wan TrainingJob on a video dataset, trained end to end on this machine."""

from __future__ import annotations

import argparse
import json

import yaml

from kubetuner_operator.local_run import main
from kubetuner_trainer.tiny import build_tiny_model, build_tiny_video_dataset


def test_a_wan_trainingjob_with_a_video_dataset_trains_through_kubetuner_run(tmp_path):
    # the tiny model and clips come from the builders the README's `python -m kubetuner_trainer.tiny` uses
    build_tiny_model("wan", tmp_path / "models" / "tiny-wan")
    build_tiny_video_dataset(tmp_path / "datasets" / "clips", count=2, frames=9, sizes=((32, 32),))
    job = {
        "apiVersion": "kubetuner.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "wan-video"},
        "spec": {
            "model": {"family": "wan", "type": "lora", "source": {"pvc": {"claimName": "models", "path": "tiny-wan"}}},
            "config": {"optimizer": "adamw_bf16", "learning_rate": 1e-3, "max_train_steps": 2, "train_batch_size": 1,
                       "checkpoint_step_interval": 1, "lora_rank": 4, "mixed_precision": "no", "seed": 1,
                       "resolution": 0.001024, "resolution_type": "area", "aspect_bucket_alignment": 32,
                       "framerate": 16},
            "datasets": [{"id": "clips", "type": "local", "dataset_type": "video",
                          "pvc": {"claimName": "datasets", "path": "clips"}, "caption_strategy": "textfile",
                          "video": {"num_frames": 5, "min_frames": 5, "max_frames": 100}}],
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
    datasets = json.loads((workdir / "config" / "multidatabackend.json").read_text())
    (clips,) = [d for d in datasets if d["id"] == "clips"]
    assert clips["dataset_type"] == "video" and clips["video"] == {"num_frames": 5, "min_frames": 5, "max_frames": 100}
