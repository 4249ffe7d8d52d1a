"""LTX-Video on a tiny real model: latents, prompts, the flow schedule, first-frame conditioning, LoRA training,
exact resume, and the LoRA loading into LTXPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.data.batch import Batch
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.families.ltxvideo import condition_frames, pack_latents, unpack_latents
from kubetuner_trainer.models.loading import resolve_source
from kubetuner_trainer.training import checkpoints as ckpt
from kubetuner_trainer.training.preflight import all_warnings, core_problems
from kubetuner_trainer.training.timesteps import shift_sigmas

FRAMES = 9  # pixel frames per clip: 3 latent frames with the tiny VAE's 4x temporal compression


class ClipData(InMemoryData):
    """InMemoryData over random 9-frame clips (latents ``[count, C, 3, 8, 8]``), batches marked ``is_i2v``."""

    def __init__(self, encoders, *, count: int = 2, batch_size: int = 2, is_i2v: bool | None = None):
        pixels = torch.rand(count, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        super().__init__(_VideoEncoders(encoders, pixels), count=count, batch_size=batch_size)
        assert self.latents.shape == (count, 8, 3, 8, 8)
        self.is_i2v = is_i2v

    def __iter__(self):
        for batch in super().__iter__():
            batch.is_i2v = self.is_i2v
            yield batch


class _VideoEncoders:
    """Encodes the given clips whatever images InMemoryData asks for (it draws its own random images)."""

    def __init__(self, encoders, clips: torch.Tensor):
        self._encoders, self._clips = encoders, clips

    def encode_images(self, pixels):
        return self._encoders.encode_images(self._clips)

    def encode_prompts(self, prompts):
        return self._encoders.encode_prompts(prompts)


def _cfg(make_cfg, **overrides):
    values = dict(lr_scheduler="constant", ltx_train_mode="t2v")
    values.update(overrides)
    return make_cfg("ltxvideo", **values)


def _batch(latents: torch.Tensor, **fields) -> Batch:
    n = latents.shape[0]
    batch = Batch(latents=latents, text={}, original_sizes=[(32, 32)] * n, crop_coords=[(0, 0)] * n,
                  target_sizes=[(32, 32)] * n, captions=[""] * n, paths=[str(i) for i in range(n)],
                  dataset_ids=["mem"] * n, is_regularisation=[False] * n)
    for key, value in fields.items():
        setattr(batch, key, value)
    return batch


def test_latents_prompts_and_packing_match_ltx_pipeline(make_cfg):
    from diffusers import LTXPipeline

    family = load_family(_cfg(make_cfg))
    pipe = family.build_pipeline()
    clips = torch.rand(2, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = family.encoders().encode_images(clips)  # 5-D pixels go to encode_videos
    assert latents.shape == (2, 8, 3, 8, 8)
    raw = family.vae.encode(clips).latent_dist.mode()
    torch.testing.assert_close(latents, LTXPipeline._normalize_latents(
        raw, family.vae.latents_mean, family.vae.latents_std, family.vae.config.scaling_factor))
    assert family.encode_images(clips[:, :, 0]).shape == (2, 8, 1, 8, 8)  # an image is a one-frame clip
    assert family.latent_downscale == 4
    assert [family.video_frame_count(n) for n in (1, 8, 9, 16, 17, 121, 125)] == [1, 1, 9, 9, 17, 121, 121]

    packed = pack_latents(latents)
    assert torch.equal(packed, LTXPipeline._pack_latents(latents, 1, 1))
    assert torch.equal(unpack_latents(packed, 3, 8, 8), latents)

    prompts = ["a red cat", "a blue dog on a white background"]
    text = family.encode_text(prompts)
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu")
    torch.testing.assert_close(text["prompt_embeds"], embeds)
    assert torch.equal(text["prompt_attention_mask"].bool(), mask) and mask.shape == (2, 128)
    assert 0 < int(mask[0].sum()) < int(mask[1].sum()) < 128


def test_auto_shift_counts_every_frame_as_ltx_pipeline_does(make_cfg):
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    family = load_family(_cfg(make_cfg, flow_schedule_auto_shift=True, flow_schedule_shift=0))
    sched = family.noise_scheduler.config
    for frames in (1, 5):
        latents = torch.zeros(64, 8, frames, 16, 16)
        drawn = family.objective.sample_timesteps(latents, torch.Generator().manual_seed(3)) / 1000
        base = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(3)))
        mu = calculate_shift(frames * 16 * 16, sched.base_image_seq_len, sched.max_image_seq_len, sched.base_shift,
                             sched.max_shift)
        torch.testing.assert_close(drawn, shift_sigmas(base, float(np.exp(mu))))


def _noise_levels(family, latents, **batch_fields):
    return family.sample_timesteps(_batch(latents, **batch_fields), latents, torch.Generator().manual_seed(0))


def test_protected_first_frame_is_clean_and_left_out_of_the_loss(make_cfg):
    family = load_family(_cfg(make_cfg, ltx_train_mode="i2v", ltx_protect_first_frame=True))
    latents, noise = torch.randn(2, 8, 3, 8, 8), torch.randn(2, 8, 3, 8, 8)
    steps = _noise_levels(family, latents)
    assert steps.shape == (2, 3) and torch.all(steps[:, 0] == 0) and torch.all(steps[:, 1:] > 0)
    objective = family.objective
    noisy = objective.noisy_latents(latents, noise, steps)
    assert torch.equal(noisy[:, :, 0], latents[:, :, 0])  # the condition frame is not noised
    assert not torch.allclose(noisy[:, :, 1:], latents[:, :, 1:])
    target = objective.target(latents, noise, steps)
    pred = torch.randn_like(target)
    loss = objective.loss(family.cfg, pred, target, steps)
    first_changed, later_changed = pred.clone(), pred.clone()
    first_changed[:, :, 0] += 10.0
    later_changed[:, :, 2] += 10.0
    assert objective.loss(family.cfg, first_changed, target, steps) == loss  # not in the loss
    assert objective.loss(family.cfg, later_changed, target, steps) > loss
    expected = torch.nn.functional.mse_loss(pred[:, :, 1:], target[:, :, 1:])
    torch.testing.assert_close(loss, expected)
    # the transformer sees timestep 0 on the condition frame's tokens: its output differs from a uniform level
    text = family.encode_text(["a", "b"])
    with torch.no_grad():
        held = family.predict(family.denoiser, noisy, steps, text, None)
        uniform = family.predict(family.denoiser, noisy, steps.amax(1), text, None)
    assert not torch.allclose(held[:, :, 0], uniform[:, :, 0])


def test_i2v_probability_partial_noise_and_the_datasets_flags(make_cfg):
    latents = torch.randn(400, 8, 3, 2, 2)
    partial = load_family(_cfg(make_cfg, ltx_train_mode="i2v", ltx_i2v_prob=0.25, ltx_partial_noise_fraction=0.05))
    steps = _noise_levels(partial, latents)
    held = condition_frames(steps)
    assert held[:, 1:].sum() == 0 and 0.17 < held[:, 0].float().mean() < 0.33
    ratio = steps[held[:, 0], 0] / steps[held[:, 0], 1]
    assert ratio.max() <= 0.05 and ratio.min() >= 0 and ratio.std() > 0.005  # up to 5 % of the clip's level
    assert torch.equal(steps[~held[:, 0], 0], steps[~held[:, 0], 1])

    t2v = load_family(_cfg(make_cfg, ltx_train_mode="t2v", ltx_protect_first_frame=True))
    assert _noise_levels(t2v, latents).dim() == 1  # text-to-video data: no condition frame
    # a dataset's video.is_i2v wins over ltx_train_mode
    assert condition_frames(_noise_levels(t2v, latents, is_i2v=True))[:, 0].all()
    assert _noise_levels(t2v.__class__(t2v.cfg.replace(ltx_train_mode="i2v"), t2v.components), latents,
                         is_i2v=False).dim() == 1
    images = torch.randn(4, 8, 1, 2, 2)
    assert _noise_levels(partial.__class__(partial.cfg.replace(ltx_protect_first_frame=True), partial.components),
                         images).dim() == 1  # one-frame clips have nothing to condition on


@torch.no_grad()
def _fixed_loss(family, data) -> float:
    gen = torch.Generator().manual_seed(123)
    latents = data.latents
    text = {k: torch.stack([t[k] for t in data.text]) for k in data.text[0]}
    total = 0.0
    for sigma in (0.2, 0.4, 0.6, 0.8):
        noise = torch.randn(latents.shape, generator=gen)
        steps = torch.full((latents.shape[0],), sigma * 1000.0)
        pred = family.predict(family.denoiser, family.objective.noisy_latents(latents, noise, steps), steps, text, None)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(latents, noise, steps)))
    return total / 4


def test_lora_loss_falls_on_an_overfit_batch(make_cfg):
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _cfg(make_cfg, max_train_steps=20, lora_rank=8, learning_rate=1e-2, ltx_train_mode="i2v",
               noise_offset=0.1, noise_offset_probability=1.0)
    family = load_family(cfg)
    data = ClipData(family.encoders())
    before = _fixed_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    assert result.exit_code == ExitCode.SUCCESS and len(result.losses) == 20 and all(np.isfinite(result.losses))
    assert _fixed_loss(family, data) < before * 0.9


def test_resume_is_exact_with_first_frame_conditioning(make_cfg, tmp_path):
    common = dict(max_train_steps=4, ltx_train_mode="i2v", ltx_i2v_prob=0.5, gradient_checkpointing=True)

    def data(enc):
        return ClipData(enc, count=4)

    straight, _, straight_data = train_in_process(_cfg(make_cfg, output_dir=str(tmp_path / "a"), **common),
                                                  data_factory=data)
    split_cfg = _cfg(make_cfg, output_dir=str(tmp_path / "b"), **common)
    first, _, first_data = train_in_process(split_cfg, events=RecordingEvents(stop_after=2), data_factory=data)
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split_cfg.replace(resume_from_checkpoint="latest"), resume=resume,
                                              data_factory=data)
    assert second.exit_code == ExitCode.SUCCESS
    assert first_data.seen + second_data.seen == straight_data.seen
    assert first.losses + second.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def _render(pipe) -> np.ndarray:
    return pipe("a photo of thing 1", num_inference_steps=2, height=32, width=32, num_frames=FRAMES,
                generator=torch.Generator().manual_seed(0), output_type="np").frames[0]


def test_saved_lora_loads_into_ltx_pipeline_and_changes_its_output(make_cfg, tiny_model, tmp_path):
    from diffusers import LTXPipeline

    cfg = _cfg(make_cfg, max_train_steps=3, learning_rate=5e-2, lora_alpha=8)
    result, _, _ = train_in_process(cfg, data_factory=lambda enc: ClipData(enc))
    assert result.exit_code == ExitCode.SUCCESS
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split(".")[0] for k in keys} == {"transformer"}
    assert {k.split(".")[3] for k in keys} == {"attn1", "attn2"}
    assert meta["modelspec.architecture"] == "ltx-video/lora"
    pipe = LTXPipeline.from_pretrained(str(tiny_model("ltxvideo")))
    base = _render(pipe)
    assert base.shape == (FRAMES, 32, 32, 3)
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - _render(pipe)).max() > 1e-3
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 8


def test_flavours_options_and_validation_arguments(make_cfg):
    cls = family_class("ltxvideo")
    assert resolve_source(cls, _cfg(make_cfg, pretrained_model_name_or_path=None)).model == \
        "Lightricks/LTX-Video-0.9.5"
    assert resolve_source(cls, _cfg(make_cfg, pretrained_model_name_or_path=None, model_flavour="0.9.0")).model == \
        "Lightricks/LTX-Video"
    refused = {p.option for p in core_problems(_cfg(make_cfg, train_text_encoder=True, model_flavour="0.9.1",
                                                    prediction_type="epsilon"))}
    assert refused == {"train_text_encoder", "model_flavour", "prediction_type"}
    warned = {p.option for p in all_warnings(_cfg(make_cfg, tokenizer_max_length=226, t5_padding="zero",
                                                  validation_num_video_frames=200, aspect_bucket_alignment=16))}
    assert {"tokenizer_max_length", "t5_padding", "validation_num_video_frames", "aspect_bucket_alignment"} <= warned
    assert not {p.option for p in all_warnings(_cfg(make_cfg, aspect_bucket_alignment=64))} & warned
    family = load_family(_cfg(make_cfg, framerate=24, validation_num_video_frames=17))
    kwargs = family.pipeline_call_kwargs({"prompt": "x", "width": 48, "height": 64})
    assert kwargs == {"prompt": "x", "width": 32, "height": 64, "num_frames": 17, "frame_rate": 24,
                      "max_sequence_length": 128}
    assert family.rope_interpolation_scale() == (4 / 24, 4, 4)


def test_comfyui_export_names_the_original_checkpoints_layers(make_cfg):
    """ComfyUI loads ``diffusion_model.<layer>`` LoRA keys in the original LTX-Video names; diffusers' single-file
    converter maps those names back onto exactly the layers we trained."""
    from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers

    cfg = _cfg(make_cfg, max_train_steps=1, lora_format="comfyui",
               peft_lora_target_modules='["to_q", "to_out.0", "proj_in", "time_embed.linear", "ff.net.2"]')
    result, family, _ = train_in_process(cfg, data_factory=lambda enc: ClipData(enc))
    tensors = load_file(str(result.final_path / "pytorch_lora_weights.safetensors"))
    layers = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert {"diffusion_model.patchify_proj", "diffusion_model.adaln_single.linear",
            "diffusion_model.transformer_blocks.0.attn1.to_q"} <= layers
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    original = {f"model.{layer}.weight": torch.zeros(1) for layer in layers}
    converted = {k.removesuffix(".weight") for k in convert_ltx_transformer_checkpoint_to_diffusers(original)}
    trained = {name for name, module in family.denoiser.named_modules() if hasattr(module, "lora_A")}
    assert converted == trained


def test_a_simpletuner_ltx_lora_config_with_clips_and_images_trains_through_kubetuner_train(tmp_path, tiny_model,
                                                                                              monkeypatch):
    """A SimpleTuner-style LTX-Video LoRA config (paths swapped, a short run) over a video dataset and an image
    dataset: clips cache as 3-frame latents, images as one-frame clips, validation renders a clip through
    LTXPipeline, and the LoRA loads into LTXPipeline."""
    import gzip
    import json

    from diffusers import LTXPipeline
    from safetensors.torch import load

    from kubetuner_trainer.cli import main
    from kubetuner_trainer.tiny import build_tiny_dataset, build_tiny_video_dataset

    monkeypatch.chdir(tmp_path)
    clips = build_tiny_video_dataset(tmp_path / "clips", count=2, frames=FRAMES, sizes=((32, 32),))
    images = build_tiny_dataset(tmp_path / "images", count=1, sizes=((32, 32),))
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(clips),
         "caption_strategy": "textfile", "cache_dir_vae": str(tmp_path / "cache" / "vae" / "{model_family}" / "clips"),
         "video": {"num_frames": FRAMES, "is_i2v": True}},
        {"id": "images", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "cache_dir_vae": str(tmp_path / "cache" / "vae" / "{model_family}" / "images")},
    ]))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_family": "ltxvideo", "model_flavour": "0.9.5", "model_type": "lora", "lora_rank": 4,
        "pretrained_model_name_or_path": str(tiny_model("ltxvideo")), "output_dir": str(tmp_path / "out"),
        "data_backend_config": str(datasets), "cache_dir": str(tmp_path / "cache"), "max_train_steps": 3,
        "train_batch_size": 1, "learning_rate": 1e-3, "optimizer": "adamw_bf16", "mixed_precision": "no",
        "resolution": 0.001024, "resolution_type": "area", "aspect_bucket_alignment": 16,
        "ltx_train_mode": "i2v", "ltx_i2v_prob": 0.1, "ltx_partial_noise_fraction": 0.05, "framerate": 25,
        "flow_schedule_auto_shift": True, "flow_schedule_shift": 0, "validation_num_video_frames": FRAMES,
        "seed": 3, "metrics_port": 0, "validation_prompt": "a disc moving", "validation_step_interval": 3,
        "validation_resolution": "32", "validation_num_inference_steps": 2,
    }))
    assert main(["--config", str(config)]) == ExitCode.SUCCESS
    (clip,) = json.loads((tmp_path / "out" / "validation" / "step-3" / "index.json").read_text())
    assert (clip["frames"], clip["fps"]) == (FRAMES, 25) and clip["video"].endswith(".mp4")
    shapes = {path.parent.name: tuple(load(gzip.decompress(path.read_bytes()))["latents"].shape)
              for path in (tmp_path / "cache" / "vae" / "ltxvideo").rglob("*.safetensors.gz")}
    assert shapes == {"clips": (8, 3, 8, 8), "images": (8, 1, 8, 8)}
    pipe = LTXPipeline.from_pretrained(str(tiny_model("ltxvideo")))
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert "default_0" in pipe.transformer.peft_config


def test_block_swap_of_the_transformer_blocks_trains_like_the_resident_model(make_cfg, tmp_path):
    runs = {}
    for swap in (0, 1):
        cfg = _cfg(make_cfg, max_train_steps=2, musubi_blocks_to_swap=swap, output_dir=str(tmp_path / f"s{swap}"))
        result, family, _ = train_in_process(cfg, data_factory=lambda enc: ClipData(enc))
        runs[swap] = result.losses
    assert family.transformer_blocks() == list(family.denoiser.transformer_blocks)
    assert family.transformer_blocks()[0]._forward_pre_hooks  # the swapped block loads its weights per call
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)
