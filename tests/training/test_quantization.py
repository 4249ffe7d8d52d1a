"""Quantized bases (issue 16): LoRA trains on a quanto/torchao-quantized tiny model and saves an
unquantized adapter that loads into the ordinary diffusers pipeline; presets and precisions that
need CUDA are refused on this CUDA-less machine, naming what they need (exit 78)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from training_helpers import train_in_process

from kubetuner_trainer.cli import main
from kubetuner_trainer.models import quantization
from kubetuner_trainer.training.preflight import all_problems, all_warnings


def _quantized_layers(module: torch.nn.Module) -> int:
    """Linear layers holding quantized weights (a quanto QLinear, or a torchao/SDNQ tensor subclass)."""
    return sum(1 for sub in module.modules()
               if type(sub).__name__.startswith(("QLinear", "SDNQLinear")) or (
                   isinstance(sub, torch.nn.Linear) and type(sub.weight).__name__ not in ("Parameter", "Tensor")))


def _lora_file(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _unquantized_pipeline(tiny_model, out):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model("sd1x")))
    pipe.load_lora_weights(str(out))
    assert _quantized_layers(pipe.unet) == 0 and pipe.unet.peft_config
    return pipe


def test_lora_on_an_int8_quanto_base_and_text_encoder_learns_and_renders_unquantized(make_cfg, tiny_model, tmp_path):
    cfg = make_cfg(base_model_precision="int8-quanto", text_encoder_1_precision="int8-quanto", max_train_steps=6,
                   learning_rate=5e-2, lora_alpha=8)
    result, family, _ = train_in_process(cfg)
    assert _quantized_layers(family.denoiser) > 10 and _quantized_layers(family.text_encoders[0]) > 4
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2]), result.losses
    tensors = _lora_file(tmp_path / "out")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    pipe = _unquantized_pipeline(tiny_model, tmp_path / "out")
    image = pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.isfinite(image).all()


@pytest.mark.parametrize("preset", ["int4-quanto", "int8-torchao"])
def test_lora_on_other_quantized_bases_learns_and_loads_unquantized(make_cfg, tiny_model, tmp_path, preset):
    cfg = make_cfg(base_model_precision=preset, max_train_steps=6, learning_rate=5e-2)
    result, family, _ = train_in_process(cfg)
    assert _quantized_layers(family.denoiser) > 10
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2]), result.losses
    _unquantized_pipeline(tiny_model, tmp_path / "out")


def test_quantize_via_pipeline_loads_quantized_from_presets_and_quantization_config(make_cfg):
    from kubetuner_trainer.models import load_family

    cfg = make_cfg(quantize_via="pipeline", base_model_precision="int8-quanto",
                   quantization_config={"text_encoder": {"quant_method": "quanto", "weights_dtype": "int4"}})
    family = load_family(cfg)
    assert _quantized_layers(family.denoiser) > 10 and _quantized_layers(family.text_encoders[0]) > 4
    assert family.denoiser.config.quantization_config.weights_dtype == "int8"


def test_sdnq_quantizes_a_linear_layer_at_its_level():
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256))
    quantization.quantize_module(layer, quantization.PRESETS["uint8-sdnq"])
    assert _quantized_layers(layer) == 1 and layer[0].weight.dtype == torch.uint8
    assert layer(torch.randn(2, 256)).shape == (2, 256)


def _messages(cfg) -> list[str]:
    return [str(p) for p in all_problems(cfg)]


CUDA_PRESETS = sorted(n for n, p in quantization.PRESETS.items() if p.requires)


@pytest.mark.parametrize("preset", CUDA_PRESETS)
def test_cuda_only_presets_are_refused_here_naming_the_requirement(make_cfg, preset):
    via = "pipeline" if quantization.PRESETS[preset].pipeline_only else "cpu"
    messages = _messages(make_cfg(base_model_precision=preset, text_encoder_1_precision=preset, quantize_via=via))
    for option in ("base_model_precision", "text_encoder_1_precision"):
        assert any(m.startswith(f"--{option}='{preset}'") and "needs a CUDA GPU" in m for m in messages), messages


def test_cuda_only_precisions_and_quantized_full_training_are_refused(make_cfg):
    assert any("fp16 needs a CUDA GPU" in m for m in _messages(make_cfg(mixed_precision="fp16")))
    fp8 = _messages(make_cfg(mixed_precision="fp8", base_model_precision="int8-quanto"))
    assert any("compute capability 8.9" in m for m in fp8) and any("int8-quanto base" in m for m in fp8)
    full = _messages(make_cfg(model_type="full", base_model_precision="int8-quanto"))
    assert any(m.startswith("--base_model_precision='int8-quanto'") and "model_type=lora" in m for m in full)
    bad_key = _messages(make_cfg(quantize_via="pipeline", quantization_config={"transformer": {"load_in_4bit": True}}))
    assert any("not a component of sd1x" in m and "unet, text_encoder" in m for m in bad_key), bad_key


def test_text_encoder_presets_beyond_the_family_and_stray_activations_only_warn(make_cfg):
    warnings = [str(w) for w in all_warnings(make_cfg(text_encoder_2_precision="int8-quanto"))]
    assert any(w.startswith("--text_encoder_2_precision") and "1 text encoder" in w for w in warnings)
    warnings = [str(w) for w in all_warnings(make_cfg(base_model_precision="int8-torchao", quantize_activations=True))]
    assert any(w.startswith("--quantize_activations") and "only quanto presets" in w for w in warnings)


def test_kubetuner_train_exits_78_naming_the_preset_and_its_requirement(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("KUBETUNER_TERMINATION_LOG", str(tmp_path / "termination"))
    images = tmp_path / "images"
    images.mkdir()
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "pics", "type": "local", "instance_data_dir": str(images)}]))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": "org/tiny-sd",
        "output_dir": str(tmp_path / "out"), "optimizer": "bnb-adamw8bit", "max_train_steps": 4,
        "data_backend_config": str(datasets), "base_model_precision": "fp8-torchao"}))
    assert main(["--config", str(config)]) == 78
    said = capsys.readouterr().err + caplog.text
    assert "--base_model_precision='fp8-torchao'" in said and "compute capability 8.9" in said
    assert "--optimizer='bnb-adamw8bit'" in said and "needs a CUDA device" in said
