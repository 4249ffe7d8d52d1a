"""``--print-config`` runs the start-up checks of a real start (issue 9, item 3)."""

from __future__ import annotations

import json

from kubetuner_trainer.cli import main


def _config(tmp_path, **values) -> str:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "pics", "type": "local", "instance_data_dir": str(images)}]))
    base = {"model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": "org/tiny-sd",
            "output_dir": str(tmp_path / "out"), "optimizer": "adamw_bf16", "max_train_steps": 4,
            "data_backend_config": str(datasets), **values}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(base))
    return str(path)


def test_print_config_refuses_what_a_start_refuses(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("KUBETUNER_TERMINATION_LOG", str(tmp_path / "termination"))
    config = _config(tmp_path, data_backend_config=str(tmp_path / "missing.json"))
    assert main(["--config", config, "--print-config"]) == 78
    assert "data_backend_config" in caplog.text and "file not found" in caplog.text


def test_options_without_effect_are_warnings_naming_the_option(tmp_path, capsys, caplog):
    # what SimpleTuner's own example configs write: num_eval_images without a CLIP evaluation, no benchmark
    config = _config(tmp_path, lr_scheduler="constant", lr_warmup_steps=10, ema_decay=0.99, prodigy_steps=5,
                     num_eval_images=25, disable_benchmark=True)
    assert main(["--config", config, "--print-config"]) == 0
    assert "lr_warmup_steps = 10" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for option in ("lr_warmup_steps", "ema_decay", "prodigy_steps", "num_eval_images"):
        assert any(w.startswith(f"--{option}=") and "has no effect" in w for w in warnings), warnings
