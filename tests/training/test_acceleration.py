"""Block swap, group offload, parked helpers, attention kernels and torch.compile on tiny real models (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import InMemoryData, train_in_process

from kubetuner_trainer.acceleration import MemoryPlan
from kubetuner_trainer.acceleration import offload as offload_module
from kubetuner_trainer.acceleration.attention import AttentionChoice, available_kernels
from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.models import load_family
from kubetuner_trainer.training.preflight import check

FLUX = {"tokenizer_max_length": 16, "max_train_steps": 2, "gradient_checkpointing": True}


def _two_samples(encoders):
    return InMemoryData(encoders, count=2, batch_size=2)


def _lora(family) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in family.denoiser.state_dict().items() if "lora" in k}


@pytest.fixture(scope="module")
def flux_baseline(tiny_model, tmp_path_factory):
    """Losses and LoRA weights of a plain tiny-Flux run (the reference every offload run must match)."""
    from training_helpers import LOOP_TEST_OPTIONS

    from kubetuner_trainer.config import TrainerConfig

    cfg = TrainerConfig.from_mapping({
        "model_family": "flux", "model_type": "lora", "pretrained_model_name_or_path": str(tiny_model("flux")),
        "output_dir": str(tmp_path_factory.mktemp("base") / "out"), "optimizer": "adamw_bf16",
        "learning_rate": 1e-3, "lora_rank": 4, "mixed_precision": "no", "seed": 7,
        **LOOP_TEST_OPTIONS, **FLUX}, require=False)
    result, family, _ = train_in_process(cfg, data_factory=_two_samples)
    return result.losses, _lora(family)


def _assert_same_training(result, family, baseline) -> None:
    losses, lora = baseline
    assert result.losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    trained = _lora(family)
    assert trained.keys() == lora.keys()
    for key, value in lora.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-6)


def test_block_swap_trains_like_the_resident_model(make_cfg, flux_baseline):
    cfg = make_cfg("flux", musubi_blocks_to_swap=2, **FLUX)
    seen: list[bool] = []
    original_load = offload_module.BlockSwap._load

    def spy(self, entry):  # the block reads copies, never the masters
        original_load(self, entry)
        module, name, master = entry.frozen[0]
        seen.append(module._parameters[name] is not master)

    offload_module.BlockSwap._load = spy
    try:
        result, family, _ = train_in_process(cfg, data_factory=_two_samples)
    finally:
        offload_module.BlockSwap._load = original_load
    _assert_same_training(result, family, flux_baseline)
    swapped = family.transformer_blocks()
    assert len(swapped) == 2 and seen and all(seen)
    # both blocks ran forward, and again in the checkpoint's recomputation during backward
    for block in swapped:
        hooks = block._forward_pre_hooks
        assert hooks, "the swap hooks stay on the blocks"
    masters = [p for b in swapped for p in b.parameters() if not p.requires_grad]
    assert masters and all(type(p) is torch.nn.Parameter for p in masters)  # restored after every forward


def test_group_offload_trains_like_the_resident_model(make_cfg, flux_baseline, tmp_path):
    cfg = make_cfg("flux", enable_group_offload=True, group_offload_type="block_level",
                   group_offload_blocks_per_group=1, group_offload_use_stream=True,
                   **FLUX)
    result, family, _ = train_in_process(cfg, data_factory=_two_samples)
    _assert_same_training(result, family, flux_baseline)
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    assert _is_group_offload_enabled(family.denoiser)
    pass


def test_block_swap_is_refused_where_it_cannot_work(make_cfg):
    for family, changes, option in (
            ("sd1x", {"musubi_blocks_to_swap": 1}, "musubi_blocks_to_swap"),
            ("flux", {"musubi_blocks_to_swap": 1, "enable_group_offload": True}, "musubi_blocks_to_swap"),
            ("flux", {"musubi_blocks_to_swap": 1, "dynamo_backend": "eager"}, "dynamo_backend"),
            ("flux", {"musubi_blocks_to_swap": 1, "musubi_block_swap_device": "cuda:1"}, "musubi_block_swap_device")):
        with pytest.raises(ConfigError) as info:
            check(make_cfg(family, **changes))
        problems = {p.option: p.message for p in info.value.problems}
        assert option in problems, (changes, info.value)
    with pytest.raises(ConfigError) as info:
        check(make_cfg("sd1x", musubi_blocks_to_swap=1))
    assert "flux" in str(info.value) and "sd3" in str(info.value)  # names the families that can
    with pytest.raises(ConfigError, match="has only 2 transformer blocks"):
        train_in_process(make_cfg("flux", musubi_blocks_to_swap=3, **FLUX), data_factory=_two_samples)


def test_parked_text_encoders_are_freed_and_come_back_for_each_use(make_cfg):
    cfg = make_cfg("sd1x", fully_unload_text_encoder=True, vae_enable_slicing=True, vae_enable_tiling=True)
    family = load_family(cfg)
    assert family.vae.use_slicing and family.vae.use_tiling
    plan = MemoryPlan(cfg, family, "cpu")
    encoders = plan.encoders(family.encoders())
    before = encoders.encode_prompts(["a photo"])[0]
    plan.after_caching()
    assert all(p.device.type == "meta" for te in family.text_encoders for p in te.parameters())
    again = encoders.encode_prompts(["a photo"])[0]  # reloaded from the model folder for the call
    torch.testing.assert_close(again, before)
    assert all(p.device.type == "meta" for te in family.text_encoders for p in te.parameters())
    with plan.for_validation():
        assert all(p.device.type == "cpu" for te in family.text_encoders for p in te.parameters())


def test_model_cpu_offload_hooks_validation_pipelines_and_removes_them_after(make_cfg):
    cfg = make_cfg("sd1x", enable_model_cpu_offload=True)
    family = load_family(cfg)
    plan = MemoryPlan(cfg, family, "cpu")
    with plan.for_validation() as prepare:
        pipeline = prepare(family.build_pipeline())
        assert hasattr(family.denoiser, "_hf_hook") and hasattr(family.text_encoders[0], "_hf_hook")
        assert pipeline._offload_device.type == "cpu"
    assert not any(hasattr(m, "_hf_hook") for m in (family.denoiser, family.vae, *family.text_encoders))
    assert family.denoiser.forward.__func__ is type(family.denoiser).forward  # accelerate's wrapper is gone


def test_accelerator_cache_is_cleared_every_n_steps(make_cfg, monkeypatch):
    cleared: list[int] = []
    original = MemoryPlan.after_step

    def spy(self, step):
        done = original(self, step)
        if done:
            cleared.append(step)
        return done

    monkeypatch.setattr(MemoryPlan, "after_step", spy)
    monkeypatch.setattr(offload_module, "clear_accelerator_cache", lambda: None)
    train_in_process(make_cfg("sd1x", accelerator_cache_clear_interval=2, max_train_steps=4))
    assert cleared == [2, 4]


@pytest.mark.parametrize("family", ["flux", "sd1x"])
def test_attention_kernels_available_on_cpu_give_matching_outputs(make_cfg, family):
    kernels = available_kernels("cpu")
    assert "native-math" in kernels and "flash-attn" not in kernels
    outputs = {}
    for name in kernels:
        cfg = make_cfg(family, attention_mechanism=name, tokenizer_max_length=16)
        model = load_family(cfg)
        choice = AttentionChoice(cfg)
        assert choice.check_model(model.denoiser, family) == []
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, model.vae.config.latent_channels, 8, 8, generator=gen)
        text = model.encode_text(["a photo"])
        with torch.no_grad(), choice.training():
            outputs[name] = model.predict(model.denoiser, latents, torch.tensor([500.0]), text, None)
    reference = outputs.pop("diffusers")
    for name, out in outputs.items():
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5, msg=name)


def test_unavailable_kernel_is_refused_by_kubetuner_train(tiny_model, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_family": "sd1x", "pretrained_model_name_or_path": str(tiny_model("sd1x")),
        "output_dir": str(tmp_path / "out"), "max_train_steps": 1, "attention_mechanism": "flash-attn-3",
        "data_backend_config": str(tmp_path / "missing.json")}))
    script = Path(sys.executable).parent / "kubetuner-train"
    proc = subprocess.run([str(script), "--config", str(config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.CONFIG_ERROR, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "attention_mechanism" in log and "flash_attn_interface" in log and "native-math" in log


def test_regional_compilation_trains_a_step(make_cfg):
    cfg = make_cfg("flux", dynamo_backend="eager", dynamo_use_regional_compilation=True, dynamo_dynamic=False,
                   **{**FLUX, "max_train_steps": 1, "gradient_checkpointing": False})
    result, family, _ = train_in_process(cfg, data_factory=_two_samples)
    blocks = family.transformer_blocks()
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert family.denoiser._compiled_call_impl is None  # only the repeated blocks
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()


def test_bench_runs_our_loop_with_block_swap(tmp_path, monkeypatch, capsys):
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_train_step_offload", repo / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_train_step_offload", bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch, "set_flush_denormal", lambda flag: True)
    out = tmp_path / "table.txt"
    assert bench.main(["--family", "flux", "--resolution", "32", "--batch", "1", "--steps", "1", "--warmup", "1",
                       "--repeats", "1", "--rank", "4", "--text-tokens", "8", "--blocks-to-swap", "1",
                       "--output", str(out)]) == 0
    table = out.read_text()
    assert "blocks_to_swap=1" in table
    assert [line.split()[1] for line in table.splitlines() if line.strip().startswith("1 ")] == ["kubetuner",
                                                                                                   "reference"]


def _hub_cache(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """A Hugging Face cache holding ``model_dir`` as ``repo_id`` (blobs, a snapshot of symlinks, refs/main)."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for file in model_dir.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snapshot / file.relative_to(model_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def test_delete_model_after_load_removes_the_cached_base_model_but_what_the_run_still_reads(tiny_model, tmp_path):
    from kubetuner_trainer.acceleration.hubcache import delete_cached_model

    snapshot = _hub_cache(tiny_model("sd1x"), tmp_path / "hub", "tiny/sd1x")
    other = _hub_cache(tiny_model("sd1x"), tmp_path / "hub", "tiny/other")
    assert delete_cached_model("tiny/missing", cache_dir=tmp_path / "hub") == []
    removed = delete_cached_model("tiny/sd1x", keep={"vae"}, cache_dir=tmp_path / "hub")
    assert any(p.parts[-2] == "unet" for p in removed)
    left = sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
    assert left and all(name.startswith("vae/") for name in left)  # kept files still resolve to their blobs
    blobs = list((snapshot.parents[1] / "blobs").iterdir())
    assert len(blobs) == len(left)
    assert (other / "unet" / "config.json").is_file()  # another model in the cache is untouched


def test_ramtorch_targets_frozen_linear_layers_and_is_refused_without_cuda(make_cfg):
    from kubetuner_trainer.acceleration.ramtorch import parse_patterns, target_linear_layers

    family = load_family(make_cfg("flux", tokenizer_max_length=16))
    from peft import LoraConfig

    family.denoiser.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    every = target_linear_layers(family.denoiser, [])
    names = [full for _, _, full in every]
    assert names and not any("lora_" in n for n in names)  # LoRA's trained layers stay regular
    assert "transformer_blocks.0.attn.to_q.base_layer" in names  # the frozen base under LoRA converts
    picked = [full for _, _, full in target_linear_layers(family.denoiser, parse_patterns("*.to_q.*, *.ff.*"))]
    assert picked and all(".to_q." in n or ".ff." in n for n in picked) and len(picked) < len(names)
    assert parse_patterns(None) == [] and parse_patterns(["a", " b "]) == ["a", "b"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA or ROCm GPU"):
            check(make_cfg("flux", ramtorch=True, ramtorch_target_modules="*.to_q.*"))
