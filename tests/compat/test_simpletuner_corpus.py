"""A corpus of SimpleTuner-style configs, written the way SimpleTuner's web UI writes them.

Every case starts from all of SimpleTuner's options at their SimpleTuner defaults (the UI writes
each one out), swaps the paths for local ones, and adds what the case is about: a model family
and the features a user of that family typically turns on. Each case must either load and train
a tiny model (implemented families), or be refused by naming only the options kubetuner
has not built. ``--print-config`` and a real start must agree on every case: the same exit code
and the same messages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetuner_trainer.cli import main
from kubetuner_trainer.config import ConfigError, TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models.registry import implemented_families
from kubetuner_trainer.options import get_registry
from kubetuner_trainer.tiny import build_tiny_dataset

REGISTRY = get_registry()
# Options holding a location: a user swaps these for their own paths (and so do we).
LOCATION_SUFFIXES = ("_path", "_dir", "_name_or_path", "_config")


def _is_location(name: str) -> bool:
    return name.endswith(LOCATION_SUFFIXES) or name in ("logging_dir", "data_backend_config")


WEB_UI_DEFAULTS = {
    o.name: o.simpletuner_default
    for o in REGISTRY
    if o.simpletuner_default is not None and not _is_location(o.name)
}

# (case id, settings). Families first, then features; values are what a user would write.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("sd1x-lora", {"model_family": "sd1x", "model_type": "lora", "lora_rank": 4}),
    ("sd2x-lora-vpred", {"model_family": "sd2x", "model_type": "lora", "prediction_type": "v_prediction"}),
    ("sdxl-full-ema", {"model_family": "sdxl", "model_type": "full", "use_ema": True, "ema_decay": 0.99}),
    ("kolors-lora-dora", {"model_family": "kolors", "model_type": "lora", "use_dora": True}),
    ("legacy-name", {"model_family": "legacy", "model_type": "lora"}),
    ("flux-lora", {"model_family": "flux", "model_type": "lora", "flux_lora_target": "all+ffs",
                   "flux_guidance_mode": "random-range", "flux_guidance_min": 1.0}),
    ("flux-lora-tread", {"model_family": "flux", "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0,
                                                                       "end_layer_idx": -1}]}}),
    ("sd3-lora", {"model_family": "sd3", "sd3_clip_uncond_behaviour": "zero", "flow_schedule_shift": 1.0}),
    ("pixart-lycoris", {"model_family": "pixart_sigma", "lora_type": "lycoris"}),
    ("sana-lora", {"model_family": "sana"}),
    ("auraflow-lora", {"model_family": "auraflow"}),
    ("hidream-lora-quantized", {"model_family": "hidream", "model_type": "lora",
                                "base_model_precision": "int8-quanto"}),
    ("lumina2-lora", {"model_family": "lumina2"}),
    ("qwen-image-lora", {"model_family": "qwen_image"}),
    ("cosmos2image-lora", {"model_family": "cosmos2image"}),
    ("omnigen-lora", {"model_family": "omnigen"}),
    ("deepfloyd-lora", {"model_family": "deepfloyd"}),
    ("wan-video-lora", {"model_family": "wan", "validation_num_video_frames": 17}),
    ("ltxvideo-i2v", {"model_family": "ltxvideo", "ltx_train_mode": "t2v"}),
    ("sdxl-lycoris", {"model_family": "sdxl", "lora_type": "lycoris"}),
    # SimpleTuner refuses quantized full fine-tuning too: a working quantized config trains LoRA
    ("sdxl-quanto", {"model_family": "sdxl", "model_type": "lora", "base_model_precision": "int8-quanto"}),
    ("sdxl-controlnet", {"model_family": "sdxl", "controlnet": True}),
    ("sdxl-group-offload", {"model_family": "sdxl", "enable_group_offload": True}),
    ("sdxl-validation-preview", {"model_family": "sdxl", "validation_preview": True}),
    ("sdxl-crepa", {"model_family": "sdxl", "crepa_enabled": True, "crepa_block_index": 8}),
    ("sdxl-layersync", {"model_family": "sdxl", "layersync_enabled": True, "layersync_student_block": 4}),
    ("sdxl-scheduled-sampling", {"model_family": "sdxl", "scheduled_sampling_max_step_offset": 10}),
    ("sd1x-fp16", {"model_family": "sd1x", "mixed_precision": "fp16"}),
]


# Cases that are built but need a CUDA GPU (fp16 loss scaling runs there).
NEEDS_CUDA = {"sd1x-fp16"}


def _unbuilt(settings: dict[str, Any]) -> set[str]:
    """The options of ``settings`` the implemented marks (options/implemented/*.txt) do not cover."""
    missing = set()
    for name, value in settings.items():
        option = REGISTRY.get(name)
        if not option.implemented or (option.implemented_choices is not None and value not in option.implemented_choices):
            missing.add(option.name)
    return missing


def _trains(settings: dict[str, Any]) -> bool:
    return not _unbuilt(settings) and settings["model_family"] in implemented_families()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return build_tiny_dataset(tmp_path_factory.mktemp("corpus-images"), count=2, sizes=((32, 32),))


def _write_case(tmp_path: Path, settings: dict[str, Any], images: Path, model: str) -> str:
    datasets = tmp_path / "multidatabackend.json"
    entries = [
        {"id": "pics", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "metadata_backend": "discovery", "cache_dir_vae": str(tmp_path / "cache" / "vae" / "{model_family}"),
         "minimum_image_size": 0},
    ]
    if settings.get("controlnet"):  # SimpleTuner trains a ControlNet on a linked conditioning dataset only
        entries[0]["conditioning_data"] = "controls"
        entries.append({"id": "controls", "dataset_type": "conditioning", "conditioning_type": "controlnet",
                        "instance_data_dir": str(images)})
    datasets.write_text(json.dumps(entries))
    config = {
        **WEB_UI_DEFAULTS,
        # the user's paths and a run small enough for a test
        "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "out"),
        "data_backend_config": str(datasets), "cache_dir": str(tmp_path / "cache"),
        "logging_dir": str(tmp_path / "logs"), "max_train_steps": 1, "num_train_epochs": 0,
        "train_batch_size": 1, "resolution": 0.001024, "resolution_type": "area", "aspect_bucket_alignment": 16,
        "metrics_port": 0,
        **settings,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def _start(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """Exit code and every message (stderr plus warnings/errors logged) of one ``kubetuner-train`` call."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        code = int(main(argv))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith("kubetuner_trainer.train")]
    return code, capsys.readouterr().err + "\n".join(messages)


def test_web_ui_defaults_alone_load():
    TrainerConfig.from_mapping({**WEB_UI_DEFAULTS, "model_family": "sdxl", "output_dir": "/tmp/out",
                                "data_backend_config": "/tmp/d.json", "max_train_steps": 1})


@pytest.mark.parametrize(("case", "settings"), CASES, ids=[c for c, _ in CASES])
def test_case_trains_or_names_only_what_is_missing(case, settings, tmp_path, images, tiny_model, capsys, caplog,
                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    trains = _trains(settings)
    if trains and case in NEEDS_CUDA and not torch.cuda.is_available():
        # built, but it needs a CUDA GPU: refused here at configuration time, saying so
        argv = ["--config", _write_case(tmp_path, settings, images, str(tiny_model(settings["model_family"])))]
        code, said = _start(argv, capsys, caplog)
        assert code == ExitCode.CONFIG_ERROR and "needs a CUDA GPU" in said, said
        return
    model = str(tiny_model(settings["model_family"])) if trains else "someone/some-model"
    argv = ["--config", _write_case(tmp_path, settings, images, model)]
    printed_code, printed = _start([*argv, "--print-config"], capsys, caplog)
    started_code, started = _start(argv, capsys, caplog)
    assert (printed_code, printed) == (started_code, started) or trains, (printed, started)
    if trains:
        assert printed_code == ExitCode.SUCCESS and started_code == ExitCode.SUCCESS, started
        out = tmp_path / "out"  # a LoRA, a pipeline, or (--controlnet, full) the ControlNet's model folder
        assert list(out.glob("*.safetensors")) or (out / "model_index.json").exists() \
            or (out / "controlnet" / "config.json").exists()
        # {model_family} in the dataset's cache_dir_vae was filled in
        assert any(p.is_file() for p in (tmp_path / "cache" / "vae" / settings["model_family"]).rglob("*"))
        return
    assert printed_code == started_code == ExitCode.CONFIG_ERROR
    with pytest.raises(ConfigError) as refused:
        TrainerConfig.from_mapping(json.loads(Path(argv[1]).read_text()))
    named = {problem.option for problem in refused.value.problems}
    assert named == _unbuilt(settings), printed
    for problem in refused.value.problems:
        assert "not implement" in problem.message or "implements only" in problem.message, problem
