"""Validation renders with a tiny real Stable Diffusion 1.x pipeline built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_helpers import python_command, write_checkpoint

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import TrainerState
from kubetuner_trainer.runtime import build_runtime, check_runtime_config
from kubetuner_trainer.runtime.validation import (
    BUILTIN_PROMPTS,
    ValidationConfigError,
    Validator,
    parse_resolutions,
)

FAST = {"validation_num_inference_steps": 2, "validation_resolution": "32", "validation_prompt": "a red cube"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A complete diffusers folder (UNet, VAE, CLIP text encoder, tokenizer) with tiny configs."""
    from kubetuner_trainer.tiny import build_tiny_sd1x

    return build_tiny_sd1x(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture
def pipeline_factory(tiny_model):
    """Loads the pipeline the way users load one; records every pipeline and call it makes."""
    from diffusers import StableDiffusionPipeline

    made = []

    def factory():
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        real_call = pipeline.__call__
        calls = []

        class Spy(type(pipeline)):
            def __call__(self, *args, **kwargs):
                calls.append(kwargs)
                return real_call(*args, **kwargs)

        pipeline.__class__ = Spy
        made.append((pipeline, calls))
        return pipeline

    factory.made = made
    return factory


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_images_follow_prompts_sizes_counts_and_seeds(cfg_factory, pipeline_factory, tmp_path):
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"tree": {"prompt": "a tree"}}))
    cfg = cfg_factory(**{**FAST, "validation_resolution": "32,48x32", "num_validation_images": 2,
                         "user_prompt_library": str(library), "validation_seed": 7,
                         "validation_negative_prompt": "blurry", "validation_guidance": 3.0,
                         "validation_noise_scheduler": "euler", "validation_guidance_rescale": 0.3,
                         "validation_seed_source": "gpu"})  # falls back to a CPU generator without CUDA
    validator = Validator(cfg, output_dir=tmp_path / "out")
    files = validator.run(5, pipeline_factory)
    folder = tmp_path / "out" / "validation" / "step-5"
    assert sorted(p.name for p in files) == sorted(
        f"{name}-{size}-{n}.png" for name in ("validation", "tree")
        for size in ("32x32", "48x32") for n in (0, 1))
    assert all(p.parent == folder for p in files)
    assert Image.open(folder / "tree-48x32-1.png").size == (48, 32)
    (pipeline, calls), = pipeline_factory.made
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert {c["negative_prompt"] for c in calls} == {"blurry"}
    assert {(c["guidance_scale"], c["num_inference_steps"], c["guidance_rescale"]) for c in calls} == {(3.0, 2, 0.3)}
    index = json.loads((folder / "index.json").read_text())
    assert {(e["file"], e["seed"]) for e in index if e["file"].startswith("tree-32x32")} == {
        ("tree-32x32-0.png", 7), ("tree-32x32-1.png", 8)}
    # seeds make renders reproducible; a different seed gives a different image
    single = cfg_factory(**{**FAST, "validation_seed": 7, "validation_negative_prompt": "blurry",
                            "validation_guidance": 3.0, "validation_noise_scheduler": "euler",
                            "validation_guidance_rescale": 0.3})
    (again,) = Validator(single, output_dir=tmp_path / "again").run(5, pipeline_factory)
    assert np.array_equal(pixels(again), pixels(folder / "validation-32x32-0.png"))
    assert not np.array_equal(pixels(folder / "tree-32x32-0.png"), pixels(folder / "tree-32x32-1.png"))


def test_due_follows_intervals_disable_and_startup(cfg_factory):
    validator = Validator(cfg_factory(**FAST, validation_step_interval=3, validation_epoch_interval=2))
    assert [s for s in range(1, 10) if validator.due(s)] == [3, 6, 9]
    assert validator.due(4, epoch_end=True, epoch=2) and not validator.due(4, epoch_end=True, epoch=1)
    counting = Validator(cfg_factory(**FAST, validation_epoch_interval=2))  # no epoch given: counts epoch ends
    assert [counting.due(s, epoch_end=True) for s in (5, 10, 15, 20)] == [False, True, False, True]
    assert not validator.due_on_startup()
    assert Validator(cfg_factory(**FAST, validation_on_startup=True)).due_on_startup()
    off = Validator(cfg_factory(**FAST, validation_step_interval=1, validation_disable=True))
    assert not off.due(1) and off.run(1, lambda: pytest.fail("disabled validation built a pipeline")) == []
    no_prompt = Validator(cfg_factory(validation_step_interval=1))
    assert not no_prompt.due(1)


def test_builtin_library_adds_its_prompts(cfg_factory):
    validator = Validator(cfg_factory(validation_prompt_library=True))
    assert set(validator.prompts) == set(BUILTIN_PROMPTS)


def make_lora(tiny_model: Path, folder: Path) -> Path:
    """A real LoRA for the tiny UNet, saved in diffusers' LoRA format."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.mul_(50)  # a strong adapter, so its effect on the render is unmistakable
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def test_adapter_comparison_renders_base_and_adapter(cfg_factory, pipeline_factory, tiny_model, tmp_path):
    lora = make_lora(tiny_model, tmp_path / "lora")
    cfg = cfg_factory(**FAST, validation_adapter_path=str(lora), validation_adapter_name="style",
                      validation_adapter_mode="comparison", validation_adapter_strength=1.0)
    files = {p.name: p for p in Validator(cfg, output_dir=tmp_path / "out").run(1, pipeline_factory)}
    assert set(files) == {"base-validation-32x32-0.png", "style-validation-32x32-0.png"}
    plain = Validator(cfg_factory(**FAST), output_dir=tmp_path / "plain").run(1, pipeline_factory)[0]
    assert np.array_equal(pixels(files["base-validation-32x32-0.png"]), pixels(plain))
    assert not np.array_equal(pixels(files["style-validation-32x32-0.png"]), pixels(plain))
    pipeline, _ = pipeline_factory.made[0]
    assert pipeline.get_list_adapters() == {} or not any(pipeline.get_list_adapters().values())


def test_adapter_config_runs_each_entry(cfg_factory, pipeline_factory, tiny_model, tmp_path):
    lora = make_lora(tiny_model, tmp_path / "lora")
    runs = [{"label": "full", "path": str(lora), "strength": 1.0},
            {"label": "half", "path": str(lora), "adapter_name": "half", "strength": 0.5}]
    cfg = cfg_factory(**FAST, validation_adapter_config=json.dumps(runs))
    files = sorted(p.name for p in Validator(cfg, output_dir=tmp_path / "out").run(2, pipeline_factory))
    assert files == ["full-validation-32x32-0.png", "half-validation-32x32-0.png"]


def test_ema_comparison_uses_both_weight_sets(cfg_factory, pipeline_factory, tmp_path):
    import torch

    def ema_factory():
        pipeline = pipeline_factory()
        with torch.no_grad():
            for param in pipeline.unet.parameters():
                param.mul_(0.5)
        return pipeline

    # Through the loop this is tested in tests/training/test_run.py; here the factories are stand-ins.
    base = cfg_factory(**FAST).to_dict()
    cfg = {**base, "ema_validation": "comparison", "use_ema": True}
    files = {p.name: p for p in Validator(cfg, output_dir=tmp_path / "o").run(3, pipeline_factory,
                                                                               ema_pipeline_factory=ema_factory)}
    assert set(files) == {"validation-32x32-0.png", "ema-validation-32x32-0.png"}
    assert not np.array_equal(pixels(files["validation-32x32-0.png"]), pixels(files["ema-validation-32x32-0.png"]))
    only = Validator({**base, "ema_validation": "ema_only", "use_ema": True}, output_dir=tmp_path / "e")
    assert [p.name for p in only.run(3, pipeline_factory, ema_pipeline_factory=ema_factory)] == [
        "ema-validation-32x32-0.png"]


def test_ema_validation_warns_only_when_ema_is_on(cfg_factory, pipeline_factory, tmp_path, caplog):
    base = cfg_factory(**FAST).to_dict()
    with caplog.at_level("WARNING", logger=Validator.__module__):
        files = Validator({**base, "ema_validation": "comparison"}, output_dir=tmp_path / "a").run(1, pipeline_factory)
    assert [p.name for p in files] == ["validation-32x32-0.png"]
    assert "EMA" not in caplog.text
    with caplog.at_level("WARNING", logger=Validator.__module__):
        Validator({**base, "ema_validation": "comparison", "use_ema": True}, output_dir=tmp_path / "b").run(
            1, pipeline_factory)
    assert "gave no EMA weights" in caplog.text


def test_run_and_report_feeds_the_runtime(cfg_factory, pipeline_factory, receiver, tmp_path):
    cfg = cfg_factory(**FAST, webhook_config={"webhook_type": "raw", "callback_url": receiver.url},
                      report_to="tensorboard")
    with build_runtime(cfg, install_signals=False) as rt:
        images = Validator(cfg).run_and_report(4, rt, pipeline_factory)
        assert rt.status.snapshot().state == TrainerState.TRAINING
    assert len(images) == 1 and images[0].is_file()
    stages = [r.json()["data"].get("stage") for r in receiver.requests if r.json()["type"] == "lifecycle.stage"]
    assert "validating" in stages
    event = next(r.json() for r in receiver.requests if r.json()["type"] == "training.validation")
    assert event["data"]["images"][0]["name"] == images[0].name
    assert rt.metrics.registry.get_sample_value("kubetuner_trainer_validation_images_total") == 1


def test_failed_render_is_reported_not_raised(cfg_factory, tmp_path):
    def broken():
        raise RuntimeError("out of memory")

    cfg = cfg_factory(**FAST)
    with build_runtime(cfg, install_signals=False) as rt:
        assert Validator(cfg).run_and_report(1, rt, broken) == []
        assert rt.status.snapshot().state == TrainerState.TRAINING  # the run goes on
    assert rt.metrics.registry.get_sample_value("kubetuner_trainer_errors_total") == 1
    assert rt.metrics.registry.get_sample_value("kubetuner_trainer_validation_images_total") == 0


def test_external_script_gets_latest_checkpoint_and_validation_options(cfg_factory, argv_dumper, tmp_path):
    out_file = tmp_path / "argv.json"
    command = python_command(str(argv_dumper), str(out_file), "{local_checkpoint_path}", "{global_step}",
                             "{validation_num_inference_steps}", "{validation_prompt}")
    cfg = cfg_factory(**FAST, validation_method="external-script", validation_external_script=command)
    write_checkpoint(tmp_path / "out", 4)
    write_checkpoint(tmp_path / "out", 12)
    validator = Validator(cfg)
    assert validator.due(0) is False and validator.enabled
    assert validator.run(12) == []  # waited for (not background)
    assert json.loads(out_file.read_text()) == [str(tmp_path / "out" / "checkpoint-12"), "12", "2", "a red cube"]


def test_resolution_parsing():
    assert parse_resolutions("1024", 512) == [(1024, 1024)]
    assert parse_resolutions("768x512, 1024,1024", 512) == [(768, 512), (1024, 1024)]
    assert parse_resolutions("1.0", 512) == [(960, 960)]  # one megapixel, on the 64-pixel grid
    assert parse_resolutions(None, 515) == [(512, 512)]
    with pytest.raises(ValidationConfigError, match="validation_resolution: 'big'"):
        parse_resolutions("big", 512)


def test_bad_validation_options_are_config_errors(cfg_factory, tmp_path):
    problems = check_runtime_config(cfg_factory(validation_resolution="huge"))
    assert [p.option for p in problems] == ["validation_resolution"]
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="user_prompt_library"), build_runtime(
            cfg_factory(user_prompt_library=str(missing)), install_signals=False):
        pass


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler-a", "unipc", "dpm++"])
def test_every_noise_scheduler_choice_swaps_the_scheduler(cfg_factory, name):
    from diffusers import DDPMScheduler

    class Pipeline:  # only the scheduler matters here; rendering is covered above
        scheduler = DDPMScheduler(beta_schedule="scaled_linear")

    prepared = Validator(cfg_factory(validation_noise_scheduler=name))._prepare(Pipeline())
    from kubetuner_trainer.runtime.validation import SCHEDULERS

    assert type(prepared.scheduler).__name__ == SCHEDULERS[name]
    assert prepared.scheduler.config.beta_schedule == "scaled_linear"  # the model's schedule is kept


def test_randomize_picks_new_seeds_and_fixed_seed_repeats(cfg_factory):
    randomized = Validator(cfg_factory(validation_randomize=True, validation_seed=3))
    assert len({randomized._base_seed() for _ in range(3)}) > 1
    assert Validator(cfg_factory(validation_seed=3))._base_seed() == 3
    assert Validator(cfg_factory(seed=11))._base_seed() == 11


def test_adapter_mode_none_renders_without_adapters(cfg_factory, pipeline_factory, tmp_path):
    cfg = cfg_factory(**FAST, validation_adapter_path=str(tmp_path / "missing.safetensors"),
                      validation_adapter_mode="none")
    files = Validator(cfg, output_dir=tmp_path / "o").run(1, pipeline_factory)
    assert [p.name for p in files] == ["validation-32x32-0.png"]  # the adapter is never loaded


def test_background_external_script_does_not_wait_or_judge(cfg_factory, argv_dumper, tmp_path, monkeypatch):
    monkeypatch.setenv("DUMPER_EXIT", "5")
    out_file = tmp_path / "argv.json"
    command = python_command(str(argv_dumper), str(out_file), "{global_step}")
    cfg = cfg_factory(validation_method="external-script", validation_external_script=command,
                      validation_external_background=True)
    validator = Validator(cfg)
    assert validator.run(3) == []
    assert validator.scripts.wait_all(60)
    assert json.loads(out_file.read_text()) == ["3"]
