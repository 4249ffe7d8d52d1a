"""SD3 on a tiny real model: conditioning, flow-matching training, resume, LoRA export and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training import checkpoints as ckpt

CLIP_TOKENS = 77


def _sd3_cfg(make_cfg, **overrides):
    values = dict(tokenizer_max_length=16, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("sd3", **values)


def _parts(embeds: torch.Tensor, clip_width: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP part [B, 77, clip_width], T5 part [B, L, d]) of SD3 prompt embeddings."""
    return embeds[:, :CLIP_TOKENS, :clip_width], embeds[:, CLIP_TOKENS:]


def test_flavours_name_simpletuners_sd3_hub_ids(make_cfg):
    cls = family_class("sd3")
    assert cls.default_flavour == "medium"
    src = resolve_source(cls, _sd3_cfg(make_cfg, pretrained_model_name_or_path=None, model_flavour="large"))
    assert src.model == "stabilityai/stable-diffusion-3.5-large"
    problems = cls.config_problems(_sd3_cfg(make_cfg, tokenizer_max_length=300))
    assert [p.option for p in problems] == ["tokenizer_max_length"]
    assert not cls.config_problems(_sd3_cfg(make_cfg, tokenizer_max_length=300, i_know_what_i_am_doing=True))


def test_conditioning_shapes_padding_and_uncond_behaviours(make_cfg):
    family = load_family(_sd3_cfg(make_cfg))
    prompts = ["a red cat", ""]
    text = family.encode_text(prompts)
    assert text["prompt_embeds"].shape == (2, CLIP_TOKENS + 16, 48)
    assert text["pooled_prompt_embeds"].shape == (2, 40)
    clip, t5 = _parts(text["prompt_embeds"])
    assert torch.count_nonzero(text["prompt_embeds"][:, :CLIP_TOKENS, 40:]) == 0  # CLIP padded up to the T5 width
    assert torch.count_nonzero(t5[0, 12:]) > 0  # unmodified: T5 padding positions keep their states

    zeroed = load_family(_sd3_cfg(make_cfg, t5_padding="zero")).encode_text(prompts)
    _, t5_zero = _parts(zeroed["prompt_embeds"])
    tokens = len(family.tokenizers[2]("a red cat").input_ids)  # with </s>
    assert torch.count_nonzero(t5_zero[0, tokens:]) == 0 and torch.count_nonzero(t5_zero[0, :tokens]) > 0
    torch.testing.assert_close(t5_zero[0, :tokens], t5[0, :tokens])

    cases = {("zero", None): (True, True), ("zero", "empty_string"): (True, False),
             ("empty_string", "zero"): (False, True), ("empty_string", None): (False, False)}
    for (clip_rule, t5_rule), (clip_zero, t5_zero_expected) in cases.items():
        out = load_family(_sd3_cfg(make_cfg, sd3_clip_uncond_behaviour=clip_rule,
                                   sd3_t5_uncond_behaviour=t5_rule)).encode_text(prompts)
        clip_u, t5_u = _parts(out["prompt_embeds"])
        assert (torch.count_nonzero(clip_u[1]) == 0) == clip_zero, (clip_rule, t5_rule)
        assert (torch.count_nonzero(out["pooled_prompt_embeds"][1]) == 0) == clip_zero
        assert (torch.count_nonzero(t5_u[1]) == 0) == t5_zero_expected, (clip_rule, t5_rule)
        torch.testing.assert_close(out["prompt_embeds"][0], text["prompt_embeds"][0])  # captions untouched


@torch.no_grad()
def _fixed_flow_loss(family, data: InMemoryData) -> float:
    """Mean velocity loss over the training images at fixed sigmas and fixed noise."""
    gen = torch.Generator().manual_seed(123)
    latents = data.latents
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for sigma in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.full((latents.shape[0],), sigma * 1000.0)
        noisy = family.objective.noisy_latents(latents, noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, text, None)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(latents, noise, steps)))
    return total / 4


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_one_step_then_the_loss_falls_on_an_overfit_batch(make_cfg, model_type):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _sd3_cfg(make_cfg, model_type=model_type, max_train_steps=20, lora_rank=8,
                   learning_rate=1e-2 if model_type == "lora" else 1e-3)
    family = load_family(cfg)
    data = InMemoryData(family.encoders(), count=2, batch_size=2)
    before = _fixed_flow_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = _fixed_flow_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == 20
    assert after < before * 0.9, (before, after)


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_resume_is_exact(make_cfg, tmp_path, model_type):
    common = dict(model_type=model_type, max_train_steps=4, learning_rate=1e-3, use_ema=model_type == "full",
                  train_text_encoder=model_type == "lora", gradient_checkpointing=True)
    straight, _, straight_data = train_in_process(_sd3_cfg(make_cfg, output_dir=str(tmp_path / "a"), **common))
    split_cfg = _sd3_cfg(make_cfg, output_dir=str(tmp_path / "b"), **common)
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2))
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume)
    assert second.exit_code == ExitCode.SUCCESS
    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    name = "pytorch_lora_weights.safetensors" if model_type == "lora" else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def _render(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, generator=gen,
                max_sequence_length=16, output_type="np").images[0]


def test_saved_lora_loads_into_the_sd3_pipeline_and_changes_its_output(make_cfg, tiny_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    cfg = _sd3_cfg(make_cfg, max_train_steps=3, learning_rate=5e-2, lora_alpha=8, train_text_encoder=True)
    result, _, _ = train_in_process(cfg)
    assert result.exit_code == ExitCode.SUCCESS
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder", "text_encoder_2"}  # never T5

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_model("sd3")))
    base = _render(pipe)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8
    assert "default_0" in pipe.text_encoder_2.peft_config


#: per joint block, the diffusers layer names ComfyUI maps onto its MMDiT (its ``mmdit_to_diffusers`` rules)
COMFY_SD3_BLOCK_LAYERS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
)
#: ComfyUI's CLIP layer names (kohya): lora_te1 = CLIP-L, lora_te2 = CLIP-G when CLIP-L is present
COMFY_CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2")


def _comfy_sd3_names(blocks: int, clip_layers: int) -> set[str]:
    names = {"lora_transformer_" + f"transformer_blocks.{i}.{layer}".replace(".", "_")
             for i in range(blocks) for layer in COMFY_SD3_BLOCK_LAYERS}
    names |= {f"lora_te{n}_text_model_encoder_layers_{b}_{layer.replace('.', '_')}"
              for n in (1, 2) for b in range(clip_layers) for layer in COMFY_CLIP_LAYERS}
    return names


def test_comfyui_export_uses_the_names_comfyui_maps_for_sd3(make_cfg, tmp_path):
    common = dict(max_train_steps=2, learning_rate=5e-2, lora_alpha=2, train_text_encoder=True)
    train_in_process(_sd3_cfg(make_cfg, output_dir=str(tmp_path / "diffusers"), **common))
    train_in_process(_sd3_cfg(make_cfg, output_dir=str(tmp_path / "comfy"), lora_format="comfyui", **common))
    comfy = load_file(str(tmp_path / "comfy" / "pytorch_lora_weights.safetensors"))
    plain = load_file(str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"))
    known = _comfy_sd3_names(blocks=2, clip_layers=2)
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy}
    assert bases <= known, sorted(bases - known)[:5]
    assert any(b.startswith("lora_transformer_") for b in bases) and any(b.startswith("lora_te2_") for b in bases)
    assert all(float(comfy[f"{b}.alpha"]) == 2.0 for b in bases)
    # the same training run in both formats: every ComfyUI tensor is the diffusers one under its new name
    assert len(comfy) == len(plain) + len(bases)
    for base, layer in (("lora_transformer_transformer_blocks_0_attn2_to_q", "transformer.transformer_blocks.0.attn2.to_q."),
                        ("lora_te1_text_model_encoder_layers_1_self_attn_v_proj",
                         "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.")):
        for comfy_part, plain_parts in ((".lora_down.weight", ("lora_A", "down")), (".lora_up.weight", ("lora_B", "up"))):
            (plain_key,) = [k for k in plain if k.startswith(layer) and any(f".{p}." in k for p in plain_parts)]
            assert torch.equal(comfy[base + comfy_part], plain[plain_key]), (base, plain_key)


def test_a_simpletuner_sd3_lora_config_trains_through_kubetuner_train(tiny_model, tmp_path):
    """SimpleTuner's SD3 LoRA example in our words: its options as published, paths swapped, sizes tiny."""
    import json

    from PIL import Image

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.tiny import build_tiny_dataset

    images = build_tiny_dataset(tmp_path / "images", count=6, sizes=((64, 64),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([
        {"id": "subject", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel", "cache_dir_vae": str(tmp_path / "cache" / "vae")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {
        "model_family": "sd3", "model_type": "lora", "lora_type": "standard", "lora_rank": 128, "lora_alpha": 128,
        "base_model_precision": "no_change", "quantize_via": "cpu", "mixed_precision": "bf16",
        "optimizer": "adamw_bf16", "learning_rate": 1e-4, "lr_scheduler": "constant", "flow_schedule_shift": 3,
        "gradient_checkpointing": True, "grad_clip_method": "value", "disable_bucket_pruning": True,
        "train_batch_size": 3, "vae_batch_size": 1, "seed": 42, "use_ema": False, "num_train_epochs": 0,
        "push_to_hub": False, "push_checkpoints_to_hub": False, "report_to": "none",
        "hub_model_id": "simpletuner-example-sd3-peft-lora", "tracker_project_name": "lora-training",
        "tracker_run_name": "example-training-run",
        "validation_prompt": "🟫 is holding a sign that says hello world from sd3",
        "validation_negative_prompt": "ugly, cropped, blurry, low-quality, mediocre average",
        "validation_guidance": 1.0, "validation_guidance_rescale": 0.0, "validation_guidance_skip_layers": [7, 8, 9],
        "validation_disable_unconditional": True, "validation_prompt_library": False, "validation_seed": 42,
        "validation_torch_compile": False,
        # paths swapped, sizes for a tiny model on CPU
        "pretrained_model_name_or_path": str(tiny_model("sd3")), "data_backend_config": str(datasets),
        "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "checkpoint_step_interval": 1,
        "validation_steps": 2, "validation_resolution": "32x32", "validation_num_inference_steps": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    from accelerate.state import AcceleratorState

    try:
        assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    finally:
        AcceleratorState._reset_state()  # the run's bf16 state must not leak into later tests in this process
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    rendered = sorted((out / "validation" / "step-2").glob("*.png"))
    assert rendered and Image.open(rendered[0]).size == (32, 32)
