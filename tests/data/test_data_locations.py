"""Pre-flight: a dataset folder or bucket/prefix that does not exist is named before the model loads."""

from __future__ import annotations

from data_builders import S3_KEY, S3_SECRET, make_mixed_files, upload, write_config

from kubetuner_operator.cli import main as kubetuner
from kubetuner_trainer.config import TrainerConfig
from kubetuner_trainer.config.errors import ConfigError
from kubetuner_trainer.data import preflight_problems


def _cfg(tmp_path, entries) -> dict:
    return {"data_backend_config": write_config(tmp_path / "datasets.json", entries),
            "cache_dir": str(tmp_path / "cache"), "resolution": 64}


def test_missing_local_folder_is_a_problem_naming_the_path(tmp_path, mixed_dir):
    missing = tmp_path / "shapez"
    cfg = _cfg(tmp_path, [{"id": "ok", "instance_data_dir": str(mixed_dir)},
                          {"id": "typo", "instance_data_dir": str(missing)}])
    (problem,) = preflight_problems(cfg)
    assert problem.option == "datasets[typo].instance_data_dir"
    assert problem.message == f"{missing} does not exist"
    afile = mixed_dir / "square_red.png"
    (problem,) = preflight_problems(_cfg(tmp_path, [{"id": "f", "instance_data_dir": str(afile)}]))
    assert problem.message == f"{afile} is not a folder"


def test_s3_bucket_and_prefix_are_checked_against_a_real_endpoint(tmp_path, s3_endpoint, s3_client, s3_bucket,
                                                                  monkeypatch):
    upload(s3_client, s3_bucket, "imgs/", make_mixed_files())
    monkeypatch.setenv("KUBETUNER_DATASET_R_AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("KUBETUNER_DATASET_R_AWS_SECRET_ACCESS_KEY", S3_SECRET)

    def entry(bucket: str, prefix: str) -> dict:
        return {"id": "r", "type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": prefix,
                "aws_endpoint_url": s3_endpoint, "aws_region_name": "us-east-1"}

    assert preflight_problems(_cfg(tmp_path, [entry(s3_bucket, "imgs/")])) == []
    (problem,) = preflight_problems(_cfg(tmp_path, [entry(s3_bucket, "imgz/")]))
    assert problem.option == "datasets[r].aws_data_prefix"
    assert problem.message == f"s3://{s3_bucket}/imgz/ at {s3_endpoint} does not exist (no object under this prefix)"
    (problem,) = preflight_problems(_cfg(tmp_path, [entry("kt-no-such-bucket", "imgs/")]))
    assert "bucket 'kt-no-such-bucket' does not exist" in problem.message


def test_trainer_preflight_refuses_before_loading_the_model(tmp_path, monkeypatch):
    """``run`` checks before loading: a model loader that must not be reached proves the order."""
    import kubetuner_trainer.models as models
    from kubetuner_trainer.contract import ExitCode
    from kubetuner_trainer.train import run

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the datasets were checked")

    monkeypatch.setattr(models, "load_family", must_not_load)
    model = tmp_path / "model"
    model.mkdir()
    values = {**_cfg(tmp_path, [{"id": "shapes", "instance_data_dir": str(tmp_path / "shapez")}]),
              "model_family": "sd1x", "pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
              "max_train_steps": 1}
    cfg = TrainerConfig.from_mapping(values, require=False)
    from kubetuner_trainer.training.preflight import check

    try:
        check(cfg)
    except ConfigError as error:
        assert f"{tmp_path / 'shapez'} does not exist" in str(error)
    else:
        raise AssertionError("missing dataset folder not reported")
    assert run(cfg, events=_Quiet()) == ExitCode.CONFIG_ERROR


class _Quiet:
    def error(self, message: str) -> None:
        pass


def test_inspect_says_the_folder_does_not_exist(tmp_path, capsys):
    cfg = write_config(tmp_path / "datasets.json", [{"id": "shapes", "instance_data_dir": str(tmp_path / "shapez")}])
    code = kubetuner(["data", "inspect", cfg, "--resolution", "64"])
    out, err = capsys.readouterr()
    assert code == 2 and f"{tmp_path / 'shapez'} does not exist" in err and "add images" not in out + err
