"""Wan image-to-video flavours on tiny real models: 2.1 i2v (CLIP), flf2v, a Wan 2.2 A14B expert, ti2v-5b-2.2.

Each kind: a LoRA overfits, resumes exactly, loads into the matching diffusers pipeline and changes its
render; the conditioning is the clip's own first (last) frame; an expert samples only its stage's timesteps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from training_helpers import InMemoryData, assert_lora_resume_is_exact, train_in_process

from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.data.batch import Batch
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.families import wan

CLIP_FRAMES = 5  # 1 + 4k: two latent frames
KINDS = {"i2v": "i2v-14b-2.1", "flf2v": "flf2v-14b-2.1", "stage": "i2v-14b-2.2-low", "ti2v": "ti2v-5b-2.2"}


@pytest.fixture
def wan_cfg(make_cfg, tiny_model):
    def make(flavour: str, **overrides):
        values = dict(model_flavour=flavour, pretrained_model_name_or_path=str(tiny_model("wan", flavour)),
                      lr_scheduler="constant", validation_num_video_frames=CLIP_FRAMES)
        values.update(overrides)
        return make_cfg("wan", **values)

    return make


def _clips(count: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, CLIP_FRAMES, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _clip_data(count: int = 2):
    """Clips ``[B, 3, 5, 32, 32]`` encoded by the family (latents and, i2v, their cached conditioning), of a
    dataset with ``video.is_i2v``."""

    def factory(encoders):
        data = InMemoryData(encoders, count=count, batch_size=count)
        data.set_latents(encoders.encode_images(_clips(count)))
        data.is_i2v = True
        return data

    return factory


def _batch(data: InMemoryData) -> Batch:
    return Batch(latents=data.latents, text={k: torch.stack([t[k] for t in data.text]) for k in data.text[0]},
                 original_sizes=[], crop_coords=[], target_sizes=[], captions=[], paths=[], dataset_ids=[],
                 is_regularisation=[], cached_conditioning=data.conditioning, is_i2v=True)


@torch.no_grad()
def _fixed_loss(family, data) -> float:
    """The objective's loss at fixed noise and levels (in the flavour's own range and frame layout)."""
    gen = torch.Generator().manual_seed(123)
    batch = _batch(data)
    total = 0.0
    for draw in range(3):
        noise = torch.randn(data.latents.shape, generator=gen)
        steps = family.sample_timesteps(batch, data.latents, torch.Generator().manual_seed(draw))
        noisy = family.objective.noisy_latents(data.latents, noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, batch.text, batch)
        total += float(family.objective.loss(family.cfg, pred, family.objective.target(data.latents, noise, steps),
                                             steps))
    return total / 3


def test_flavour_table_refusals_and_stage_settings(make_cfg):
    cls = family_class("wan")
    assert set(cls.flavours) == set(wan.WAN_FLAVOURS) and len(cls.flavours) == 10
    vace = cls.config_problems(make_cfg("wan", model_flavour="vace-14b-2.1"))
    assert [p.option for p in vace] == ["model_flavour"] and "control video" in vace[0].message
    assert "vace" not in vace[0].message.split("allowed:")[1]
    for name, flavour in wan.WAN_FLAVOURS.items():
        if flavour.kind != "vace":
            assert not cls.config_problems(make_cfg("wan", model_flavour=name)), name
    assert cls.denoiser_subfolder("i2v-14b-2.2-high") == "transformer"
    assert cls.denoiser_subfolder("i2v-14b-2.2-low") == "transformer_2"
    assert cls.denoiser_subfolder("i2v-14b-2.1") is None
    assert wan.stage_sigma_range("high") == (0.9, 1.0) and wan.stage_sigma_range("low") == (0.0, 0.9)
    warnings = cls.config_warnings(make_cfg("wan", model_flavour="i2v-14b-2.2-high", flow_schedule_shift=3.0))
    assert [w.option for w in warnings] == ["flow_schedule_shift"]
    assert not cls.config_warnings(make_cfg("wan", model_flavour="i2v-14b-2.2-high", flow_schedule_shift=5.0))
    assert [p.option for p in cls.config_problems(make_cfg("wan", model_flavour="ti2v-5b-2.2",
                                                           aspect_bucket_alignment=16))] == ["aspect_bucket_alignment"]


def test_the_condition_is_the_clips_own_first_and_last_frame(wan_cfg):
    """flf2v: condition latents = the VAE encoding of [first frame, black, last frame], CLIP embeddings of the
    same two frames; the middle frames do not reach the conditioning."""
    family = load_family(wan_cfg(KINDS["flf2v"]))
    clip = _clips(1)
    clip[:, :, 0] = -0.5  # a flat first frame and a striped last one: unmistakable
    clip[:, :, -1, :, ::2] = 0.8
    encoded = family.encoders().encode_images(clip)
    blank = torch.zeros_like(clip[:, :, 1:-1])
    expected = family._vae_latents(torch.cat([clip[:, :, :1], blank, clip[:, :, -1:]], dim=2))
    torch.testing.assert_close(encoded["condition_latents"], expected)
    torch.testing.assert_close(encoded["latents"], family._vae_latents(clip))
    embeds = encoded["image_embeds"]
    assert embeds.shape[:2] == (1, 2)
    torch.testing.assert_close(embeds[:, 0], family.encode_frames(clip[:, :, 0]))
    torch.testing.assert_close(embeds[:, 1], family.encode_frames(clip[:, :, -1]))
    assert not torch.allclose(embeds[:, 0], embeds[:, 1])
    other_middle = clip.clone()
    other_middle[:, :, 1:-1] = 0.3
    again = family.encoders().encode_images(other_middle)
    torch.testing.assert_close(again["condition_latents"], encoded["condition_latents"])
    assert not torch.allclose(again["latents"], encoded["latents"])
    mask = wan.condition_mask(1, 2, 1, 1, last=True)  # frames 0 and 4 of 5 given: latent 0 all, latent 1 last slot
    assert mask.flatten().tolist() == [1, 0, 1, 0, 1, 0, 1, 1]


def test_ti2v_keeps_the_first_latent_frame_clean_and_out_of_the_loss(wan_cfg):
    family = load_family(wan_cfg(KINDS["ti2v"]))
    latents = family.encoders().encode_images(_clips(2))
    assert latents.shape == (2, 6, 2, 2, 2)  # the Wan 2.2-shaped VAE: 16x in space
    i2v = Batch(latents=latents, text={}, original_sizes=[], crop_coords=[], target_sizes=[], captions=[],
                paths=[], dataset_ids=[], is_regularisation=[], is_i2v=True)
    steps = family.sample_timesteps(i2v, latents, torch.Generator().manual_seed(0))
    assert steps.shape == (2, 2) and bool((steps[:, 0] == 0).all()) and bool((steps[:, 1] > 0).all())
    noisy = family.objective.noisy_latents(latents, torch.randn_like(latents), steps)
    torch.testing.assert_close(noisy[:, :, 0], latents[:, :, 0])  # the clip's own first latent frame
    pred = torch.zeros_like(latents)
    target = torch.randn_like(latents)
    changed = target.clone()
    changed[:, :, 0] += 5.0
    assert family.objective.loss(family.cfg, pred, target, steps) == family.objective.loss(family.cfg, pred, changed,
                                                                                          steps)
    t2v = Batch(**{**i2v.__dict__, "is_i2v": None})
    assert family.sample_timesteps(t2v, latents, torch.Generator().manual_seed(0)).shape == (2,)


@pytest.mark.parametrize("stage", ["high", "low"])
def test_an_expert_samples_only_its_stage_range(wan_cfg, stage):
    family = load_family(wan_cfg(f"i2v-14b-2.2-{stage}"))
    low, high = wan.stage_sigma_range(stage)
    latents = torch.zeros(512, 4, 2, 4, 4)
    steps = family.sample_timesteps(None, latents, torch.Generator().manual_seed(1)) / 1000
    assert float(steps.min()) >= low and float(steps.max()) <= high
    assert float(steps.max() - steps.min()) > 0.5 * (high - low)  # spread over the range, not a point
    assert family.objective.schedule.shift == wan.STAGE_FLOW_SHIFT
    assert all(low <= t / 1000 <= high for t in family.objective.eval_timesteps(4))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_lora_overfits_and_loads_into_the_matching_pipeline(wan_cfg, tiny_model, tmp_path, kind, monkeypatch):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    flavour = KINDS[kind]
    drawn: list[torch.Tensor] = []
    sample = wan.WanFamily.sample_timesteps
    monkeypatch.setattr(wan.WanFamily, "sample_timesteps",
                        lambda self, *a: drawn.append(sample(self, *a)) or drawn[-1])
    cfg = wan_cfg(flavour, max_train_steps=8, lora_rank=8, learning_rate=3e-2, lora_alpha=8)
    family = load_family(cfg)
    data = _clip_data()(family.encoders())
    before = _fixed_loss(family, data)
    result, trained, _ = train_in_process(cfg, data_factory=_clip_data())
    assert result.exit_code == ExitCode.SUCCESS and all(np.isfinite(result.losses))
    after = _fixed_loss(trained, data)
    assert after < before * 0.9, (before, after)
    low, high = wan.stage_sigma_range(wan.WAN_FLAVOURS[flavour].stage)
    levels = torch.cat([d.flatten() for d in drawn]) / 1000
    levels = levels[levels > 0]  # ti2v: the clean first frame
    assert float(levels.min()) >= low and float(levels.max()) <= high

    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"transformer"}
        assert f.metadata()["modelspec.architecture"] == wan.WAN_FLAVOURS[flavour].modelspec + "/lora"
    pipeline_class = WanPipeline if kind == "ti2v" else WanImageToVideoPipeline
    pipe = pipeline_class.from_pretrained(str(tiny_model("wan", flavour)))
    pipe.set_progress_bar_config(disable=True)
    kwargs = trained.pipeline_call_kwargs(dict(prompt="a photo of thing 1", num_inference_steps=2, height=32, width=32,
                                               guidance_scale=3.0))
    kwargs.update(num_frames=CLIP_FRAMES, output_type="np")
    assert ("image" in kwargs) == (kind != "ti2v") and ("last_image" in kwargs) == (kind == "flf2v")

    def render() -> np.ndarray:
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames[0]

    base = render()
    assert base.shape == (CLIP_FRAMES, 32, 32, 3)
    # a low-noise expert's LoRA goes into transformer_2 (diffusers' slot for the low-noise steps)
    pipe.load_lora_weights(str(tmp_path / "out"), load_into_transformer_2=kind == "stage")
    assert np.abs(base - render()).max() > 1e-3


@pytest.mark.parametrize("kind", ["i2v", "ti2v"])
def test_resume_is_exact(wan_cfg, tmp_path, kind):
    assert_lora_resume_is_exact(lambda **o: wan_cfg(KINDS[kind], **o), tmp_path, data_factory=_clip_data())


def test_validation_uses_both_experts_and_the_latest_samples_frames(wan_cfg):
    """A low-noise expert renders after the high-noise one it did not train (boundary 0.9), from the first frame
    of the latest training sample."""
    family = load_family(wan_cfg(KINDS["stage"]))
    data = _clip_data()(family.encoders())
    batch = _batch(data)
    steps = family.sample_timesteps(batch, data.latents, torch.Generator().manual_seed(0))
    family.predict(family.denoiser, data.latents, steps, batch.text, batch)
    pipe = family.build_pipeline()
    assert pipe.transformer_2 is family.denoiser and pipe.transformer is not family.denoiser
    assert pipe.config.boundary_ratio == wan.STAGE_BOUNDARY_RATIO
    first, _ = family.validation_frames()
    clip = _clips(1)
    decoded = torch.from_numpy(np.array(first)).float() / 127.5 - 1
    reconstruction = family.vae.decode(family.vae.encode(clip[:, :, :1]).latent_dist.mode()).sample[0, :, 0]
    torch.testing.assert_close(decoded, reconstruction.permute(1, 2, 0).clamp(-1, 1), atol=0.01, rtol=0)


def test_a_flavour_that_does_not_fit_the_folder_is_a_config_error(wan_cfg, tiny_model):
    from kubetuner_trainer.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_family(wan_cfg("t2v-480p-1.3b-2.1", pretrained_model_name_or_path=str(tiny_model("wan", KINDS["i2v"]))))
    (problem,) = refused.value.problems
    assert problem.option == "model_flavour" and "12 input channels" in problem.message
    assert "i2v-14b-2.1," in problem.message and "t2v-480p" not in problem.message.split("layout:")[1]
