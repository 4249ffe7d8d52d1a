"""Wan on a tiny real model: flavours, video latents, LoRA on clips, WanPipeline loading, kubetuner-train."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import safe_open
from training_helpers import InMemoryData, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.loading import resolve_source

CLIP_FRAMES = 5  # 1 + 4k: two latent frames


def _wan_cfg(make_cfg, **overrides):
    values = dict(lr_scheduler="constant", validation_num_video_frames=CLIP_FRAMES)
    values.update(overrides)
    return make_cfg("wan", **values)


def _clip_data(count: int = 2):
    """A loop data source whose latents are 5-frame clips ``[B, C, 2, h, w]`` encoded by the family."""

    def factory(encoders):
        data = InMemoryData(encoders, count=count, batch_size=count)
        clips = torch.rand(count, 3, CLIP_FRAMES, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
        data.latents = encoders.encode_images(clips)
        return data

    return factory


def test_flavours_and_rules_follow_simpletuner(make_cfg):
    cls = family_class("wan")
    assert cls.default_flavour == "t2v-480p-1.3b-2.1" and len(cls.flavours) == 10
    src = resolve_source(cls, _wan_cfg(make_cfg, pretrained_model_name_or_path=None, model_flavour="t2v-480p-14b-2.1"))
    assert src.model == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    assert [cls.video_frame_count(n) for n in (1, 9, 10, 150)] == [1, 9, 9, 149]
    problems = cls.config_problems(_wan_cfg(make_cfg, model_flavour="vace-1.3b-2.1", train_text_encoder=True,
                                            aspect_bucket_alignment=24))
    assert [p.option for p in problems] == ["model_flavour", "train_text_encoder", "aspect_bucket_alignment"]
    assert "allowed: t2v-480p-1.3b-2.1, t2v-480p-14b-2.1, i2v-14b-2.1" in problems[0].message
    assert not cls.config_problems(_wan_cfg(make_cfg, model_flavour="t2v-480p-14b-2.1"))


def test_latents_are_normalised_clips_and_text_padding_is_zero(make_cfg):
    family = load_family(_wan_cfg(make_cfg))
    encoders = family.encoders()
    pixels = torch.rand(1, 3, CLIP_FRAMES, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encoders.encode_images(pixels)
    assert latents.shape == (1, 4, 2, 4, 6) and encoders.latent_downscale == 8
    raw = family.vae.encode(pixels).latent_dist.mode()
    config = family.vae.config
    std = torch.tensor(config.latents_std).view(1, 4, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents * std + mean, raw)  # what WanPipeline undoes before decoding
    assert encoders.encode_images(pixels[:, :, 0]).shape == (1, 4, 1, 4, 6)  # an image is a 1-frame clip
    text = family.encode_text(["a red cat", ""])
    tokens = len(family.tokenizers[0]("a red cat").input_ids)
    assert text["prompt_embeds"].shape == (2, 512, 32)
    assert torch.count_nonzero(text["prompt_embeds"][0, tokens:]) == 0
    assert torch.count_nonzero(text["prompt_embeds"][0, :tokens]) > 0
    assert int(text["attention_mask"][0].sum()) == tokens


@torch.no_grad()
def _fixed_flow_loss(family, data) -> float:
    gen = torch.Generator().manual_seed(123)
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for sigma in (0.25, 0.5, 0.75):
        noise = torch.randn(data.latents.shape, generator=gen)
        steps = torch.full((data.latents.shape[0],), sigma * 1000.0)
        noisy = family.objective.noisy_latents(data.latents, noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, text, None)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(data.latents, noise, steps)))
    return total / 3


def test_a_lora_on_clips_steps_and_its_loss_falls_on_an_overfit_batch(make_cfg):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _wan_cfg(make_cfg, max_train_steps=15, lora_rank=8, learning_rate=1e-2, noise_offset=0.1)
    family = load_family(cfg)
    data = _clip_data()(family.encoders())
    before = _fixed_flow_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    after = _fixed_flow_loss(family, data)
    assert result.exit_code == ExitCode.SUCCESS and len(result.losses) == 15
    assert all(np.isfinite(result.losses))
    assert after < before * 0.9, (before, after)


def _render(pipe) -> np.ndarray:
    out = pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, num_frames=CLIP_FRAMES,
               generator=torch.Generator().manual_seed(0), max_sequence_length=32, output_type="np")
    return out.frames[0]


def test_saved_lora_loads_into_wanpipeline_and_changes_its_output(make_cfg, tiny_model, tmp_path):
    from diffusers import WanPipeline

    cfg = _wan_cfg(make_cfg, max_train_steps=3, learning_rate=5e-2, lora_alpha=8)
    result, _, _ = train_in_process(cfg, data_factory=_clip_data())
    assert result.exit_code == ExitCode.SUCCESS
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        architecture = f.metadata().get("modelspec.architecture")
    assert keys and {k.split(".")[0] for k in keys} == {"transformer"}
    assert architecture == "wan-2.1-t2v/lora"

    pipe = WanPipeline.from_pretrained(str(tiny_model("wan")))
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe)
    assert base.shape == (CLIP_FRAMES, 32, 32, 3)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8


def test_a_simpletuner_wan_lora_config_with_a_video_dataset_trains_through_kubetuner_train(tiny_model, tmp_path):
    """SimpleTuner's Wan LoRA example in our words: its options as published, paths swapped, sizes tiny."""
    from accelerate.state import AcceleratorState

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.data.video import probe_video
    from kubetuner_trainer.tiny import build_tiny_video_dataset

    clips = build_tiny_video_dataset(tmp_path / "clips", count=2, frames=12, fps=16, sizes=((32, 32),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([
        {"id": "disney-black-and-white", "type": "local", "dataset_type": "video", "instance_data_dir": str(clips),
         "caption_strategy": "textfile", "resolution": 0.001024, "resolution_type": "area", "repeats": 0,
         "cache_dir_vae": str(tmp_path / "cache" / "vae" / "{model_family}"),
         "video": {"num_frames": 11, "min_frames": 11}},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(tmp_path / "cache" / "text")}]))
    config = {
        "model_family": "wan", "model_flavour": "t2v-480p-1.3b-2.1", "model_type": "lora", "lora_rank": 16,
        "lora_alpha": 16, "base_model_precision": "no_change", "mixed_precision": "bf16", "optimizer": "adamw_bf16",
        "learning_rate": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0, "flow_schedule_shift": 3,
        "gradient_checkpointing": True, "train_batch_size": 1, "vae_batch_size": 1, "seed": 42,
        "aspect_bucket_alignment": 32, "framerate": 16, "num_train_epochs": 0, "report_to": "none",
        "validation_prompt": "a black and white animated scene of a mouse steering a boat",
        "validation_negative_prompt": "blurry, low quality", "validation_guidance": 5.2,
        "validation_num_video_frames": CLIP_FRAMES, "validation_seed": 42, "validation_prompt_library": False,
        # paths swapped, sizes for a tiny model on CPU
        "pretrained_model_name_or_path": str(tiny_model("wan")), "data_backend_config": str(datasets),
        "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "checkpoint_step_interval": 1,
        "validation_steps": 2, "validation_resolution": "32x32", "validation_num_inference_steps": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    try:
        assert main(["--config", str(path), "--metrics_port", "0"]) == ExitCode.SUCCESS
    finally:
        AcceleratorState._reset_state()  # the run's bf16 state must not leak into later tests in this process
    out = tmp_path / "out"
    assert (out / "checkpoint-1").is_dir() and (out / "pytorch_lora_weights.safetensors").is_file()
    cached = list((tmp_path / "cache" / "vae" / "wan").rglob("*.safetensors*"))
    assert len(cached) == 2  # num_frames 11 -> 9 frames (1 + 4k), one entry per clip
    step = out / "validation" / "step-2"
    (entry,) = json.loads((step / "index.json").read_text())
    assert entry["frames"] == CLIP_FRAMES and entry["fps"] == 16.0
    clip = probe_video((step / entry["video"]).read_bytes())
    assert (clip.width, clip.height, clip.frames) == (32, 32, CLIP_FRAMES)
    assert (step / entry["gif"]).is_file() and (step / entry["file"]).is_file()


def test_resume_is_exact_through_the_data_pipeline_with_clips_and_images(make_cfg, tmp_path):
    """A video dataset (frame windows drawn per clip) next to an image dataset (1-frame clips): a run stopped
    after 2 steps and resumed equals the straight run, batch for batch and weight for weight."""
    from safetensors.torch import load_file
    from training_helpers import RecordingEvents

    from kubetuner_trainer.data import build_training_data
    from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_video_dataset
    from kubetuner_trainer.training import checkpoints as ckpt

    clips = build_tiny_video_dataset(tmp_path / "clips", count=2, frames=13, sizes=((32, 32),))
    images = build_tiny_dataset(tmp_path / "images", count=2, sizes=((32, 32),))
    datasets = tmp_path / "datasets.json"
    datasets.write_text(json.dumps([
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(clips),
         "caption_strategy": "textfile", "video": {"num_frames": CLIP_FRAMES, "min_frames": CLIP_FRAMES}},
        {"id": "stills", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile"}]))

    def cfg(name: str):
        return _wan_cfg(make_cfg, output_dir=str(tmp_path / name), data_backend_config=str(datasets),
                        cache_dir=str(tmp_path / "cache"), resolution=0.001024, resolution_type="area",
                        aspect_bucket_alignment=32, train_batch_size=1, max_train_steps=5, learning_rate=1e-3,
                        caption_dropout_probability=0.0, checkpoint_step_interval=1, seed=4)

    def data_for(config):
        return lambda encoders: build_training_data(config, encoders)

    straight, family, straight_data = train_in_process(cfg("a"), data_factory=data_for(cfg("a")))
    windows = [p.frames for ps in straight_data.datasets[0].prepared.buckets.buckets.values() for p in ps]
    assert {w.count for w in windows} == {CLIP_FRAMES} and len({w.start for w in windows}) > 1
    batches = iter(build_training_data(cfg("a"), family.encoders()))
    frames = {next(batches).latents.shape[2] for _ in range(6)}
    assert frames == {1, 2}  # stills are 1-frame clips, clips 5 frames -> 2 latent frames

    first, _, _ = train_in_process(cfg("b"), data_factory=data_for(cfg("b")), events=RecordingEvents(stop_after=2))
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, _ = train_in_process(cfg("b").replace(resume_from_checkpoint="latest"),
                                    data_factory=data_for(cfg("b")), resume=resume)
    assert second.exit_code == ExitCode.SUCCESS
    assert first.losses + second.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_comfyui_export_uses_the_original_wan_layer_names(make_cfg, tmp_path):
    from safetensors.torch import load_file

    cfg = _wan_cfg(make_cfg, max_train_steps=1, learning_rate=5e-2, lora_alpha=2, lora_format="comfyui")
    result, _, _ = train_in_process(cfg, data_factory=_clip_data())
    assert result.exit_code == ExitCode.SUCCESS
    comfy = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    # the original checkpoint's attention names, which ComfyUI's Wan model keeps (2 tiny blocks)
    expected = {f"diffusion_model.blocks.{b}.{attn}.{p}" for b in (0, 1) for attn in ("self_attn", "cross_attn")
                for p in ("q", "k", "v", "o")}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in comfy} == expected
    assert all(float(comfy[f"{name}.alpha"]) == 2.0 for name in expected)
    assert comfy["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape[1] == 24  # inner dim 2 x 12
