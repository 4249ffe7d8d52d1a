"""``kubetuner run`` trains the SDXL refiner flavour and DeepFloyd IF (tiny models from the family builders) end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from kubetuner_operator.local_run import main
from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_model


def _job(family: str, flavour: str, model_path: str, config: dict) -> dict:
    return {
        "apiVersion": "kubetuner.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": f"local-{family}"},
        "spec": {
            "model": {"family": family, "flavour": flavour, "type": "lora",
                      "source": {"pvc": {"claimName": "models", "path": model_path}}},
            "config": {"optimizer": "adamw_bf16", "learning_rate": 1e-3, "train_batch_size": 2, "lora_rank": 4,
                       "resolution": 64, "resolution_type": "pixel", "seed": 1, "mixed_precision": "no",
                       "max_train_steps": 2, "checkpoint_step_interval": 1, **config},
            "datasets": [{"id": "shapes", "type": "local", "pvc": {"claimName": "datasets", "path": "shapes"},
                          "caption_strategy": "textfile"}],
            "resources": {"gpus": 0}, "runPolicy": {"backoffLimit": 1},
        },
    }


def _run(tmp_path: Path, job: dict, volumes: dict[str, Path]) -> dict:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "work"
    args = argparse.Namespace(manifest=path, name=None, workdir=workdir, secrets=[], run_hooks=False,
                              volume=[f"{claim}={folder}" for claim, folder in volumes.items()])
    assert main(args) == 0, (workdir / "trainer.log").read_text()[-3000:]
    return yaml.safe_load((workdir / "status.yaml").read_text())


@pytest.mark.parametrize("family, flavour, config", [("sdxl", "refiner-1.0", {"data_aesthetic_score": 6.5}),
                                                     ("deepfloyd", "i-medium-400m", {})])
def test_a_refiner_or_pixel_space_family_trains_through_kubetuner_run(tmp_path, family, flavour, config):
    models, datasets = tmp_path / "models", tmp_path / "datasets"
    build_tiny_model(family, models / "tiny", flavour=flavour)
    build_tiny_dataset(datasets / "shapes", count=4, sizes=((64, 64),))
    job = _job(family, flavour, "tiny", config)
    status = _run(tmp_path, job, {"models": models, "datasets": datasets})
    assert status["phase"] == "Succeeded" and status["step"] == 2 and status["loss"] > 0
    assert (tmp_path / "work" / "output" / "pytorch_lora_weights.safetensors").is_file()
