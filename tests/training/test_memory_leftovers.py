"""The memory options #16 left: attention slicing, gradient release, group offload to disk, fused QKV
projections, and the options that only warn (tiny real models on CPU)."""

from __future__ import annotations

import pytest
import torch
from training_helpers import InMemoryData, train_in_process

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.training.preflight import all_warnings, check


def _lora(family) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in family.denoiser.state_dict().items() if "lora" in k}


def _assert_same_run(first, second, *, rtol: float = 1e-5) -> None:
    (result_a, family_a), (result_b, family_b) = first, second
    assert result_b.losses == pytest.approx(result_a.losses, rel=rtol, abs=1e-6)
    lora_a, lora_b = _lora(family_a), _lora(family_b)
    assert lora_a.keys() == lora_b.keys() and lora_a
    for key, value in lora_a.items():
        torch.testing.assert_close(lora_b[key], value, rtol=rtol * 10, atol=1e-6)


def _run(cfg, **kwargs):
    result, family, _ = train_in_process(cfg, **kwargs)
    return result, family


@pytest.fixture(scope="module")
def sd1x_baseline(tiny_model, tmp_path_factory):
    """A plain tiny sd1x LoRA run: what every memory option must reproduce."""
    from training_helpers import LOOP_TEST_OPTIONS

    from kubetuner_trainer.config import TrainerConfig

    cfg = TrainerConfig.from_mapping({
        "model_family": "sd1x", "model_type": "lora", "pretrained_model_name_or_path": str(tiny_model("sd1x")),
        "output_dir": str(tmp_path_factory.mktemp("base") / "out"), "optimizer": "adamw_bf16",
        "learning_rate": 1e-3, "lora_rank": 4, "mixed_precision": "no", "seed": 7, "max_train_steps": 3,
        **LOOP_TEST_OPTIONS}, require=False)
    return _run(cfg)


def test_unet_attention_slice_trains_like_full_attention(make_cfg, sd1x_baseline):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    sliced = _run(make_cfg("sd1x", unet_attention_slice=True, max_train_steps=3))
    _assert_same_run(sd1x_baseline, sliced)
    processors = sliced[1].denoiser.attn_processors.values()
    assert processors and all(isinstance(p, SlicedAttnProcessor) for p in processors)


def test_unet_attention_slice_is_refused_for_a_transformer_naming_the_unet_families(make_cfg):
    with pytest.raises(ConfigError) as info:
        check(make_cfg("flux", unet_attention_slice=True))
    (problem,) = [p for p in info.value.problems if p.option == "unet_attention_slice"]
    assert "FluxTransformer2DModel" in problem.message
    able = problem.message.split("works with: ")[1].split(", ")
    assert {"sd1x", "sdxl", "kolors"} <= set(able) and "flux" not in able


@pytest.mark.parametrize(("option", "value", "named"), [
    ("offload_param_path", "/nvme/offload", "DeepSpeed"),
    ("vae_enable_patch_conv", True, "HunyuanVideo"),
    ("ramtorch_controlnet", True, "ControlNet"),
    ("sla_config", {"topk": 0.15}, "attention_mechanism=sla"),
])
def test_options_simpletuner_hands_to_what_kubetuner_lacks_are_accepted_with_a_warning(make_cfg, option, value,
                                                                                        named):
    cfg = make_cfg("sd1x", **{option: value})
    check(cfg)
    warned = {p.option: p.message for p in all_warnings(cfg)}
    assert "has no effect" in warned[option] and named in warned[option]
    assert option not in {p.option for p in all_warnings(make_cfg("sd1x"))}


def test_sla_config_with_sla_is_refused_by_the_kernel_it_needs(make_cfg):
    with pytest.raises(ConfigError) as info:
        check(make_cfg("flux", attention_mechanism="sla", sla_config={"topk": 0.15}))
    assert "SLA" in {p.option: p.message for p in info.value.problems}["attention_mechanism"]


def _two_samples(encoders):
    return InMemoryData(encoders, count=2, batch_size=2)


# a decaying learning rate: the hooks must read the live one
RELEASE = {"optimizer": "optimi-adamw", "max_grad_norm": 0.0, "max_train_steps": 3, "lr_scheduler": "linear"}


def test_released_gradients_train_like_a_plain_optimizer_step(make_cfg):
    plain = _run(make_cfg("sd1x", **RELEASE))
    released = _run(make_cfg("sd1x", optimizer_release_gradients=True, **RELEASE))
    _assert_same_run(plain, released)
    assert all(p.grad is None for p in released[1].denoiser.parameters())  # freed in the backward pass


def test_gradient_release_accumulates_until_the_micro_batch_that_ends_the_step():
    from optimi import AdamW

    from kubetuner_trainer.optim import GradientRelease

    layer = torch.nn.Linear(4, 2)
    optimizer = AdamW(layer.parameters(), lr=0.1, gradient_release=True)
    release = GradientRelease(optimizer, layer.parameters())
    before = layer.weight.detach().clone()
    release.before_backward(False)
    layer(torch.ones(1, 4)).sum().backward()
    assert torch.equal(layer.weight, before) and layer.weight.grad is None  # accumulated into the state
    release.before_backward(True)
    layer(torch.ones(1, 4)).sum().backward()
    assert not torch.equal(layer.weight, before) and layer.weight.grad is None
    saved = optimizer.state_dict()
    assert all("group" not in entry for entry in saved["state"].values())  # no copy of the live group saved
    release.remove()
    again = AdamW(layer.parameters(), lr=0.1, gradient_release=True)
    GradientRelease(again, layer.parameters()).remove()  # its state-dict hooks stay on the optimizer
    again.load_state_dict(saved)
    assert all(again.state[p]["group"] is again.param_groups[0] for p in layer.parameters())


def test_gradient_release_resumes_exactly(make_cfg, tmp_path):
    from training_helpers import assert_lora_resume_is_exact

    assert_lora_resume_is_exact(lambda **kw: make_cfg("sd1x", optimizer_release_gradients=True,
                                                      **{**RELEASE, "max_train_steps": 4}, **kw), tmp_path)


def test_gradient_release_refusals_and_warnings(make_cfg):
    with pytest.raises(ConfigError) as info:
        check(make_cfg("sd1x", optimizer_release_gradients=True, optimizer="optimi-adamw", mixed_precision="fp16",
                       num_processes=2))
    messages = [p.message for p in info.value.problems if p.option == "optimizer_release_gradients"]
    assert any("fp16" in m and "bf16" in m for m in messages) and any("single process" in m for m in messages)
    warned = {p.option: p.message for p in all_warnings(make_cfg("sd1x", optimizer_release_gradients=True))}
    assert "only the optimi-* optimizers" in warned["optimizer_release_gradients"]
    warned = {p.option: p.message for p in all_warnings(make_cfg("sd1x", optimizer_release_gradients=True,
                                                                 optimizer="optimi-lion", max_grad_norm=1.0))}
    assert "--max_grad_norm" in warned["optimizer_release_gradients"]


def test_group_offload_to_disk_is_refused_naming_why_and_warned_about_without_group_offload(make_cfg, tmp_path):
    spill = str(tmp_path / "spill")
    with pytest.raises(ConfigError) as info:
        check(make_cfg("sd1x", enable_group_offload=True, group_offload_to_disk_path=spill))
    message = {p.option: p.message for p in info.value.problems}["group_offload_to_disk_path"]
    assert "backward pass" in message and "--musubi_blocks_to_swap" in message
    warned = {p.option: p.message for p in all_warnings(make_cfg("sd1x", group_offload_to_disk_path=spill))}
    assert "--enable_group_offload" in warned["group_offload_to_disk_path"]


@pytest.mark.parametrize("family", ["sd1x", "flux"])
def test_fused_qkv_lora_trains_and_its_file_loads_into_the_unfused_pipeline(make_cfg, family, tmp_path):
    from safetensors.torch import load_file

    from kubetuner_trainer.models import load_family

    extra = {"tokenizer_max_length": 16} if family == "flux" else {}
    cfg = make_cfg(family, fuse_qkv_projections=True, max_train_steps=2, output_dir=str(tmp_path / "out"), **extra)
    plain = _run(make_cfg(family, max_train_steps=2, output_dir=str(tmp_path / "plain"), **extra))
    fused = _run(cfg)
    assert fused[0].losses[0] == pytest.approx(plain[0].losses[0], rel=1e-5)  # same model before any update
    trained = fused[1].denoiser
    assert any(n.endswith("to_qkv.lora_A.default.weight") for n, _ in trained.named_parameters())
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert not [k for k in saved if "to_qkv" in k or "to_kv" in k or "added_qkv" in k]
    assert any(".to_q." in k for k in saved) and any(".to_v." in k for k in saved)
    # the file in the plain pipeline renders what the fused model trained
    reference = load_family(make_cfg(family, **extra))
    reference.denoiser.load_lora_adapter(str(tmp_path / "out"), prefix=reference.denoiser_name,
                                         weight_name="pytorch_lora_weights.safetensors")
    gen = torch.Generator().manual_seed(0)
    channels = reference.vae.config.latent_channels
    latents = torch.randn(1, channels, 8, 8, generator=gen)
    text = reference.encode_text(["a photo"])
    steps = torch.tensor([500.0])
    with torch.no_grad():
        expected = fused[1].predict(trained, latents, steps, text, None)
        got = reference.predict(reference.denoiser, latents, steps, text, None)
        untrained = load_family(make_cfg(family, **extra))
        before = untrained.predict(untrained.denoiser, latents, steps, text, None)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-6)  # the LoRA changes the output


def test_fused_qkv_lora_resumes_exactly(make_cfg, tmp_path):
    from training_helpers import assert_lora_resume_is_exact

    assert_lora_resume_is_exact(lambda **kw: make_cfg("sd1x", fuse_qkv_projections=True, **kw), tmp_path)


def test_fused_qkv_on_a_quantized_base_warns_that_the_fused_layers_are_not_quantized(make_cfg):
    warned = {p.option: p.message for p in all_warnings(make_cfg("flux", fuse_qkv_projections=True,
                                                                 base_model_precision="int8-quanto"))}
    assert "not quantized" in warned["fuse_qkv_projections"]
    assert "fuse_qkv_projections" not in {p.option for p in all_warnings(make_cfg("flux", fuse_qkv_projections=True))}


def test_fused_qkv_is_refused_where_it_is_not_built(make_cfg):
    for family, changes, named in (("sd1x", {"model_type": "full"}, "--model_type=full"),
                                   ("sd1x", {"lora_type": "lycoris"}, "--lora_type=lycoris"),
                                   ("lumina2", {}, "Lumina2Transformer2DModel"),
                                   ("sd3", {}, "SD3Transformer2DModel"),
                                   ("sd1x", {"unet_attention_slice": True}, "--unet_attention_slice")):
        with pytest.raises(ConfigError) as info:
            check(make_cfg(family, fuse_qkv_projections=True, **changes))
        messages = [p.message for p in info.value.problems if p.option == "fuse_qkv_projections"]
        assert any(named in m for m in messages), (family, changes, messages)


def test_bench_runs_our_loop_with_the_new_memory_flags(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_train_step_memory", repo / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train_step_memory", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch, "set_flush_denormal", lambda flag: True)
    out = tmp_path / "table.txt"
    assert bench.main(["--family", "sd1x", "--resolution", "32", "--batch", "1", "--steps", "1", "--warmup", "1",
                       "--repeats", "1", "--rank", "4", "--fuse-qkv", "--release-gradients",
                       "--optimizer", "optimi-adamw", "--output", str(out)]) == 0
    table = out.read_text()
    assert "fuse_qkv=True attention_slice=False release_gradients=True" in table
    assert [line.split()[1] for line in table.splitlines() if line.strip().startswith("1 ")] == ["kubetuner",
                                                                                                   "reference"]


def test_block_swap_of_a_quanto_int8_base_trains_like_the_resident_one(make_cfg):
    from optimum.quanto import QTensor

    from kubetuner_trainer.acceleration import blockswap

    flux = {"tokenizer_max_length": 16, "max_train_steps": 2, "gradient_checkpointing": True,
            "base_model_precision": "int8-quanto"}
    resident = _run(make_cfg("flux", **flux), data_factory=_two_samples)
    swapped_types: list[type] = []
    original_attach = blockswap.BlockSwap._attach

    def spy(self, block):
        entry = original_attach(self, block)
        swapped_types.extend(type(p.data) for _, _, p in entry.frozen)
        return entry

    blockswap.BlockSwap._attach = spy
    try:
        swapped = _run(make_cfg("flux", musubi_blocks_to_swap=2, **flux), data_factory=_two_samples)
    finally:
        blockswap.BlockSwap._attach = original_attach
    _assert_same_run(resident, swapped)
    assert any(issubclass(t, QTensor) for t in swapped_types)  # the int8 weights themselves wait off the device


def test_ramtorch_on_a_quantized_base_is_refused_pointing_at_block_swap(make_cfg):
    with pytest.raises(ConfigError) as info:
        check(make_cfg("flux", ramtorch=True, base_model_precision="int8-quanto", tokenizer_max_length=16))
    messages = [p.message for p in info.value.problems if p.option == "ramtorch"]
    assert any("int8-quanto" in m and "--musubi_blocks_to_swap" in m for m in messages)
