"""OmniGen on a tiny real model: token conditioning as the pipeline's collator builds it, the inverted
flow, flow-matching training, exact resume, LoRA loading into the OmniGen pipeline, the trainer CLI."""

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

LENGTH = 56  # prompt tokens with OmniGen's instruction template


def _cfg(make_cfg, **overrides):
    values = dict(tokenizer_max_length=LENGTH, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("omnigen", **values)


def test_flavour_and_refusals(make_cfg):
    cls = family_class("omnigen")
    assert resolve_source(cls, _cfg(make_cfg, pretrained_model_name_or_path=None)).model == "Shitao/OmniGen-v1-diffusers"
    for changes, option in (({"train_text_encoder": True}, "train_text_encoder"),
                            ({"lora_format": "comfyui"}, "lora_format"),
                            ({"prediction_type": "epsilon"}, "prediction_type")):
        with pytest.raises(ConfigError) as info:
            check(_cfg(make_cfg, **changes))
        assert option in {p.option for p in info.value.problems}, (changes, info.value)


def test_prediction_matches_the_pipelines_collated_inputs(make_cfg):
    family = load_family(_cfg(make_cfg))
    prompts = ["a red cat", "a blue dog on a white background"]
    text = family.encode_text(prompts)
    processor = family._processor()
    tokens = [processor.process_multi_modal_prompt(p, None) for p in prompts]
    for row, t in enumerate(tokens):
        n = len(t["input_ids"])
        assert text["input_ids"][row, -n:].tolist() == t["input_ids"]
        assert text["attention_mask"][row].tolist() == [0] * (LENGTH - n) + [1] * n
    latents, steps = torch.randn(2, 4, 4, 4), torch.tensor([250.0, 750.0])
    # the pipeline's own collation (pad to the batch's longest prompt, OmniGen's masks and positions)
    ids, positions, attention, *_ = processor.collator.process_mllm_input(tokens, [[32, 32]] * 2)
    with torch.no_grad():
        expected = family.denoiser(hidden_states=latents, timestep=1.0 - steps / 1000.0, input_ids=ids,
                                   input_img_latents=[], input_image_sizes={}, attention_mask=attention,
                                   position_ids=positions, return_dict=False)[0]
        ours = family.predict(family.denoiser, latents, steps, text, None)
        longer = load_family(_cfg(make_cfg, tokenizer_max_length=LENGTH + 16))
        padded = longer.predict(longer.denoiser, latents, steps, longer.encode_text(prompts), None)
    torch.testing.assert_close(ours, -expected)
    torch.testing.assert_close(padded, ours)
    with pytest.raises(ValueError, match="tokenizer_max_length"):
        family.encode_text(["a very long caption " * 20])


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
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_saved_lora_loads_into_the_omnigen_pipeline_and_changes_its_output(make_cfg, tiny_model, tmp_path):
    result, family, _ = train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "d"), max_train_steps=2,
                                              learning_rate=5e-2, lora_alpha=8))
    assert result.exit_code == ExitCode.SUCCESS
    plain = load_file(str(tmp_path / "d" / "pytorch_lora_weights.safetensors"))
    assert plain and {k.split(".", 1)[0] for k in plain} == {"transformer"}
    # OmniGenPipeline plus diffusers' transformer LoRA loader, around the transformer with PEFT methods
    folder = str(tiny_model("omnigen"))
    transformer = family.denoiser_class().from_pretrained(folder, subfolder="transformer")
    pipe = family.lora_loader_class().from_pretrained(folder, transformer=transformer)
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "d"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8
    # what the trainer saves names the upstream classes: plain diffusers loads it
    index = json.loads((tiny_model("omnigen") / "model_index.json").read_text())
    assert index["_class_name"] == "OmniGenPipeline" and index["transformer"][1] == "OmniGenTransformer2DModel"


def test_omnigen_trains_through_kubetuner_train_with_validation(tiny_model, tmp_path):
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
    config = {"model_family": "omnigen", "model_type": "lora", "pretrained_model_name_or_path":
              str(tiny_model("omnigen")), "data_backend_config": str(datasets), "output_dir": str(tmp_path / "out"),
              "train_batch_size": 2, "max_train_steps": 2, "checkpoint_step_interval": 1, "mixed_precision": "no",
              "tokenizer_max_length": LENGTH, "learning_rate": 1e-3, "lora_rank": 4,
              "validation_prompt": "a red circle", "validation_negative_prompt": "blurry", "validation_steps": 2,
              "validation_resolution": "32", "validation_num_inference_steps": 2, "seed": 1}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    rendered = sorted((out / "validation" / "step-2").glob("*.png"))
    assert rendered and Image.open(rendered[0]).size == (32, 32)
