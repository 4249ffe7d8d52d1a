"""Qwen-Image edit flavours (edit-v1, edit-v2) on tiny real models: flavour layouts, prompts read with their
reference images, the reference tokens appended to the transformer's sequence, LoRA training, exact resume,
and the LoRA loading into the diffusers edit pipeline."""

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
    write_images,
)

from kubetuner_trainer.config import ConfigError, TrainerConfig
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import family_class, load_family
from kubetuner_trainer.models.families.qwen_image import QwenImageEditFamily, QwenImageEditPlusFamily
from kubetuner_trainer.training.preflight import check

LENGTH = 24  # text tokens after the template's drop: enough for every test caption
FLAVOURS = {"edit-v1": QwenImageEditFamily, "edit-v2": QwenImageEditPlusFamily}


def _cfg(make_cfg, tiny_model, flavour, **overrides):
    values = dict(model_flavour=flavour, pretrained_model_name_or_path=str(tiny_model("qwen_image", flavour)),
                  tokenizer_max_length=LENGTH, lr_scheduler="constant")
    values.update(overrides)
    return make_cfg("qwen_image", **values)


class EditData(InMemoryData):
    """InMemoryData whose samples have reference images: ``slots`` of them each (one conditioning slot each),
    prompts encoded with them, batches carrying their latents as ``conditioning_latents``."""

    def __init__(self, encoders, *, slots: int = 1, count: int = 2, batch_size: int = 2):
        super().__init__(encoders, count=count, batch_size=batch_size)
        gen = torch.Generator().manual_seed(99)
        self.references = [torch.rand(count, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(slots)]
        self.reference_latents = [encoders.encode_images(r) for r in self.references]
        self.text = encoders.encode_prompts_with_images(
            self.prompts, [[r[i] for r in self.references] for i in range(count)])

    def __iter__(self):
        for batch in super().__iter__():
            idx = [int(p) for p in batch.paths]
            batch.conditioning_latents = [r[idx] for r in self.reference_latents]
            yield batch


@torch.no_grad()
def _edit_loss(family, data: EditData) -> float:
    """Flow-matching loss at fixed σ and noise over every sample (comparable before and after training)."""
    gen = torch.Generator().manual_seed(123)
    batch = next(iter(data))
    total = 0.0
    for sigma in (0.2, 0.5, 0.8):
        noise = torch.randn(batch.latents.shape, generator=gen)
        steps = torch.full((len(batch),), sigma * 1000.0)
        noisy = family.objective.noisy_latents(batch.latents, noise, steps)
        pred = family.predict(family.denoiser, noisy, steps, batch.text, batch)
        total += float(torch.nn.functional.mse_loss(pred, family.objective.target(batch.latents, noise, steps)))
    return total / 3


def test_edit_flavours_pick_their_layout_and_need_reference_images(make_cfg, tiny_model):
    cls = family_class("qwen_image")
    assert {f: cls.flavours[f] for f in FLAVOURS} == {"edit-v1": "Qwen/Qwen-Image-Edit",
                                                      "edit-v2": "Qwen/Qwen-Image-Edit-2509"}
    for flavour, layout in FLAVOURS.items():
        assert cls.for_flavour(flavour) is layout
        assert cls.for_flavour(None, cls.flavours[flavour]) is layout  # the flavour's hub id, no flavour named
        assert cls.for_flavour(None, str(tiny_model("qwen_image", flavour))) is layout  # its model_index.json
        cfg = _cfg(make_cfg, tiny_model, flavour)
        assert cls.requires_conditioning(cfg) and cls.text_uses_conditioning_images(cfg)
        assert cls.conditioning_types(cfg) == ("reference_strict", "reference_loose")
    plain = make_cfg("qwen_image")
    assert cls.for_flavour(None, str(tiny_model("qwen_image"))) is cls
    assert not cls.requires_conditioning(plain) and cls.conditioning_types(plain) is None


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_prompts_are_read_with_their_reference_images_as_the_pipeline_reads_them(make_cfg, tiny_model, flavour):
    family = load_family(_cfg(make_cfg, tiny_model, flavour))
    assert type(family) is FLAVOURS[flavour]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(3, 32, 48, generator=gen) * 2 - 1 for _ in range(2))
    text = family.encode_text_with_images(["a red cat", "a red cat"], [[a], [b]])
    embeds, mask = text["prompt_embeds"], text["attention_mask"]
    assert embeds.shape[:2] == mask.shape and mask.shape[1] > LENGTH  # the vision tokens come on top
    assert not torch.allclose(embeds[0], embeds[1])  # only the image differs
    # the pipeline's own encoding of the caption with the image resized as its __call__ resizes it
    pipe = family.build_pipeline()
    expected, _ = pipe.encode_prompt(["a red cat"], image=[family.prompt_image(pipe, a)], device="cpu")
    n = expected.shape[1]
    torch.testing.assert_close(embeds[0, :n], expected[0])
    assert mask[0].tolist() == [1] * n + [0] * (mask.shape[1] - n) and torch.count_nonzero(embeds[0, n:]) == 0


@pytest.fixture
def small_edit_renders(monkeypatch):
    """The edit pipelines read their reference image at about 1 MP (16k tokens for the tiny 4x VAE, a minute
    on one CPU core); tests render it at 64x64 instead by shrinking the pipelines' target area."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, original=original: original(min(area, 64 * 64), ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)


def _check_reference_tokens(family, data: EditData) -> None:
    """Each reference slot changes the prediction, which has the target's shape; none is an error."""
    batch = next(iter(data))
    noisy, steps = torch.randn(batch.latents.shape), torch.tensor([400.0, 600.0])
    with torch.no_grad():
        both = family.predict(family.denoiser, noisy, steps, batch.text, batch)
        batch.conditioning_latents = batch.conditioning_latents[:1]
        one = family.predict(family.denoiser, noisy, steps, batch.text, batch)
    assert both.shape == one.shape == batch.latents.shape and not torch.allclose(both, one)
    batch.conditioning_latents = None
    with pytest.raises(ValueError, match="conditioning_data"):
        family.predict(family.denoiser, noisy, steps, batch.text, batch)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_lora_overfits_a_paired_batch_and_loads_into_the_edit_pipeline(make_cfg, tiny_model, tmp_path, flavour,
                                                                        small_edit_renders):
    import diffusers
    from accelerate import Accelerator

    from kubetuner_trainer.training.loop import TrainingLoop

    cfg = _cfg(make_cfg, tiny_model, flavour, output_dir=str(tmp_path / "out"), max_train_steps=10, lora_rank=8,
               learning_rate=2e-2)
    family = load_family(cfg)
    data = EditData(family.encoders(), slots=2 if flavour == "edit-v2" else 1)
    if flavour == "edit-v2":
        _check_reference_tokens(family, data)
    before = _edit_loss(family, data)
    result = TrainingLoop(cfg, Accelerator(cpu=True), family, data, seed=7).run()
    assert result.exit_code == ExitCode.SUCCESS
    assert all(np.isfinite(result.losses)) and len(result.losses) == 10
    assert _edit_loss(family, data) < before * 0.9

    # diffusers' own loader and pipeline; only the processor is handed over (transformers' needs torchvision)
    pipe = getattr(diffusers, FLAVOURS[flavour].pipeline_class).from_pretrained(
        str(tiny_model("qwen_image", flavour)), processor=family.components.extra["processor"])
    pipe.set_progress_bar_config(disable=True)
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))

    def render() -> np.ndarray:
        return pipe(image=reference, prompt="a photo of thing 1", num_inference_steps=2, height=32, width=32,
                    true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    base = render()
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert np.abs(base - render()).max() > 1e-3


def test_edit_lora_resume_is_exact(make_cfg, tiny_model, tmp_path):
    assert_lora_resume_is_exact(
        lambda **kw: _cfg(make_cfg, tiny_model, "edit-v2", max_train_steps=4, learning_rate=1e-3, **kw), tmp_path,
        data_factory=lambda encoders: EditData(encoders, slots=2))


def _edit_datasets(tmp_path, *, link: bool = True, same_caption: bool = False, kind: str = "reference_strict") -> str:
    """Targets ``edited/`` with two reference datasets (``sources``, ``styles``) pairing by file name."""
    train = write_images(tmp_path / "edited", 4)
    if same_caption:
        for txt in train.glob("*.txt"):
            txt.write_text("make it red")
    entries = [{"id": "edits", "instance_data_dir": str(train), "caption_strategy": "textfile"}]
    for number, name in enumerate(("sources", "styles")):
        folder = write_images(tmp_path / name, 4, seed=50 + number)
        for txt in folder.glob("*.txt"):
            txt.unlink()
        entries.append({"id": name, "dataset_type": "conditioning", "instance_data_dir": str(folder),
                        "conditioning_type": kind})
    if link:
        entries[0]["conditioning_data"] = ["sources", "styles"]
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries))
    return str(path)


def _run_values(tiny_model, tmp_path, flavour, **overrides):
    return tiny_run_values(tiny_model("qwen_image", flavour), tmp_path, overrides.pop("datasets"),
                           model_family="qwen_image", model_flavour=flavour, tokenizer_max_length=LENGTH,
                           **overrides)


@pytest.mark.parametrize(("link", "kind", "field"), [(False, "reference_strict", r"datasets\[edits\]\.conditioning_data"),
                                                    (True, "controlnet", r"datasets\[sources\]\.conditioning_type")])
def test_an_edit_flavour_without_reference_images_is_refused_naming_the_field(tmp_path, tiny_model, link, kind,
                                                                               field):
    values = _run_values(tiny_model, tmp_path, "edit-v1", datasets=_edit_datasets(tmp_path, link=link, kind=kind))
    with pytest.raises(ConfigError, match=field):
        check(TrainerConfig.from_mapping(values))


def test_the_text_cache_keys_on_the_reference_images(tmp_path, tiny_model):
    from kubetuner_trainer.data import build_training_data

    cfg = TrainerConfig.from_mapping(_run_values(
        tiny_model, tmp_path, "edit-v1", datasets=_edit_datasets(tmp_path, same_caption=True)))
    family = load_family(cfg)
    data = build_training_data(cfg, family.encoders())
    batch = next(iter(data))
    assert batch.captions == ["make it red"] * 2  # one caption, two reference images: two embeddings
    assert not torch.allclose(batch.text["prompt_embeds"][0], batch.text["prompt_embeds"][1])
    entries = list((tmp_path / "cache" / "text").rglob("*.safetensors*"))
    assert len(entries) >= 8  # one per (caption, reference file): 4 targets x 2 linked reference datasets


def test_edit_plus_trains_through_the_trainer_on_two_reference_datasets_and_validates(tmp_path, tiny_model,
                                                                                     small_edit_renders):
    from kubetuner_trainer.train import run

    cfg = TrainerConfig.from_mapping(_run_values(
        tiny_model, tmp_path, "edit-v2", datasets=_edit_datasets(tmp_path), max_train_steps=2,
        conditioning_multidataset_sampling="combined", validation_step_interval=2, validation_resolution="32",
        validation_num_inference_steps=2, num_eval_images=1))
    check(cfg)
    events = RecordingEvents()
    assert run(cfg, events) == ExitCode.SUCCESS
    assert all(np.isfinite(r.loss) for r in events.steps) and not events.errors
    (step, images), = events.validations
    assert step == 2 and len(images) == 1 and Image.open(images[0]).size == (32, 32)
    index = json.loads((images[0].parent / "index.json").read_text())
    assert index[0]["prompt"].startswith("a photo of thing")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
