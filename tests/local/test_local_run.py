"""``kubetuner run``: a TrainingJob manifest trained end to end on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import yaml

from kubetuner_operator.local_run import RunError, build_run, main, secret_values, trainer_environment
from kubetuner_operator.spec import parse_training_job
from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_sd1x


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("volumes")
    build_tiny_sd1x(root / "models" / "tiny-sd1x")
    build_tiny_dataset(root / "datasets" / "shapes", count=8)
    return {"models": root / "models", "datasets": root / "datasets"}


def manifest(tmp_path: Path, *, config: dict | None = None, hooks: list | None = None, extra: list | None = None) -> Path:
    job = {
        "apiVersion": "kubetuner.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "local-test"},
        "spec": {
            "model": {"family": "sd1x", "type": "lora", "source": {"pvc": {"claimName": "models", "path": "tiny-sd1x"}}},
            "config": {
                "optimizer": "adamw_bf16",
                "learning_rate": 1e-3,
                "max_train_steps": 4,
                "train_batch_size": 2,
                "checkpoint_step_interval": 2,
                "lora_rank": 4,
                "resolution": 64,
                "resolution_type": "pixel",
                "seed": 1,
                **(config or {}),
            },
            "datasets": [
                {
                    "id": "shapes",
                    "type": "local",
                    "pvc": {"claimName": "datasets", "path": "shapes"},
                    "caption_strategy": "textfile",
                }
            ],
            "resources": {"gpus": 0},
            "runPolicy": {"backoffLimit": 1},
            "hooks": {"postCheckpoint": hooks or []},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([job, *(extra or [])]))
    return path


def args(path: Path, volumes: dict[str, Path], workdir: Path, **kw) -> argparse.Namespace:
    return argparse.Namespace(
        manifest=path,
        name=None,
        workdir=workdir,
        volume=[f"{claim}={directory}" for claim, directory in volumes.items()],
        secrets=[],
        run_hooks=kw.get("run_hooks", False),
    )


def test_trainingjob_trains_checkpoints_and_runs_its_hook(tmp_path, volumes):
    record = tmp_path / "hook-args.json"
    hook_script = "import json, sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))"
    hooks = [{"name": "record", "image": "python:3.11",
              "command": [sys.executable, "-c", hook_script, str(record), "{local_checkpoint_path}", "{global_step}",
                          "{job_name}", "{output_dir}"]}]
    path = manifest(tmp_path, hooks=hooks)
    workdir = tmp_path / "work"
    assert main(args(path, volumes, workdir, run_hooks=True)) == 0
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded" and status["restarts"] == 0 and status["step"] == 4
    weights = workdir / "output" / "pytorch_lora_weights.safetensors"
    assert weights.is_file() and status["weights"] == [str(weights)]
    assert status["loss"] > 0 and status["durationSeconds"] > 0
    assert status["checkpoints"] and all(h["result"] == "Succeeded" for h in status["hooks"])
    assert "state: finished" in (workdir / "trainer.log").read_text()
    recorded = json.loads(record.read_text())
    assert Path(recorded[1]).name.startswith("checkpoint-") and recorded[2].isdigit()
    # the cluster's hook placeholder table, filled with this machine's paths
    assert recorded[3:] == ["local-test", str(workdir / "output")]
    config = json.loads((workdir / "config" / "config.json").read_text())
    assert config["pretrained_model_name_or_path"] == str(volumes["models"] / "tiny-sd1x")


def test_a_config_error_fails_once_without_restarts(tmp_path, volumes):
    # Valid for the CRD schema; only the trainer finds (before loading the model) that the folder is missing.
    path = manifest(tmp_path)
    job = yaml.safe_load(path.read_text())
    job["spec"]["datasets"][0]["pvc"]["path"] = "shapez"
    path.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "work"
    assert main(args(path, volumes, workdir)) == 78
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Failed" and status["restarts"] == 0
    # the trainer's own reason (its termination message), on one line
    assert f"{volumes['datasets'] / 'shapez'} does not exist" in status["reason"] and "\n" not in status["reason"]


def test_schema_errors_are_reported_before_anything_runs(tmp_path, volumes, capsys):
    path = manifest(tmp_path, config={"optimizer": "not-an-optimizer"})
    assert main(args(path, volumes, tmp_path / "work")) == 78
    assert "optimizer" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_unmapped_claim_names_the_flag_to_add(tmp_path, volumes):
    path = manifest(tmp_path)
    with pytest.raises(RunError, match="--volume datasets="):
        build_run(args(path, {"models": volumes["models"]}, tmp_path / "work"))


def test_secrets_come_from_secret_documents_and_never_from_the_manifest(tmp_path):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf"}, "stringData": {"token": "hf_abc"}}
    path = manifest(tmp_path, extra=[secret])
    docs = list(yaml.safe_load_all(path.read_text()))
    job_doc = docs[0]
    job_doc["spec"]["secrets"] = {"huggingFaceToken": {"name": "hf", "key": "token"}}
    job = parse_training_job(job_doc)
    env = trainer_environment(job, secret_values(docs))
    assert env["HF_TOKEN"] == "hf_abc" and "hf_abc" not in path.read_text().split("stringData")[0]
    with pytest.raises(RunError, match="Secret 'hf'"):
        trainer_environment(job, {})


def test_local_environment_is_the_pods_environment_resolved(tmp_path):
    """Every variable the pod gets (Secret references included) reaches the local trainer, resolved."""
    from kubetuner_operator.builders.trainer_pod import trainer_env

    secrets = [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}
               for name, data in (("out", {"AWS_ACCESS_KEY_ID": "AKIAOUT", "AWS_SECRET_ACCESS_KEY": "out-secret"}),
                                  ("extra", {"token": "extra-token"}))]
    path = manifest(tmp_path, extra=secrets)
    docs = list(yaml.safe_load_all(path.read_text()))
    docs[0]["spec"]["output"] = {"s3": {"bucket": "results", "credentialsSecret": {"name": "out"}}}
    docs[0]["spec"]["secrets"] = {"env": [{"name": "MY_TOKEN", "secretKeyRef": {"name": "extra", "key": "token"}}]}
    job = parse_training_job(docs[0])
    env = trainer_environment(job, secret_values(docs))
    assert env["KUBETUNER_OUTPUT_AWS_ACCESS_KEY_ID"] == "AKIAOUT"
    assert env["KUBETUNER_OUTPUT_AWS_SECRET_ACCESS_KEY"] == "out-secret" and env["MY_TOKEN"] == "extra-token"
    assert {e["name"] for e in trainer_env(job)} - {"HOME"} == set(env)


def test_an_unwritable_workdir_or_output_folder_exits_78_with_one_line_naming_it(tmp_path, volumes, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    path = manifest(tmp_path)
    assert main(args(path, volumes, blocker / "work")) == 78
    err = capsys.readouterr().err.strip()
    assert err == f"kubetuner run: workdir {blocker / 'work'}: {blocker} is a file, not a folder"


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen_image", "hidream", "omnigen", "cosmos2image"])
def test_a_flow_matching_family_trains_through_kubetuner_run(tmp_path, volumes, family):
    # The tiny model is built by the same builder the README's `python -m kubetuner_trainer.tiny model` uses.
    from kubetuner_trainer.tiny import build_tiny_model

    models = tmp_path / "models"
    build_tiny_model(family, models / f"tiny-{family}")
    path = manifest(tmp_path, config={"max_train_steps": 2, "checkpoint_step_interval": 1,
                                      "mixed_precision": "no", "flow_schedule_shift": 3.0})
    job = yaml.safe_load(path.read_text())
    job["spec"]["model"].update(family=family, source={"pvc": {"claimName": "models", "path": f"tiny-{family}"}})
    path.write_text(yaml.safe_dump(job))
    workdir = tmp_path / "work"
    assert main(args(path, {**volumes, "models": models}, workdir)) == 0
    status = yaml.safe_load((workdir / "status.yaml").read_text())
    assert status["phase"] == "Succeeded" and status["step"] == 2 and status["loss"] > 0
    assert (workdir / "output" / "pytorch_lora_weights.safetensors").is_file()
    config = json.loads((workdir / "config" / "config.json").read_text())
    assert config["model_family"] == family
