"""Config loading: precedence, aliases, strict types, JSON values, round trips, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetuner_trainer.config import ConfigError, TrainerConfig, load_config
from kubetuner_trainer.options import Registry, get_registry

BASE = {
    "model_family": "sdxl",
    "model_type": "lora",
    "output_dir": "/tmp/out",
    "optimizer": "adamw_bf16",
    "data_backend_config": "/tmp/multidatabackend.json",
    "max_train_steps": 10,
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    """Every option marked implemented, so these tests exercise the loader only."""
    return Registry(replace(o, implemented=True, implemented_choices=None) for o in get_registry())


def load(registry, argv=(), environ=None, **kw):
    return load_config(list(argv), environ or {}, registry=registry, **kw)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_precedence_cli_over_env_over_file_over_default(tmp_path, registry):
    cfg_path = write_json(tmp_path / "config.json", {**BASE, "--num_processes": 2, "learning_rate": 3e-4})
    default = registry.get("dynamo_backend").default
    cfg = load(registry, ["--config", cfg_path])
    assert (cfg.num_processes, cfg.source("num_processes")) == (2, f"file:{cfg_path}")
    assert (cfg.dynamo_backend, cfg.source("dynamo_backend")) == (default, "default")

    cfg = load(registry, ["--config", cfg_path], {"TRAINING_NUM_PROCESSES": "4"})
    assert (cfg.num_processes, cfg.source("num_processes")) == (4, "env:TRAINING_NUM_PROCESSES")

    cfg = load(registry, ["--config", cfg_path, "--num_processes=8"], {"TRAINING_NUM_PROCESSES": "4"})
    assert (cfg.num_processes, cfg.source("num_processes")) == (8, "cli")
    assert cfg.learning_rate == pytest.approx(3e-4)


def test_config_env_file_beside_config_is_read_and_process_env_wins(tmp_path, registry):
    cfg_path = write_json(tmp_path / "config.json", BASE)
    (tmp_path / "config.env").write_text(
        "# comment\nexport TRAINING_NUM_PROCESSES=3\nSIMPLETUNER_LOG_LEVEL=debug\n"
        "ACCELERATE_EXTRA_ARGS='--multi_gpu --mixed_precision bf16'\nSIMPLETUNER_JOB_ID=job-7\n"
    )
    cfg = load(registry, ["--config", cfg_path])
    assert cfg.num_processes == 3
    assert cfg.env.log_level == "DEBUG"
    assert cfg.env.job_id == "job-7"
    assert cfg.env.accelerate_extra_args == ("--multi_gpu", "--mixed_precision", "bf16")
    cfg = load(registry, ["--config", cfg_path], {"TRAINING_NUM_PROCESSES": "5"})
    assert cfg.num_processes == 5


def test_toml_config_and_keys_with_dashes(tmp_path, registry):
    toml = tmp_path / "config.toml"
    toml.write_text("".join(f'"--{k}" = "{v}"\n' for k, v in BASE.items()) + "learning_rate = 2e-5\n")
    cfg = load(registry, ["--config", str(toml)])
    assert cfg.model_family == "sdxl"
    assert cfg.learning_rate == pytest.approx(2e-5)


def test_aliases_resolve_to_canonical_names(tmp_path, registry):
    cfg = TrainerConfig.from_mapping({**BASE, "checkpointing_steps": 250, "--validation_steps": "100"}, registry=registry)
    assert cfg.checkpoint_step_interval == 250
    assert cfg["checkpointing_steps"] == 250
    assert cfg.validation_step_interval == 100


def test_same_option_twice_through_alias_is_an_error(registry):
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "checkpointing_steps": 1, "checkpoint_step_interval": 2}, registry=registry)
    assert "given twice" in str(info.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--use_ema"], True),
        (["--use_ema", "true"], True),
        (["--use_ema", "false"], False),
        (["--use_ema=False"], False),
        (["--use_ema", "0"], False),
        (["--use_ema", "yes"], True),
    ],
)
def test_cli_booleans(registry, argv, expected):
    cfg = load(registry, [*sum(([f"--{k}", str(v)] for k, v in BASE.items()), []), *argv])
    assert cfg.use_ema is expected


@pytest.mark.parametrize("raw", ["false", "False", "0", "off", False])
def test_file_booleans_are_parsed_not_truthy(registry, raw):
    assert TrainerConfig.from_mapping({**BASE, "use_ema": raw}, registry=registry).use_ema is False


@pytest.mark.parametrize("raw", ["maybe", "", "2", [], {}, 0.5])
def test_bad_booleans_name_the_option_and_the_allowed_words(registry, raw):
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "use_ema": raw}, registry=registry)
    message = str(info.value)
    assert "--use_ema" in message and "true or false" in message


def test_numbers_in_scientific_notation(registry):
    cfg = TrainerConfig.from_mapping({**BASE, "learning_rate": "1e-4", "max_train_steps": "1e3"}, registry=registry)
    assert cfg.learning_rate == pytest.approx(1e-4)
    assert cfg.max_train_steps == 1000
    with pytest.raises(ConfigError, match="max_train_steps"):
        TrainerConfig.from_mapping({**BASE, "max_train_steps": "1.5"}, registry=registry)
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainerConfig.from_mapping({**BASE, "learning_rate": "fast"}, registry=registry)


def test_json_option_inline_python_literal_and_path(tmp_path, registry):
    hooks = [{"webhook_type": "raw", "callback_url": "http://127.0.0.1:1/x"}]
    inline = TrainerConfig.from_mapping({**BASE, "webhook_config": json.dumps(hooks)}, registry=registry)
    as_python = TrainerConfig.from_mapping({**BASE, "webhook_config": repr(hooks)}, registry=registry)
    path = write_json(tmp_path / "hooks.json", hooks)
    from_path = TrainerConfig.from_mapping({**BASE, "webhook_config": path}, registry=registry)
    assert inline.webhook_config == as_python.webhook_config == from_path.webhook_config == hooks
    with pytest.raises(ConfigError, match="neither inline JSON nor an existing JSON file"):
        TrainerConfig.from_mapping({**BASE, "webhook_config": str(tmp_path / "missing.json")}, registry=registry)


def test_choices_and_comma_lists(registry):
    cfg = TrainerConfig.from_mapping({**BASE, "report_to": "tensorboard,wandb"}, registry=registry)
    assert cfg.report_to == "tensorboard,wandb"
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "report_to": "tensorboard,mlflow"}, registry=registry)
    assert "'mlflow'" in str(info.value) and "tensorboard" in str(info.value)
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "model_family": "sdxxl"}, registry=registry)
    assert "--model_family" in str(info.value) and "sd1x" in str(info.value)


def test_round_trip_config_json_config(tmp_path, registry):
    cfg = TrainerConfig.from_mapping(
        {**BASE, "learning_rate": 5e-5, "use_ema": True, "webhook_config": [{"webhook_type": "raw"}]},
        registry=registry,
    )
    path = tmp_path / "dump.json"
    path.write_text(cfg.to_json())
    again = load(registry, ["--config", str(path)])
    assert again == cfg
    everything = tmp_path / "all.json"
    everything.write_text(cfg.to_json(only_set=False))
    assert load(registry, ["--config", str(everything)]) == cfg


def test_unknown_key_gets_a_did_you_mean(registry):
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "learning_rte": 1e-4}, registry=registry)
    assert "did you mean --learning_rate?" in str(info.value)


def test_every_problem_is_reported_at_once(registry):
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({"learning_rte": 1, "use_ema": "perhaps", "model_family": "nope"}, registry=registry)
    names = {p.option for p in info.value.problems}
    assert {"learning_rte", "use_ema", "model_family", "output_dir"} <= names


def test_required_options_and_require_false(registry):
    with pytest.raises(ConfigError, match="--output_dir: is required"):
        TrainerConfig.from_mapping({k: v for k, v in BASE.items() if k != "output_dir"}, registry=registry)
    cfg = TrainerConfig.from_mapping({"learning_rate": 1e-3}, registry=registry, require=False)
    assert cfg.output_dir is None


def test_unimplemented_option_is_refused_unless_default():
    reg = Registry(replace(o, implemented=o.name != "use_ema", implemented_choices=None) for o in get_registry())
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "use_ema": True}, registry=reg)
    assert "--use_ema" in str(info.value) and "does not implement" in str(info.value)
    assert TrainerConfig.from_mapping({**BASE, "use_ema": False}, registry=reg).use_ema is False


def test_partially_implemented_choice_is_refused():
    reg = Registry(
        replace(o, implemented=True, implemented_choices=frozenset({"sdxl"}) if o.name == "model_family" else None)
        for o in get_registry()
    )
    assert TrainerConfig.from_mapping(BASE, registry=reg).model_family == "sdxl"
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_mapping({**BASE, "model_family": "flux"}, registry=reg)
    assert "implements only: sdxl" in str(info.value)


def test_replace_revalidates_and_keeps_sources(registry):
    cfg = TrainerConfig.from_mapping({**BASE, "learning_rate": 1e-4}, registry=registry, source="file:x")
    changed = cfg.replace(learning_rate="2e-4")
    assert changed.learning_rate == pytest.approx(2e-4) and changed.source("learning_rate") == "override"
    assert changed.source("model_family") == "file:x"
    with pytest.raises(ConfigError):
        cfg.replace(use_ema="sometimes")
    with pytest.raises(AttributeError, match="immutable"):
        cfg.learning_rate = 1.0  # type: ignore[misc]


def test_unknown_attribute_suggests(registry):
    cfg = TrainerConfig.from_mapping(BASE, registry=registry)
    with pytest.raises(AttributeError, match="learning_rate"):
        _ = cfg.learning_rte


def test_config_file_errors_are_config_errors(tmp_path, registry):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        load(registry, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="cannot read"):
        load(registry, ["--config", str(tmp_path / "absent.json")])
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object of option names"):
        load(registry, ["--config", str(bad)])


def test_cli_value_missing_and_stray_arguments(registry):
    with pytest.raises(ConfigError) as info:
        load(registry, ["stray", "--learning_rate"], require=False)
    text = str(info.value)
    assert "unexpected value" in text and "--learning_rate: needs a value" in text


_raw_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_loader_returns_config_or_config_error(registry, data):
    names = [o.name for o in registry] + ["not_an_option", "--learning_rte"]
    keys = data.draw(st.lists(st.sampled_from(names), max_size=8, unique=True))
    mapping = {k: data.draw(_raw_values) for k in keys}
    try:
        cfg = TrainerConfig.from_mapping(mapping, registry=registry, require=data.draw(st.booleans()))
    except ConfigError as error:
        assert error.problems
        return
    assert isinstance(cfg, TrainerConfig)
