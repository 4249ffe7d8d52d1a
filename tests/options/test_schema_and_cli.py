"""The JSON Schema export and ``kubetuner-train`` help/print-config, both driven by the registry."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from kubetuner_trainer.cli import main, render_help
from kubetuner_trainer.options import get_registry
from kubetuner_trainer.options.schema import options_json_schema


def test_schema_has_every_option_and_validates_like_the_loader():
    registry = get_registry()
    schema = options_json_schema()
    assert set(schema["properties"]) == {o.name for o in registry}
    validator = jsonschema.Draft202012Validator(schema)
    required = {name: "x" for name in schema["required"] if registry.get(name).type == "str"}
    required |= {name: registry.get(name).choices[0] for name in schema["required"] if registry.get(name).choices}
    first_choice = next(o for o in registry if o.choices and not o.multiple and o.type == "str")
    assert not list(validator.iter_errors(required | {first_choice.name: first_choice.choices[0]}))
    assert list(validator.iter_errors(required | {first_choice.name: "definitely-not-a-choice"}))
    assert list(validator.iter_errors(required | {"learning_rte": 1}))  # closed: unknown keys rejected
    assert {e.validator for e in validator.iter_errors({})} == {"required"}


def test_schema_exclude_defaults_and_open_form():
    schema = options_json_schema(exclude={"output_dir"}, defaults=True, closed=False)
    assert "output_dir" not in schema["properties"] and "additionalProperties" not in schema
    with_default = [o for o in get_registry() if o.default is not None and o.type != "json"]
    assert all(schema["properties"][o.name]["default"] == o.default for o in with_default if o.name != "output_dir")


def test_comma_list_options_become_patterns():
    multi = [o for o in get_registry() if o.multiple and o.choices]
    if not multi:
        pytest.skip("no comma-list option in the catalog")
    option = multi[0]
    prop = options_json_schema()["properties"][option.name]
    both = ",".join(str(c) for c in option.choices[:2])
    jsonschema.validate({option.name: both}, {"type": "object", "properties": {option.name: prop}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({option.name: both + ",bogus"}, {"type": "object", "properties": {option.name: prop}})


def test_help_lists_every_option_and_alias():
    text = render_help(get_registry())
    for option in get_registry():
        assert f"--{option.name} " in text or f"--{option.name}\n" in text, option.name
        for alias in option.aliases:
            assert f"--{alias}" in text


def test_help_through_the_console_script_entry(capsys):
    assert main(["--help"]) == 0
    assert "--learning_rate" in capsys.readouterr().out


def test_bad_config_exits_78_and_suggests(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rte": 1e-4}))
    assert main(["--config", str(config)]) == 78
    err = capsys.readouterr().err
    assert "did you mean --learning_rate?" in err


def test_print_config_shows_sources_and_redacts(tmp_path, monkeypatch, capsys):
    registry = get_registry()
    # Use only options that are implemented, so the config is valid whatever the catalog holds.
    implemented = [o for o in registry if o.implemented and o.implemented_choices is None]
    required = [o for o in registry if o.required and o.default is None]
    if any(not o.implemented for o in required):
        pytest.skip("required options are not all implemented yet")
    values = {}
    for option in required:
        values[option.name] = sorted(option.implemented_choices, key=str)[0] if option.implemented_choices else "/tmp/x"
    values["max_train_steps"] = 10
    # --print-config runs the start-up checks: the dataset list must exist and make sense
    images = tmp_path / "images"
    images.mkdir()
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "pics", "type": "local", "instance_data_dir": str(images)}]))
    values.update(data_backend_config=str(datasets), output_dir=str(tmp_path / "out"))
    secret_hook = [{"webhook_type": "raw", "callback_url": "http://127.0.0.1:9/x", "api_key": "hunter2"}]
    redactable = registry.get("webhook_config").implemented
    if redactable:
        values["webhook_config"] = secret_hook
    config = tmp_path / "config.json"
    config.write_text(json.dumps(values))
    monkeypatch.setenv("TRAINING_NUM_PROCESSES", "1")
    assert main(["--config", str(config), "--print-config=json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    for name in values:
        assert doc[name]["source"] == f"file:{config}"
    assert doc["num_processes"]["source"] == "env:TRAINING_NUM_PROCESSES"
    assert implemented
    if redactable:
        assert "hunter2" not in out and doc["webhook_config"]["value"][0]["api_key"] == "***"
    assert main(["--config", str(config), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert f"max_train_steps = 10    # file:{config}" in text and "hunter2" not in text


def test_console_script_runs_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, "-m", "kubetuner_trainer.cli", "--learning_rte", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 78
    assert "learning_rate" in result.stderr
