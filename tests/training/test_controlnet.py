"""ControlNet training (``--controlnet``) on tiny real models, one test per ControlNet kind: the UNet
ControlNet (sd1x, sdxl), SD3's and Flux's. Each trains with the base frozen, resumes exactly, and the
saved ControlNet loads into the family's diffusers ControlNet pipeline and changes its render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import InMemoryData, RecordingEvents, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models.controlnet import (
    CONTROLNET,
    ControlledDenoiser,
    build_controlnet,
    controlnet_call_kwargs,
    controlnet_families,
)
from kubetuner_trainer.training import checkpoints as ckpt
from kubetuner_trainer.training.preflight import check

SMALL = {"sd3": {"controlnet_custom_config": {"num_layers": 1}, "tokenizer_max_length": 16},
         "qwen_image": {"controlnet_custom_config": {"num_layers": 1}}, "sana": {"controlnet_custom_config": {"num_layers": 1}},
         "flux": {"controlnet_custom_config": {"num_layers": 1, "num_single_layers": 1}, "tokenizer_max_length": 16}}


class ControlData(InMemoryData):
    """InMemoryData whose samples carry their own image as the control image (one conditioning slot, as the
    data pipeline hands it over: latents always, pixels in [-1, 1] too)."""

    def __init__(self, encoders: Any, **kwargs: Any):
        super().__init__(encoders, **kwargs)
        pixels = torch.rand(self.count, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.pixels = pixels  # the same draw InMemoryData encoded into self.latents
        self.control_latents = self.latents

    def __iter__(self):
        for batch in super().__iter__():
            idx = [int(p) for p in batch.paths]
            batch.conditioning_pixels = [self.pixels[idx]]
            batch.conditioning_latents = [self.control_latents[idx]]
            yield batch


def _cfg(make_cfg, family: str, **overrides: Any):
    return make_cfg(family, controlnet=True, **{**SMALL.get(family, {}), **overrides})


@torch.no_grad()
def _fixed_loss(family: Any, controlnet: torch.nn.Module, data: ControlData) -> float:
    """The objective's loss at fixed noise and noise levels, through the ControlNet (comparable across runs)."""
    batch = next(iter(data))
    data.position = data.epoch = 0
    text = {k: v for k, v in batch.text.items()}
    from kubetuner_trainer.models.controlnet import control_input

    controlled = ControlledDenoiser(family, family.denoiser, controlnet, control_input(family, batch, family.device))
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    levels = (200.0, 400.0, 600.0, 800.0)
    for level in levels:
        noise = torch.randn(batch.latents.shape, generator=gen)
        steps = torch.full((batch.latents.shape[0],), level)
        if family.prediction_type != "flow_matching":
            steps = steps.long()
        noisy = family.objective.noisy_latents(batch.latents, noise, steps)
        pred = family.predict(controlled, noisy, steps, text, batch)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(batch.latents, noise, steps)))
    return total / len(levels)


def _render(pipe: Any, family: Any, seed: int = 0) -> np.ndarray:
    control = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    kwargs = controlnet_call_kwargs(family, {"prompt": "a photo of thing 1", "image": [control], "width": 32,
                                             "height": 32, "num_inference_steps": 2, "guidance_scale": 2.0})
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def _assert_resume_is_exact(make, tmp_path: Path, saved: str) -> tuple[Any, Any, ControlData, Path]:
    """Four steps straight equal two, a stop and two resumed: same samples, losses and saved ControlNet file."""
    from safetensors.torch import load_file

    straight, family, data = train_in_process(make(output_dir=str(tmp_path / "a")), data_factory=ControlData)
    split = make(output_dir=str(tmp_path / "b"))
    first, _, first_data = train_in_process(split, events=RecordingEvents(stop_after=2), data_factory=ControlData)
    assert first.exit_code == ExitCode.INTERRUPTED
    resume = ckpt.find_resume_checkpoint(tmp_path / "b", "latest")
    second, _, second_data = train_in_process(split.replace(resume_from_checkpoint="latest"), resume=resume,
                                              data_factory=ControlData)
    assert first_data.seen + second_data.seen == data.seen
    assert first.losses + second.losses == straight.losses
    a, b = (load_file(str(tmp_path / d / saved)) for d in ("a", "b"))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    return straight, family, data, tmp_path / "a"


def test_unet_controlnet_lora_trains_resumes_and_loads_into_the_controlnet_pipeline(make_cfg, tmp_path):
    import diffusers
    from safetensors.torch import load_file

    def make(**kw):
        return _cfg(make_cfg, "sd1x", learning_rate=1e-2, **kw)

    result, family, data, out = _assert_resume_is_exact(make, tmp_path, ckpt.LORA_FILE)
    # only the ControlNet's LoRA trained: the UNet is untouched and the file names ControlNet layers only
    keys = load_file(str(out / ckpt.LORA_FILE))
    assert keys and all(k.startswith(f"{CONTROLNET}.") and ".lora_" in k for k in keys)
    assert not any(p.requires_grad for p in family.denoiser.parameters())
    untrained = build_controlnet(type(family), family.cfg, family.components)
    trained = diffusers.ControlNetModel.from_pretrained(str(out / CONTROLNET))
    assert _fixed_loss(family, trained, data) < _fixed_loss(family, untrained, data)
    # the LoRA file loads with diffusers onto the same initial ControlNet and gives the merged weights
    untrained.load_lora_adapter(str(out / ckpt.LORA_FILE), prefix=CONTROLNET, adapter_name="cn")
    untrained.fuse_lora(adapter_names=["cn"])
    untrained.unload_lora()
    merged = trained.state_dict()
    assert all(torch.allclose(v, merged[k], atol=1e-6) for k, v in untrained.state_dict().items())
    pipe = family.build_pipeline(controlnet=trained)
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    base = family.build_pipeline(controlnet=build_controlnet(type(family), family.cfg, family.components))
    assert np.abs(_render(pipe, family) - _render(base, family)).max() > 1e-3


def test_flux_full_controlnet_trains_resumes_and_loads_into_the_flux_controlnet_pipeline(make_cfg, tmp_path):
    import diffusers

    def make(**kw):
        return _cfg(make_cfg, "flux", model_type="full", learning_rate=1e-3, **kw)

    result, family, data, out = _assert_resume_is_exact(make, tmp_path,
                                                        f"{CONTROLNET}/diffusion_pytorch_model.safetensors")
    assert sorted(p.name for p in out.iterdir()) == [CONTROLNET, ckpt.STATE_FILE]
    trained = diffusers.FluxControlNetModel.from_pretrained(str(out / CONTROLNET))
    untrained = build_controlnet(type(family), family.cfg, family.components)
    assert _fixed_loss(family, trained, data) < _fixed_loss(family, untrained, data)
    pipe = family.build_pipeline(controlnet=trained)
    assert isinstance(pipe, diffusers.FluxControlNetPipeline)
    base = family.build_pipeline(controlnet=untrained)
    assert np.abs(_render(pipe, family) - _render(base, family)).max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "sdxl", "qwen_image", "sana"])
def test_controlnet_lora_steps_and_renders_through_each_familys_controlnet_pipeline(make_cfg, tmp_path, name):
    cfg = _cfg(make_cfg, name, learning_rate=1e-2, max_train_steps=3, output_dir=str(tmp_path / "out"))
    result, family, data = train_in_process(cfg, data_factory=ControlData)
    assert result.exit_code == ExitCode.SUCCESS and all(np.isfinite(result.losses))
    import diffusers

    trained = getattr(diffusers, family.controlnet_class_name).from_pretrained(str(tmp_path / "out" / CONTROLNET))
    untrained = build_controlnet(type(family), family.cfg, family.components)
    assert _fixed_loss(family, trained, data) < _fixed_loss(family, untrained, data)
    pipe = family.build_pipeline(controlnet=trained)
    assert type(pipe).__name__ == family.controlnet_pipeline_class
    base = family.build_pipeline(controlnet=untrained)
    assert np.abs(_render(pipe, family) - _render(base, family)).max() > 1e-3


def test_controlnet_is_refused_where_it_is_not_built_and_with_what_it_cannot_combine(make_cfg):
    with pytest.raises(ConfigError) as refused:
        check(make_cfg("pixart_sigma", controlnet=True))
    message = str(refused.value)
    assert "ControlNet training is not supported yet for model_family pixart_sigma" in message
    assert all(f in message for f in ("sd1x", "sdxl", "sd3", "flux")) and set(controlnet_families()) >= {
        "sd1x", "sd2x", "legacy", "sdxl", "sd3", "flux"}
    with pytest.raises(ConfigError, match="flavour refiner-1.0"):
        check(make_cfg("sdxl", controlnet=True, model_flavour="refiner-1.0"))
    with pytest.raises(ConfigError, match="flavour kontext"):
        check(make_cfg("flux", controlnet=True, model_flavour="kontext"))
    with pytest.raises(ConfigError, match="targets the ControlNet's layers"):
        check(make_cfg("flux", flux_lora_target="controlnet"))
    with pytest.raises(ConfigError, match="lora_type") as combined:
        check(make_cfg("sd1x", controlnet=True, lora_type="lycoris", train_text_encoder=True))
    assert "train_text_encoder" in str(combined.value)
    with pytest.raises(ConfigError, match="num_layer not known to FluxControlNetModel.from_transformer"):
        check(make_cfg("flux", controlnet=True, controlnet_custom_config={"num_layer": 2}))
    check(make_cfg("flux", controlnet=True, flux_lora_target="all+ffs+embedder+controlnet"))


def test_a_batch_without_a_control_image_is_explained(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="conditioning_data"):
        train_in_process(_cfg(make_cfg, "sd1x", output_dir=str(tmp_path / "out")))


def test_a_lora_controlnet_on_a_quantized_bf16_base_trains_and_renders(make_cfg, tmp_path):
    """The frozen base comes back from quantization with trainable weights and takes bf16 only: the ControlNet
    run freezes it, hands it bf16 residuals and renders its validation images under autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kubetuner_trainer.models import load_family
    from kubetuner_trainer.training.loop import TrainingLoop, weight_dtype_for

    cfg = _cfg(make_cfg, "sd3", base_model_precision="int8-quanto", mixed_precision="bf16", max_train_steps=2,
               output_dir=str(tmp_path / "out"))
    AcceleratorState._reset_state()
    family = load_family(cfg, weight_dtype=weight_dtype_for(cfg))
    loop = TrainingLoop(cfg, Accelerator(cpu=True, mixed_precision="bf16"), family, ControlData(family.encoders()))
    result = loop.run()
    assert result.exit_code == ExitCode.SUCCESS and all(np.isfinite(result.losses))
    assert not any(p.requires_grad for p in family.denoiser.parameters())
    with loop.trainable.validation_context():
        image = _render(loop.trainable.pipeline({CONTROLNET: family.controlnet}), family)
    assert np.isfinite(image).all()
