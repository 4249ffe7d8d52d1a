"""Model families on tiny real models: registry, loading, encoders, conditioning, targets, pipelines."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.models import family_class, implemented_families, load_family
from kubetuner_trainer.models.families.sdxl import add_time_ids
from kubetuner_trainer.models.loading import resolve_source


def test_registry_names_allowed_families_and_flavours():
    with pytest.raises(ValueError, match=f"supported: {', '.join(implemented_families())}$"):
        family_class("no-such-family")
    with pytest.raises(ValueError, match="allowed: base-0.9, base-1.0, refiner-0.9, refiner-1.0$"):
        family_class("sdxl", "turbo")
    assert family_class("sd2x", "2.1-base").family == "sd2x"


def test_implemented_families_come_from_the_registry_alone():
    from kubetuner_trainer.options import get_registry
    from kubetuner_trainer.tiny import main as tiny_main

    families = implemented_families()
    assert {"sd1x", "sd2x", "sdxl", "kolors", "flux"} <= set(families)
    assert get_registry().get("model_family").implemented_choices == frozenset(families)
    for name in families:
        cls = family_class(name)
        assert cls.family == name and cls.default_flavour in cls.flavours and cls.modelspec_architecture
    with pytest.raises(SystemExit):  # the tiny builder offers exactly the registry's families
        tiny_main(["model", "no-such-family", "/nonexistent"])


def test_vae_location_may_be_a_pipeline_folder_or_a_vae_folder(model_cfg, tiny_model, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model("sd1x") / "vae")
    vae.register_to_config(scaling_factor=0.25)
    pipeline_folder = tmp_path / "pipeline"
    vae.save_pretrained(pipeline_folder / "vae")
    (pipeline_folder / "model_index.json").write_text("{}")
    assert load_family(model_cfg("sd1x", pretrained_vae_model_name_or_path=str(pipeline_folder))
                       ).vae.config.scaling_factor == 0.25
    vae.save_pretrained(tmp_path / "plain-vae")
    assert load_family(model_cfg("sd1x", pretrained_vae_model_name_or_path=str(tmp_path / "plain-vae"))
                       ).vae.config.scaling_factor == 0.25
    (tmp_path / "empty").mkdir()
    for location, message in ((tmp_path / "empty", "holds no config.json and no vae/config.json"),
                              (tmp_path / "missing", "no such folder")):
        with pytest.raises(ConfigError, match=message) as info:
            load_family(model_cfg("sd1x", pretrained_vae_model_name_or_path=str(location)))
        assert info.value.problems[0].option == "pretrained_vae_model_name_or_path"
        assert str(location) in str(info.value)


def test_unreadable_weights_are_a_config_error_naming_the_path(model_cfg, tiny_model, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model("sd1x"), folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot load a UNet2DConditionModel from .*corrupt/unet") as info:
        load_family(model_cfg("sd1x", pretrained_model_name_or_path=str(folder)))
    assert info.value.problems[0].option == "pretrained_model_name_or_path"


def test_flavour_picks_the_default_hub_id_when_no_path_is_given(model_cfg):
    cfg = model_cfg("sdxl", pretrained_model_name_or_path=None, revision="abc123", variant="fp16")
    src = resolve_source(family_class("sdxl"), cfg)
    assert (src.model, src.revision, src.variant) == ("stabilityai/stable-diffusion-xl-base-1.0", "abc123", "fp16")
    assert not src.single_file
    single = resolve_source(family_class("sd1x"), model_cfg("sd1x", pretrained_model_name_or_path="/m/x.safetensors"))
    assert single.single_file


@pytest.mark.parametrize("family, text_keys", [
    ("sd1x", {"prompt_embeds": (77, 32)}),
    ("sd2x", {"prompt_embeds": (77, 32)}),
    ("sdxl", {"prompt_embeds": (77, 64), "pooled_prompt_embeds": (32,)}),
    ("kolors", {"prompt_embeds": (256, 32), "pooled_prompt_embeds": (32,)}),
])
def test_encoders_for_the_data_pipeline(model_cfg, family, text_keys):
    adapter = load_family(model_cfg(family))
    enc = adapter.encoders()
    assert enc.latent_downscale == 2  # two VAE blocks in the tiny model
    latents = enc.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert latents.shape == (2, 4, 16, 16)
    again = enc.encode_images(torch.rand(2, 3, 32, 32) * 0)  # deterministic (posterior mean)
    assert torch.equal(again, enc.encode_images(torch.zeros(2, 3, 32, 32)))
    per_prompt = enc.encode_prompts(["a red cube", "a blue ball"])
    assert len(per_prompt) == 2
    assert {k: tuple(v.shape) for k, v in per_prompt[0].items()} == text_keys
    assert not torch.equal(per_prompt[0]["prompt_embeds"], per_prompt[1]["prompt_embeds"])
    # the batched prediction path accepts stacked per-prompt tensors
    text = {k: torch.stack([p[k] for p in per_prompt]) for k in per_prompt[0]}
    out = adapter.predict(adapter.denoiser, latents, torch.tensor([10, 500]), text, None)
    assert out.shape == latents.shape


def test_cache_key_tracks_model_identity(model_cfg, tiny_model, tmp_path):
    a = load_family(model_cfg("sd1x"))
    assert a.cache_key == load_family(model_cfg("sd1x")).cache_key
    assert a.cache_key.startswith("sd1x-")
    # a different VAE (other scaling) must change the key
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model("sd1x") / "vae")
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "other-vae")
    b = load_family(model_cfg("sd1x", pretrained_vae_model_name_or_path=str(tmp_path / "other-vae")))
    assert b.vae.config.scaling_factor == 0.5
    assert b.cache_key != a.cache_key


def test_variant_and_separate_unet_location(model_cfg, tiny_model, tmp_path):
    folder = tmp_path / "variant-model"
    shutil.copytree(tiny_model("sd1x"), folder)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    unet.save_pretrained(folder / "unet", variant="ema")
    for name in ("vae", "text_encoder"):
        src = folder / name
        for f in list(src.glob("*.safetensors")):
            shutil.copy(f, f.with_name(f.stem + ".ema" + f.suffix))
    plain = load_family(model_cfg("sd1x", pretrained_model_name_or_path=str(folder)))
    variant = load_family(model_cfg("sd1x", pretrained_model_name_or_path=str(folder), variant="ema"))
    p0 = next(plain.denoiser.parameters())
    p1 = next(variant.denoiser.parameters())
    assert torch.allclose(p1, p0 + 1.0)

    other = tmp_path / "unet-only" / "weights"
    unet.save_pretrained(other)
    split = load_family(model_cfg("sd1x", pretrained_unet_model_name_or_path=str(tmp_path / "unet-only"),
                                   pretrained_unet_subfolder="weights"))
    assert torch.allclose(next(split.denoiser.parameters()), p0 + 1.0)


def test_missing_component_folder_is_a_clear_error(model_cfg, tiny_model, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model("sd1x"), folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ConfigError, match="has no text_encoder/ folder") as info:
        load_family(model_cfg("sd1x", pretrained_model_name_or_path=str(folder)))
    assert info.value.problems[0].option == "pretrained_model_name_or_path"


def test_single_file_is_refused_for_kolors(model_cfg, tmp_path):
    (tmp_path / "kolors.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="cannot load a single checkpoint file"):
        load_family(model_cfg("kolors", pretrained_model_name_or_path=str(tmp_path / "kolors.safetensors")))


def test_sdxl_micro_conditioning_reaches_the_unet(model_cfg):
    adapter = load_family(model_cfg("sdxl"))
    latents = torch.randn(2, 4, 16, 16)
    batch = SimpleNamespace(original_sizes=[(64, 48), (32, 32)], crop_coords=[(4, 2), (0, 0)],
                            target_sizes=[(32, 32), (32, 32)])
    ids = add_time_ids(batch, latents, adapter.latent_downscale)
    assert ids.tolist() == [[64, 48, 4, 2, 32, 32], [32, 32, 0, 0, 32, 32]]
    # without sizes the batch's own pixel size is used
    assert add_time_ids(None, latents, 2).tolist()[0] == [32, 32, 0, 0, 32, 32]
    text = adapter.encode_text(["x", "x"])
    t = torch.tensor([100, 100])
    with torch.no_grad():
        a = adapter.predict(adapter.denoiser, latents, t, text, batch)
        other = SimpleNamespace(original_sizes=[(1024, 1024)] * 2, crop_coords=[(0, 0)] * 2,
                                target_sizes=[(32, 32)] * 2)
        b = adapter.predict(adapter.denoiser, latents, t, text, other)
    assert not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="3 size entries for 2 samples"):
        add_time_ids(SimpleNamespace(original_sizes=[(1, 1)] * 3, crop_coords=None, target_sizes=None), latents, 2)


def test_v_prediction_target_and_zero_terminal_snr(model_cfg):
    adapter = load_family(model_cfg("sd2x"))
    assert adapter.prediction_type == "v_prediction"
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    expected = adapter.noise_scheduler.get_velocity(latents, noise, t)
    assert torch.equal(adapter.objective.target(latents, noise, t), expected)
    assert not torch.allclose(expected, noise)
    eps = load_family(model_cfg("sd2x", prediction_type="epsilon"))
    assert torch.equal(eps.objective.target(latents, noise, t), noise)

    zsnr = load_family(model_cfg("sd2x", rescale_betas_zero_snr=True))
    assert float(zsnr.noise_scheduler.alphas_cumprod[-1]) < 1e-6
    assert float(adapter.noise_scheduler.alphas_cumprod[-1]) > 1e-4
    assert zsnr.noise_scheduler.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("family, asked, allowed", [("sd1x", "flow_matching", "epsilon, v_prediction"),
                                                    ("sd3", "epsilon", "flow_matching")])
def test_a_prediction_type_the_family_lacks_is_refused_before_loading(model_cfg, family, asked, allowed):
    from kubetuner_trainer.config import ConfigError
    from kubetuner_trainer.training import preflight

    with pytest.raises(ConfigError, match=f"prediction_type.*allowed: {allowed}$"):
        preflight.check(model_cfg(family, prediction_type=asked, max_train_steps=1))


@pytest.mark.parametrize("family, pipeline", [("sd1x", "StableDiffusionPipeline"),
                                              ("sdxl", "StableDiffusionXLPipeline"),
                                              ("kolors", "KolorsPipeline")])
def test_build_pipeline_renders_with_the_given_modules(model_cfg, family, pipeline):
    adapter = load_family(model_cfg(family))
    pipe = adapter.build_pipeline()
    assert type(pipe).__name__ == pipeline
    gen = torch.Generator().manual_seed(0)
    image = pipe("a red cube", num_inference_steps=2, height=32, width=32, generator=gen, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    index = json.loads(open(adapter.components.source.model + "/model_index.json").read())
    assert index["_class_name"] == pipeline


def test_vae_dtype_option(model_cfg):
    adapter = load_family(model_cfg("sd1x", vae_dtype="bf16"))
    assert next(adapter.vae.parameters()).dtype == torch.bfloat16
    latents = adapter.encode_images(torch.zeros(1, 3, 32, 32))
    assert latents.dtype == torch.float32  # cached latents stay fp32 whatever the VAE runs in
    assert adapter.cache_key != load_family(model_cfg("sd1x")).cache_key


def test_a_hub_model_that_cannot_be_fetched_is_a_config_error(model_cfg, monkeypatch, tmp_path):
    """Not cached and no Hub (air-gapped, offline mode): exit 78 with the way out, never a retried crash."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be reached") as info:
        load_family(model_cfg("sd1x", pretrained_model_name_or_path="someone/not-cached-model"))
    problem = info.value.problems[0]
    assert problem.option == "pretrained_model_name_or_path" and "spec.model.source" in problem.message
