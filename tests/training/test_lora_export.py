"""Exported LoRA files load into diffusers pipelines, in diffusers and ComfyUI key formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from training_helpers import train_in_process

PIPELINES = {"sd1x": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def _render(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, generator=gen,
                output_type="np").images[0]


def _pipeline(family, folder):
    import diffusers

    return getattr(diffusers, PIPELINES[family]).from_pretrained(str(folder))


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_saved_lora_loads_with_load_lora_weights_and_changes_the_output(make_cfg, tiny_model, tmp_path, family):
    cfg = make_cfg(family, max_train_steps=3, learning_rate=5e-2, lora_alpha=8, train_text_encoder=True)
    result, _, _ = train_in_process(cfg)
    lora_file = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys)

    pipe = _pipeline(family, tiny_model(family))
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"))
    with_lora = _render(pipe)
    assert np.abs(base - with_lora).max() > 1e-3
    # the adapter carries our alpha (8 over rank 4), read back from the file's metadata
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8


def test_comfyui_format_uses_kohya_keys_and_loads_to_the_same_result(make_cfg, tiny_model, tmp_path):
    common = dict(max_train_steps=2, learning_rate=5e-2, lora_alpha=2)
    train_in_process(make_cfg(output_dir=str(tmp_path / "diffusers"), **common))
    train_in_process(make_cfg(output_dir=str(tmp_path / "comfy"), lora_format="comfyui", **common))
    comfy_file = tmp_path / "comfy" / "pytorch_lora_weights.safetensors"
    with safe_open(str(comfy_file), "pt") as f:
        keys = set(f.keys())
        alpha_key = next(k for k in keys if k.endswith(".alpha"))
        assert float(f.get_tensor(alpha_key)) == 2.0
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".lora_up.weight") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys

    pipe = _pipeline("sd1x", tiny_model("sd1x"))
    pipe.load_lora_weights(str(tmp_path / "diffusers"), adapter_name="a")
    pipe.set_adapters(["a"])
    from_diffusers = _render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(comfy_file), adapter_name="b")
    pipe.set_adapters(["b"])
    from_comfy = _render(pipe)
    np.testing.assert_allclose(from_diffusers, from_comfy, atol=1e-5)
