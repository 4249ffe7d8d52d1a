"""Qwen-Image on a tiny real model: conditioning as the pipeline builds it, flow-matching training,
exact resume, LoRA export (diffusers and ComfyUI) and loading into QwenImagePipeline, the trainer CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import (
    InMemoryData,
    assert_lora_resume_is_exact,
    fixed_flow_loss,
    train_in_process,
)

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training.preflight import check

LENGTH = 40  # text tokens: long enough for every test prompt after the template is dropped


def _cfg(make_cfg, **overrides):
    values = dict(tokenizer_max_length=LENGTH, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("qwen_image", **values)


def test_flavours_and_refusals(make_cfg):
    cls = family_class("qwen_image")
    assert resolve_source(cls, _cfg(make_cfg, pretrained_model_name_or_path=None)).model == "Qwen/Qwen-Image"
    assert cls.flavours["edit-v2"] == "Qwen/Qwen-Image-Edit-2509"
    for changes, option in (({"train_text_encoder": True}, "train_text_encoder"),
                            ({"tokenizer_max_length": 2000}, "tokenizer_max_length"),
                            ({"aspect_bucket_alignment": 8}, "aspect_bucket_alignment"),
                            ({"prediction_type": "epsilon"}, "prediction_type")):
        with pytest.raises(ConfigError) as info:
            check(_cfg(make_cfg, **changes))
        assert option in {p.option for p in info.value.problems}, (changes, info.value)


def test_conditioning_is_the_pipelines_padded_with_a_mask(make_cfg, tiny_model):
    from diffusers import QwenImagePipeline

    family = load_family(_cfg(make_cfg))
    prompts = ["a red cat", "a blue dog on a white background", ""]
    text = family.encode_text(prompts)
    assert text["prompt_embeds"].shape == (3, LENGTH, 32) and text["attention_mask"].shape == (3, LENGTH)
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model("qwen_image")))
    for i, prompt in enumerate(prompts):
        expected, mask = pipe.encode_prompt([prompt], device="cpu", max_sequence_length=LENGTH)
        n = expected.shape[1]
        assert mask is None  # one prompt: no padding in the pipeline's own result
        torch.testing.assert_close(text["prompt_embeds"][i, :n], expected[0])
        assert text["attention_mask"][i].tolist() == [1] * n + [0] * (LENGTH - n)
        assert torch.count_nonzero(text["prompt_embeds"][i, n:]) == 0
    # the tiny tokenizer splits the template as Qwen's does: after the pipeline's drop index an empty
    # caption leaves only the closing "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"
    assert int(text["attention_mask"][2].sum()) == 5
    # the transformer ignores masked padding: the prediction does not depend on the padding length
    longer = load_family(_cfg(make_cfg, tokenizer_max_length=LENGTH + 8))
    latents = family.encoders().encode_images(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert latents.shape == (3, 16, 8, 8)
    steps = torch.tensor([200.0, 500.0, 900.0])
    with torch.no_grad():
        a = family.predict(family.denoiser, latents, steps, text, None)
        b = longer.predict(longer.denoiser, latents, steps, longer.encode_text(prompts), None)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(make_cfg, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _cfg(make_cfg, model_type=model_type, max_train_steps=20, lora_rank=8,
               learning_rate=1e-2 if model_type == "lora" else 1e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = fixed_flow_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = fixed_flow_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == 20
    assert after < before * 0.9, (before, after)


def test_lora_resume_is_exact(make_cfg, tmp_path):
    assert_lora_resume_is_exact(lambda **kw: _cfg(make_cfg, max_train_steps=4, learning_rate=1e-3, gradient_checkpointing=True, **kw), tmp_path)


def _render(pipe) -> np.ndarray:
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, max_sequence_length=LENGTH,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_lora_loads_into_the_pipeline_and_comfyui_names_match_its_layers(make_cfg, tiny_model, tmp_path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    common = dict(max_train_steps=2, learning_rate=5e-2, lora_alpha=8)
    result, _, _ = train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "d"), **common))
    assert result.exit_code == ExitCode.SUCCESS
    plain = load_file(str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".", 1)[0] for k in plain} == {"transformer"}
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model("qwen_image")))
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "d"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8

    # ComfyUI maps "transformer.<diffusers layer path>" onto Qwen-Image (comfy/lora.py model_lora_keys_unet)
    train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "c"), lora_format="comfyui", **common))
    comfy = load_file(str(tmp_path / "c" / "pytorch_lora_weights.safetensors"))
    fresh = QwenImageTransformer2DModel.from_pretrained(str(tiny_model("qwen_image")), subfolder="transformer")
    linear_layers = {f"transformer.{n}" for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)}
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert bases and bases <= linear_layers, sorted(bases - linear_layers)[:5]
    assert all({f"{b}.lora_down.weight", f"{b}.lora_up.weight", f"{b}.alpha"} <= comfy.keys() for b in bases)
    assert len(comfy) == len(plain) + len(bases)


def test_qwen_image_trains_through_kubetuner_train_with_validation(tiny_model, tmp_path):
    from PIL import Image

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.tiny import build_tiny_dataset

    images = build_tiny_dataset(tmp_path / "images", count=4, sizes=((64, 64),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(images),
                                     "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
                                     "cache_dir_vae": str(tmp_path / "cache" / "vae")},
                                    {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True,
                                     "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {"model_family": "qwen_image", "model_type": "lora", "pretrained_model_name_or_path":
              str(tiny_model("qwen_image")), "data_backend_config": str(datasets), "output_dir": str(tmp_path / "out"),
              "aspect_bucket_alignment": 32, "train_batch_size": 2, "max_train_steps": 2, "checkpoint_step_interval": 1,
              "mixed_precision": "no", "tokenizer_max_length": LENGTH, "learning_rate": 1e-3, "lora_rank": 4,
              "validation_prompt": "a red circle", "validation_negative_prompt": "blurry",
              "validation_steps": 2, "validation_resolution": "32", "validation_num_inference_steps": 2,
              "validation_guidance_real": 2.0, "seed": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    rendered = sorted((out / "validation" / "step-2").glob("*.png"))
    assert rendered and Image.open(rendered[0]).size == (32, 32)
