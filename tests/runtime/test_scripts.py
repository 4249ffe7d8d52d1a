"""User scripts: argv splitting, placeholders, background runs, failures that do not stop training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runtime_helpers import python_command, write_checkpoint

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.runtime import build_runtime
from kubetuner_trainer.runtime.scripts import (
    ScriptRunner,
    latest_checkpoint_dir,
    placeholder_values,
)


def read_argv(path: Path) -> list[str]:
    return json.loads(path.read_text())


def test_post_checkpoint_script_gets_one_argument_per_placeholder(cfg_factory, argv_dumper, tmp_path):
    out_file = tmp_path / "argv.json"
    note = "a; rm -rf / && echo $HOME"  # must stay a literal argument, never reach a shell
    command = python_command(str(argv_dumper), str(out_file)) + (
        " {local_checkpoint_path} {global_step} {tracker_run_name} {tracker_project_name} {model_family}"
        " {model_type} {lora_type} {huggingface_path} {remote_checkpoint_path} {validation_prompt}"
        " step={global_step} {unknown_placeholder}"
    )
    out_dir = tmp_path / "output dir with spaces"
    cfg = cfg_factory(output_dir=str(out_dir), post_checkpoint_script=command, tracker_run_name="run; one",
                      tracker_project_name="proj", model_family="sd1x", model_type="lora",
                      hub_model_id="me/model", validation_prompt=note)
    with build_runtime(cfg, install_signals=False) as rt:
        info = write_checkpoint(out_dir, 7)
        rt.checkpoint(info, seconds=0.1)
        assert rt.scripts.wait_all(60)
    argv = read_argv(out_file)
    assert argv == [
        str(out_dir / "checkpoint-7"), "7", "run; one", "proj", "sd1x", "lora", cfg.lora_type or "",
        "me/model", "", note, "step=7", "{unknown_placeholder}",
    ]
    assert rt.metrics.registry.get_sample_value(
        "kubetuner_trainer_script_runs_total", {"script": "post_checkpoint", "result": "ok"}) == 1


def test_failing_and_missing_scripts_are_logged_and_counted(tmp_path, argv_dumper, monkeypatch, caplog):
    runner = ScriptRunner()
    monkeypatch.setenv("DUMPER_EXIT", "3")
    code = runner.run("post_checkpoint", python_command(str(argv_dumper), str(tmp_path / "a.json")), {},
                      background=False)
    assert code == 3
    assert runner.run("post_checkpoint", str(tmp_path / "does-not-exist"), {}, background=False) is None
    assert "exited with code 3" in caplog.text and "could not start" in caplog.text


def test_incomplete_checkpoints_run_no_script(cfg_factory, argv_dumper, tmp_path):
    out_file = tmp_path / "argv.json"
    cfg = cfg_factory(post_checkpoint_script=python_command(str(argv_dumper), str(out_file), "{global_step}"))
    with build_runtime(cfg, install_signals=False) as rt:
        info = write_checkpoint(tmp_path / "out", 3)
        rt.checkpoint(type(info)(info.step, info.path, info.time, complete=False), seconds=0.1)
        rt.scripts.wait_all(60)
    assert not out_file.exists()


def test_post_upload_script_runs_without_remote_targets(cfg_factory, argv_dumper, tmp_path):
    out_file = tmp_path / "argv.json"
    cfg = cfg_factory(post_upload_script=python_command(
        str(argv_dumper), str(out_file), "{local_checkpoint_path}", "{remote_checkpoint_path}", "{global_step}"))
    with build_runtime(cfg, install_signals=False) as rt:
        rt.checkpoint(write_checkpoint(tmp_path / "out", 2), seconds=0.1)
        rt.scripts.wait_all(60)
    assert read_argv(out_file) == [str(tmp_path / "out" / "checkpoint-2"), "", "2"]


def test_unbalanced_quotes_are_a_config_error(cfg_factory):
    with pytest.raises(ConfigError) as error:
        with build_runtime(cfg_factory(post_checkpoint_script="run 'unterminated"), install_signals=False):
            pass
    assert "post_checkpoint_script" in str(error.value) and "quoting" in str(error.value)


def test_placeholder_values_include_every_validation_option(cfg_factory, tmp_path):
    cfg = cfg_factory(validation_prompt="a cat", validation_method="external-script",
                      validation_external_script="x")
    values = placeholder_values(cfg, global_step=5, local_checkpoint_path=tmp_path / "c")
    assert values["validation_prompt"] == "a cat"
    assert values["validation_method"] == "external-script"
    set_in_cfg = {k for k in cfg.to_dict() if k.startswith("validation_")}
    assert len(set_in_cfg) > 5  # defaults of the validation options count too
    assert {k for k in values if k.startswith("validation_")} == set_in_cfg
    assert values["global_step"] == 5 and values["local_checkpoint_path"] == str(tmp_path / "c")


def test_latest_checkpoint_dir_picks_the_highest_complete_step(tmp_path):
    assert latest_checkpoint_dir(tmp_path) is None
    for step in (2, 10, 9, 11):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if step != 11:  # checkpoint-11 is still being written
            (tmp_path / f"checkpoint-{step}" / "COMPLETE").write_text("{}")
    (tmp_path / "checkpoint-tmp").mkdir()
    assert latest_checkpoint_dir(tmp_path) == tmp_path / "checkpoint-10"
