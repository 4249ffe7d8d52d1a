"""``kubetuner run`` trains the text-transformer families (PixArt Sigma, Sana, AuraFlow, Lumina 2) on tiny models."""

from __future__ import annotations

import json

import pytest
import yaml
from test_local_run import args, manifest

from kubetuner_operator.local_run import main
from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_model

FAMILIES = ["pixart_sigma", "auraflow", "lumina2", "sana"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_transformer_family_trains_through_kubetuner_run(tmp_path, family):
    # the same builders the README's `python -m kubetuner_trainer.tiny` commands use
    volumes = {"models": tmp_path / "models", "datasets": tmp_path / "datasets"}
    build_tiny_model(family, volumes["models"] / f"tiny-{family}")
    build_tiny_dataset(volumes["datasets"] / "shapes", count=4)
    path = manifest(tmp_path, config={"max_train_steps": 2, "checkpoint_step_interval": 1, "mixed_precision": "no",
                                      "aspect_bucket_alignment": 16})
    job = yaml.safe_load(path.read_text())
    job["spec"]["model"].update(family=family, source={"pvc": {"claimName": "models", "path": f"tiny-{family}"}})
    path.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "work"
    assert main(args(path, volumes, workdir)) == 0
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded" and status["step"] == 2 and status["loss"] > 0
    assert (workdir / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((workdir / "config" / "config.json").read_text())["model_family"] == family
