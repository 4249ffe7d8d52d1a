"""FLUX.1 Kontext (flux, --model_flavour kontext) on a tiny real FLUX.1-shaped model: reference tokens as
FluxKontextPipeline builds them, training on conditioning latents, exact resume, LoRA in FluxKontextPipeline,
and a run through the trainer on real conditioning datasets with validation renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import (
    InMemoryData,
    RecordingEvents,
    assert_lora_resume_is_exact,
    tiny_run_values,
    train_in_process,
    write_images,
)

from kubetuner_trainer.config import ConfigError, TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import load_family
from kubetuner_trainer.models.families.flux import image_ids, reference_tokens
from kubetuner_trainer.training.preflight import check

KONTEXT = {"model_flavour": "kontext", "tokenizer_max_length": 16}


class PairedData(InMemoryData):
    """InMemoryData whose batches carry one conditioning latent per sample (other random images)."""

    def __init__(self, encoders, **kwargs):
        super().__init__(encoders, **kwargs)
        gen = torch.Generator().manual_seed(99)
        self.references = encoders.encode_images(torch.rand(self.count, 3, 32, 32, generator=gen) * 2 - 1)

    def __iter__(self):
        for batch in super().__iter__():
            idx = [int(p) for p in batch.paths]
            batch.conditioning_latents = [self.references[idx]]
            yield batch


def _paired(encoders):
    return PairedData(encoders, count=2, batch_size=2)


def test_reference_tokens_are_the_kontext_pipelines():
    from diffusers import FluxKontextPipeline

    first, second = torch.randn(2, 16, 6, 8), torch.randn(2, 16, 4, 4)
    tokens, ids = reference_tokens([first], torch.device("cpu"), torch.float32)
    expected_ids = FluxKontextPipeline._prepare_latent_image_ids(2, 3, 4, torch.device("cpu"), torch.float32)
    expected_ids[..., 0] = 1
    assert torch.equal(tokens, FluxKontextPipeline._pack_latents(first, 2, 16, 6, 8))
    assert torch.equal(ids, expected_ids)
    # a second image sits beside the first (here: right of it, as it is taller than wide so far) with flag 1
    tokens, ids = reference_tokens([first, second], torch.device("cpu"), torch.float32)
    assert tokens.shape == (2, 12 + 4, 64)
    second_ids = ids[12:]
    assert torch.equal(second_ids, image_ids(4, 4, torch.device("cpu"), torch.float32, flag=1, row=3, col=0))


def test_the_conditioning_latents_reach_the_transformer_and_only_target_tokens_come_back(make_cfg):
    family = load_family(make_cfg("flux", **KONTEXT))
    data = _paired(family.encoders())
    batch = next(iter(data))
    text = {k: v for k, v in batch.text.items()}
    noisy, steps = torch.randn_like(batch.latents), torch.tensor([300.0, 600.0])
    with torch.no_grad():
        plain = family.predict(family.denoiser, noisy, steps, text, None)
        edited = family.predict(family.denoiser, noisy, steps, text, batch)
        batch.conditioning_latents = [batch.conditioning_latents[0].flip(0)]
        swapped = family.predict(family.denoiser, noisy, steps, text, batch)
    assert edited.shape == batch.latents.shape
    assert not torch.allclose(plain, edited) and not torch.allclose(edited, swapped)


def _fixed_loss(family, data) -> float:
    gen = torch.Generator().manual_seed(123)
    batch = next(iter(data))
    total = 0.0
    with torch.no_grad():
        for sigma in (0.3, 0.6, 0.9):
            noise = torch.randn(batch.latents.shape, generator=gen)
            steps = torch.full((batch.latents.shape[0],), sigma * 1000.0)
            noisy = family.objective.noisy_latents(batch.latents, noise, steps)
            pred = family.predict(family.denoiser, noisy, steps, batch.text, batch)
            total += float(torch.nn.functional.mse_loss(pred, family.objective.target(batch.latents, noise, steps)))
    return total / 3


def test_kontext_lora_overfits_a_paired_batch(make_cfg):
    cfg = make_cfg("flux", max_train_steps=12, learning_rate=3e-2, **KONTEXT)
    before_family = load_family(cfg)
    before = _fixed_loss(before_family, _paired(before_family.encoders()))
    result, family, _ = train_in_process(cfg, data_factory=_paired)
    assert result.exit_code == ExitCode.SUCCESS and all(np.isfinite(result.losses))
    after = _fixed_loss(family, _paired(family.encoders()))
    assert after < 0.9 * before, (before, after)


def test_kontext_lora_resume_is_exact(make_cfg, tmp_path):
    assert_lora_resume_is_exact(lambda **kw: make_cfg("flux", **KONTEXT, **kw), tmp_path, data_factory=_paired)


def test_kontext_lora_loads_into_flux_kontext_pipeline_and_changes_its_output(make_cfg, tiny_model):
    from diffusers import FluxKontextPipeline

    result, _, _ = train_in_process(make_cfg("flux", max_train_steps=3, learning_rate=5e-2, lora_alpha=8, **KONTEXT),
                                    data_factory=_paired)
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model("flux")))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")

    def render():
        return pipe(image=image, prompt="a photo of thing 1", num_inference_steps=2, height=32, width=32,
                    max_sequence_length=16, _auto_resize=False, max_area=32 * 32, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    base = render()
    pipe.load_lora_weights(str(result.final_path))
    assert np.abs(base - render()).max() > 1e-3


def _datasets(tmp_path, *, link: bool = True) -> str:
    train = write_images(tmp_path / "edited", 4)
    source = write_images(tmp_path / "source", 4, seed=50)
    for txt in source.glob("*.txt"):
        txt.unlink()
    entry = {"id": "edits", "instance_data_dir": str(train), "caption_strategy": "textfile"}
    entries = [entry, {"id": "sources", "dataset_type": "conditioning", "instance_data_dir": str(source)}]
    if link:
        entry["conditioning_data"] = "sources"
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_kontext_without_conditioning_data_is_refused_naming_the_field(tmp_path, tiny_model):
    values = tiny_run_values(tiny_model("flux"), tmp_path, _datasets(tmp_path, link=False), model_family="flux",
                             **KONTEXT)
    with pytest.raises(ConfigError, match=r"datasets\[edits\]\.conditioning_data.*flux kontext"):
        check(TrainerConfig.from_mapping(values))


def test_kontext_trains_through_the_trainer_and_validates_with_the_conditioning_image(tmp_path, tiny_model):
    from kubetuner_trainer.train import run

    cfg = TrainerConfig.from_mapping(tiny_run_values(
        tiny_model("flux"), tmp_path, _datasets(tmp_path), model_family="flux", max_train_steps=2,
        validation_step_interval=2, validation_resolution="64", validation_num_inference_steps=2, num_eval_images=1,
        mixed_precision="bf16", **KONTEXT))  # a bf16 transformer beside the fp32 VAE, as in real runs
    check(cfg)
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.SUCCESS
    assert all(np.isfinite(r.loss) for r in events.steps) and not events.errors
    (step, images), = events.validations
    assert step == 2 and [p.name for p in images] == ["edits_0-32x32-0.png"]  # at the input image's size
    index = json.loads((images[0].parent / "index.json").read_text())
    assert index[0]["prompt"] == "a photo of thing 0"
