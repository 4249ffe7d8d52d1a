"""Per-family quantization exclusions (SimpleTuner 3.1.6's quanto lists): the named layers stay in full
precision, the rest of the denoiser is quantized, and a LoRA still trains on the quantized base."""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from training_helpers import train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family, quantization
from kubetuner_trainer.models.family import DIT_QUANTIZATION_EXCLUDE


def _layers(denoiser: torch.nn.Module) -> tuple[set[str], set[str]]:
    """(quanto-quantized layer names, full-precision Linear layer names); a LoRA-wrapped layer counts by its base
    layer, the adapters' own layers are left out."""
    quantized, plain = set(), set()
    for name, module in denoiser.named_modules():
        if "lora_" in name:
            continue
        name = name.removesuffix(".base_layer")
        if type(module).__name__.startswith("QLinear"):
            quantized.add(name)
        elif type(module) is torch.nn.Linear:
            plain.add(name)
    return quantized, plain


def test_every_family_has_simpletuners_list():
    lists = {name: family_class(name).quantization_exclude for name in ("sd3", "wan", "ltxvideo", "flux", "sdxl",
                                                                        "pixart_sigma", "qwen_image", "hidream")}
    assert lists["sd3"] == lists["wan"] == lists["ltxvideo"] == DIT_QUANTIZATION_EXCLUDE
    assert {"proj_out", "x_embedder", "context_embedder", "norm_out"} <= set(lists["flux"])
    assert lists["sdxl"] == lists["pixart_sigma"] == lists["qwen_image"] == lists["hidream"] == ()


def test_sd3_keeps_its_excluded_layers_unquantized_and_a_lora_trains(make_cfg):
    cfg = make_cfg("sd3", base_model_precision="int8-quanto", max_train_steps=2, learning_rate=5e-2)
    result, family, _ = train_in_process(cfg)
    assert result.exit_code == ExitCode.SUCCESS and all(torch.isfinite(torch.tensor(result.losses)))
    quantized, plain = _layers(family.denoiser)
    assert {"proj_out", "context_embedder", "transformer_blocks.0.norm1.linear",
            "time_text_embed.timestep_embedder.linear_1"} <= plain
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2"} <= quantized
    assert not any(fnmatch(name, p) for name in quantized for p in DIT_QUANTIZATION_EXCLUDE)
    assert all(any(fnmatch(name, p) for p in DIT_QUANTIZATION_EXCLUDE) for name in plain)
    trained = [m for n, m in family.denoiser.named_modules() if n.endswith("attn.to_q") and hasattr(m, "lora_B")]
    assert trained and all(float(m.lora_B["default"].weight.detach().abs().sum()) > 0 for m in trained)


def test_flux_keeps_its_own_list_by_exact_module_name(make_cfg):
    family = load_family(make_cfg("flux", base_model_precision="int8-quanto"))
    quantized, plain = _layers(family.denoiser)
    assert {"x_embedder", "proj_out", "context_embedder"} <= plain
    # quanto matches the whole module name: "norm_out" keeps the norm, not its inner Linear (as in SimpleTuner)
    assert {"norm_out.linear", "transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"} <= quantized


def test_fp8_torchao_leaves_the_output_projection_alone():
    model = torch.nn.Sequential()
    model.add_module("proj_out", torch.nn.Linear(32, 32))
    model.add_module("to_q", torch.nn.Linear(32, 32))
    converted = quantization.quantize_module(model, quantization._preset("fp8-torchao"))
    assert type(converted.proj_out) is torch.nn.Linear and type(converted.to_q).__name__ == "Float8Linear"
